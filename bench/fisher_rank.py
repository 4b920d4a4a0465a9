"""Neuron ranking by loss gradients, for heal_quality.py's ``--b-variant rank=fisher`` arms (an experiment, not a
library feature: contraction is gradient-free and plans block by block, so it can stream models larger than
memory; this needs a backward pass through the whole model).

The score of MLP neuron j of a block is ``F_j / mean(F) + V_j / mean(V)``. ``F_j = sum over tokens of
(a_j * dL/da_j)^2`` is the empirical Fisher estimate of how much the next-token loss L depends on a_j (a = the
down projection's input), on the calibration windows; ``V_j`` is contraction's own fluctuation score (variance
of a_j times the squared norm of its down-projection column). Why the sum: a development measurement of session
7 (one-shot, ratio 0.53 in 24 blocks of SmolLM2-135M, no heal; a script not in this repository) gave test
perplexity 59.88 for the sum, 61.61 for F alone and 65.70 for V alone.

Why it could favour the iterative schedule: its later slices are ranked on a model that has healed, with the
gradients of that model, which one-shot contraction of the source cannot see.
"""
from __future__ import annotations

import torch

from pyshrink import models
from pyshrink.arch import adapter_for
from pyshrink.arch.linears import weight_out_in
from pyshrink.contract import scores
from pyshrink.heal.schedule import calibration_windows


def fisher_scores(model, windows: torch.Tensor, blocks) -> dict:
    """Per block in ``blocks``: ``sum (a * dL/da)^2`` over every token of ``windows`` ([n, seq_len] ids), one
    window at a time (float32 within a window, float64 across windows). No parameter gradient is computed or
    touched; the model's requires_grad flags and mode are restored."""
    ad = adapter_for(model)
    acts, out, hooks = {}, {}, []
    flags = [(p, p.requires_grad) for p in model.parameters()]
    training = model.training

    def keep(i):
        def hook(_mod, inp):
            acts[i] = inp[0]
        return hook

    try:
        for p, _ in flags:  # the activations need a graph even where the heal trains only some blocks
            p.requires_grad_(True)
        model.eval()
        for i in blocks:
            hooks.append(ad.mlp_out_module(ad.blocks(model)[i]).register_forward_pre_hook(keep(i)))
        with torch.enable_grad():
            for k in range(len(windows)):
                loss = model(input_ids=windows[k:k + 1], labels=windows[k:k + 1], use_cache=False).loss
                grads = torch.autograd.grad(loss, [acts[i] for i in blocks])
                for i, g in zip(blocks, grads):
                    s = (g * acts[i].detach()).pow(2).flatten(0, -2).sum(0).double()
                    out[i] = out[i] + s if i in out else s
                acts.clear()
    finally:
        for h in hooks:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(training)
    return out


def fisher_ranked(contract_fn, *, seq_len: int = 512):
    """``contract_fn`` (pyshrink.contract) with the MLP neurons of the ``layers=`` it is given ranked by
    :func:`fisher_scores` + fluctuation on the model it contracts (the source, or the healing model of a later
    slice). The gradients are taken on contraction's own calibration windows
    (:func:`pyshrink.heal.schedule.calibration_windows`, as contraction takes them when it has no
    ``eval_text``). Calls without ``layers`` (the one-shot reference choosing its blocks) run unchanged."""

    def contract(source, **kw):
        blocks = sorted(kw.get("layers") or [])
        if not blocks:
            return contract_fn(source, **kw)
        for name in ("prune_heads", "threshold", "eval_text"):
            if kw.get(name):  # heads would call the criterion too; threshold never does; eval_text moves the windows
                raise ValueError(f"fisher_ranked ranks MLP neurons on contraction's calibration windows: "
                                 f"not with {name}")
        model, tok = models.load_model(source) if isinstance(source, str) else source
        fisher = fisher_scores(model, calibration_windows(tok, kw["calibration"], None, seq_len, kw), blocks)
        ad = adapter_for(model)
        todo = iter(blocks)  # contraction plans the pinned blocks one after another, in block order

        def criterion(layer, n_remove):
            i = next(todo)
            down = weight_out_in(ad.mlp_out_module(ad.blocks(model)[i])).detach().double()
            if layer.group != 1 or not torch.equal(layer.weight, down):
                raise RuntimeError(f"fisher_ranked: contraction asked for a ranking that is not block {i}'s neurons")
            f, fl = fisher[i], layer.stats.variance * layer.weight.pow(2).sum(0)
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
