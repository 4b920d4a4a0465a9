"""Neuron ranking by loss gradients, for heal_quality.py's ``--b-variant rank=fisher`` arms (an experiment, not a
library feature: contraction is gradient-free and plans block by block, so it can stream models larger than
memory; this needs a backward pass through the whole model).

The score of MLP neuron j of a block is ``F_j / mean(F) + V_j / mean(V)``: ``F_j = sum over tokens of
(a_j * dL/da_j)^2`` (the Fisher / squared first-order Taylor estimate of the next-token loss change when a_j is
zeroed; a = the down projection's input) on the calibration windows, and ``V_j`` contraction's own fluctuation
score (variance of a_j times the squared norm of its down-projection column). A development measurement of
session 7 (one-shot, ratio 0.53, no heal) found the sum better than either part alone.

Why it could favour the iterative schedule: its later slices are ranked on a model that has healed, with the
gradients of that model, which one-shot contraction of the source cannot see.
"""
from __future__ import annotations

import torch

from pyshrink import data, models
from pyshrink.arch import adapter_for
from pyshrink.contract import scores


def fisher_scores(model, tok, calibration, blocks, *, seq_len: int = 512, tokens: int = 8192) -> dict:
    """Per block in ``blocks``: float64 ``sum (a * dL/da)^2`` over ``tokens`` tokens of the calibration windows
    contraction uses (the first windows of the calibration text without its held-out last 10 %). The model is
    left as it was (requires_grad flags, mode, no gradients)."""
    ids = data.split_ids(data.tokenize(tok, data.read_texts(calibration)), 0.1)[0]
    win = data.windows(ids, seq_len, tokens, what="calibration text")
    ad = adapter_for(model)
    acts, out, hooks = {}, {}, []
    flags = [(p, p.requires_grad) for p in model.parameters()]
    training = model.training
    for p, _ in flags:  # the activations need a graph even where the heal trains only some blocks
        p.requires_grad_(True)
    model.eval()

    def keep(i):
        def hook(_mod, inp):
            inp[0].retain_grad()
            acts[i] = inp[0]
        return hook

    for i in blocks:
        hooks.append(ad.mlp_out_module(ad.blocks(model)[i]).register_forward_pre_hook(keep(i)))
    try:
        with torch.enable_grad():
            for k in range(len(win)):
                model.zero_grad(set_to_none=True)
                model(input_ids=win[k:k + 1], labels=win[k:k + 1], use_cache=False).loss.backward()
                for i in blocks:
                    a = acts[i]
                    s = (a.grad * a.detach()).pow(2).flatten(0, -2).sum(0).double()
                    out[i] = out[i] + s if i in out else s
    finally:
        for h in hooks:
            h.remove()
        model.zero_grad(set_to_none=True)
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(training)
    return out


def fisher_ranked(contract_fn):
    """``contract_fn`` (pyshrink.contract) with the neurons of the ``layers=`` it is given ranked by
    :func:`fisher_scores` + fluctuation on the model it contracts (the source, or the healing model of a later
    slice). Calls without ``layers`` (the one-shot reference choosing its blocks) run unchanged."""

    def contract(source, **kw):
        blocks = sorted(kw.get("layers") or [])
        if not blocks:
            return contract_fn(source, **kw)
        model, tok = models.load_model(source) if isinstance(source, str) else source
        fisher = fisher_scores(model, tok, kw["calibration"], blocks, seq_len=kw.get("seq_len", 512),
                               tokens=kw.get("calibration_tokens", 8192))
        todo = iter(blocks)  # contraction plans the pinned blocks one after another, in block order

        def criterion(layer, n_remove):
            f = fisher[next(todo)]
            fl = layer.stats.variance * layer.weight.pow(2).sum(0)
            if f.shape != fl.shape:
                raise RuntimeError(f"fisher_ranked: scores for {f.numel()} neurons, block has {fl.numel()}")
            return (f / f.mean() + fl / fl.mean()).argsort()[:n_remove]

        scores.CRITERIA["fisher"] = criterion
        try:
            result = contract_fn((model, tok), **{**kw, "criterion": "fisher"})
        finally:
            del scores.CRITERIA["fisher"]
        if next(todo, None) is not None:
            raise RuntimeError("fisher_ranked: contraction planned fewer blocks than it was given")
        return result

    return contract
