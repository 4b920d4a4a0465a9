"""What a block's projections see on the calibration data, and where an input scale can be folded.

Inside one block (from :func:`pyshrink.layerwise.for_each_block`'s cached inputs):

* :func:`discover_groups` runs the block once with hooks and groups the projections that read the very
  same input tensor (q/k/v after one norm, gate/up, Phi's q/k/v/fc1 ...), in execution order, and lists
  for each group the modules that could have produced that input: the module whose output *is* that
  tensor, then earlier projections with as many outputs as the group has inputs.
* :func:`collect_stats` runs the block over all cached batches once and accumulates, per group, the
  Hessian ``H = X^T X`` (float32) and the native ``act_stats_`` per-channel sums (for ``mean|x|``).
* :func:`find_fold` picks the first candidate producer that can absorb ``1/s`` exactly: it applies a
  random scale, runs the block and keeps the candidate only if no token's and no channel's output
  changed beyond float rounding. So no family needs a list of "norm before q/k/v", and a fold that would change the model
  (BERT's post-norm LayerNorm also feeds the residual; a softmax or activation in between) is never made.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..arch.linears import in_features, is_projection, out_features, weight_out_in
from ..ops import act_stats_, new_accumulators


@dataclass
class Group:
    names: list  # qualified names inside the block
    modules: list
    candidates: list = field(default_factory=list)  # modules that may have produced the input, best first
    H: torch.Tensor | None = None  # sum of x x^T  [K, K]
    acc: torch.Tensor | None = None  # act_stats_ accumulators [3, K]
    count: torch.Tensor | None = None

    @property
    def K(self) -> int:
        return in_features(self.modules[0])

    @property
    def x_mean(self) -> torch.Tensor:
        """mean |x| per input channel over the calibration tokens."""
        return (self.acc[0] / self.count.clamp(min=1)).float()


def first_batch(inputs):
    """The cached inputs of the first calibration batch only."""
    return type(inputs)(hidden=inputs.hidden[:1], args=inputs.args[:1], kwargs=inputs.kwargs[:1])


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


def _is_norm_like(m: nn.Module, K: int) -> bool:
    w = getattr(m, "weight", None)
    return isinstance(w, torch.Tensor) and w.dim() == 1 and w.numel() == K and not is_projection(m)


@torch.no_grad()
def discover_groups(block: nn.Module, inputs, targets: dict) -> list[Group]:
    """Group ``targets`` (name -> projection inside ``block``) by shared input, in execution order."""
    order = []  # (kind, module or name, tensor): every call in order, tensors kept alive
    handles = []

    def pre(name):
        def hook(mod, args):
            order.append(("in", name, args[0]))
        return hook

    def post(mod, args, out):
        t = _first_tensor(out)
        if t is not None:
            order.append(("out", mod, t))

    for name, mod in targets.items():
        handles.append(mod.register_forward_pre_hook(pre(name)))
    for mod in block.modules():
        if mod is not block:
            handles.append(mod.register_forward_hook(post))
    try:
        first_batch(inputs).run(block)
    finally:
        for h in handles:
            h.remove()

    groups: list[Group] = []
    seen = set()
    for pos, (kind, who, t) in enumerate(order):
        if kind != "in" or who in seen:
            continue
        members = [n for k, n, u in order if k == "in" and u is t and n not in seen]
        members = list(dict.fromkeys(members))
        seen.update(members)
        mods = [targets[n] for n in members]
        K = in_features(mods[0])
        earlier = order[:pos]
        direct = [m for k, m, u in reversed(earlier) if k == "out" and u is t
                  and (_is_norm_like(m, K) or (is_projection(m) and out_features(m) == K))]
        cands = list(dict.fromkeys(direct + _earlier_projections(earlier, K, mods)))
        groups.append(Group(names=members, modules=mods, candidates=cands))
    return groups


def _earlier_projections(earlier, K, exclude):
    out = []
    for kind, m, _ in reversed(earlier):
        if kind == "out" and is_projection(m) and out_features(m) == K and all(m is not e for e in exclude):
            out.append(m)
    return out


@torch.no_grad()
def collect_stats(block: nn.Module, inputs, groups: list[Group]) -> None:
    """Accumulate ``H`` and ``act_stats_`` for every group over all cached batches (one block pass)."""
    handles = []
    for grp in groups:
        K = grp.K
        dev = weight_out_in(grp.modules[0]).device
        grp.H = torch.zeros(K, K, dtype=torch.float32, device=dev)
        grp.acc, grp.count = new_accumulators(K, dev)

        def hook(mod, args, grp=grp):
            x = args[0].reshape(-1, args[0].shape[-1])
            act_stats_(x, grp.acc, grp.count)
            xf = x.float()
            grp.H.addmm_(xf.T, xf)

        handles.append(grp.modules[0].register_forward_pre_hook(hook))
    try:
        inputs.run(block)
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------------------------------------------------
# folding 1/s into the producer of a group's input


@torch.no_grad()
def scale_inputs(modules, s: torch.Tensor) -> None:
    """Multiply the input columns of every projection by ``s`` (in place)."""
    for m in modules:
        w = weight_out_in(m)
        w.mul_(s.to(w.dtype))


@torch.no_grad()
def scale_outputs(producer: nn.Module, inv: torch.Tensor) -> None:
    """Multiply the producer's outputs by ``inv`` (a norm's weight and bias, or a projection's rows)."""
    if is_projection(producer):
        weight_out_in(producer).mul_(inv.to(producer.weight.dtype)[:, None])
    else:
        producer.weight.mul_(inv.to(producer.weight.dtype))
    b = getattr(producer, "bias", None)
    if isinstance(b, torch.Tensor):
        b.mul_(inv.to(b.dtype))


def fold_tolerance(dtype: torch.dtype) -> float:
    """Largest relative change of a block's output (:func:`output_change`) that :func:`find_fold` calls exact.

    Measured on SmolLM2-135M (float32, all 30 blocks, a random ``s`` in ``exp(0.5 N(0, 1))``): exact folds
    (90: into a norm, or into ``up_proj`` for ``down_proj``) change the output by at most 1.1e-6; inexact
    ones (120: ``q_proj`` for ``o_proj``, ``o_proj``/``q_proj`` for gate/up, ``gate_proj`` for ``down_proj``)
    by at least 9.5e-2, on 512 WikiText-2 tokens. 16-bit models round at
    ``eps`` of their dtype, so the bound grows with it (fp16 4e-3, bf16 3e-2).
    """
    return max(1e-4, 4.0 * torch.finfo(dtype).eps)


def output_change(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative change of ``out`` against ``ref`` per token and per channel: the largest of
    ``||out_t - ref_t|| / ||ref_t||`` over tokens ``t`` and ``||out_c - ref_c|| / ||ref_c||`` over channels ``c``.

    Not against the largest element: residual streams carry "massive activations" (SmolLM2-135M reaches
    2e4 in a few channels of a few tokens while most values stay below 10), and a tolerance relative to
    that maximum let a fold pass that rewrote the attention of every other token (``o_proj``'s 1/s in
    ``q_proj``). Per token alone would miss the same failure where an outlier channel is large in every
    token (OPT-style outlier features); per channel covers that case.
    """
    out, ref = out.float().reshape(-1, ref.shape[-1]), ref.float().reshape(-1, ref.shape[-1])
    if not torch.isfinite(out).all():
        return float("inf")
    d = out - ref
    per_token = d.norm(dim=1) / ref.norm(dim=1).clamp(min=1e-30)
    per_channel = d.norm(dim=0) / ref.norm(dim=0).clamp(min=1e-30)
    return float(torch.maximum(per_token.max(), per_channel.max()))


@torch.no_grad()
def find_fold(block: nn.Module, inputs, group: Group, reference: list, tol: float | None = None):
    """The first candidate producer that absorbs ``1/s`` without changing the block's output, or None.

    ``reference`` is the block's output on the first cached batch; a candidate is kept when
    :func:`output_change` stays within ``tol`` (default :func:`fold_tolerance` of the output's dtype).
    """
    one = first_batch(inputs)
    gen = torch.Generator().manual_seed(0)
    s = torch.exp(torch.randn(group.K, generator=gen) * 0.5).to(reference[0].device)
    ref = reference[0]
    tol = fold_tolerance(ref.dtype) if tol is None else tol
    for cand in group.candidates:
        saved = {k: v.detach().clone() for k, v in cand.state_dict().items()}
        saved_cols = [weight_out_in(m).detach().clone() for m in group.modules]
        scale_outputs(cand, 1.0 / s)
        scale_inputs(group.modules, s)
        out = one.run(block)[0]
        cand.load_state_dict(saved)
        for m, w in zip(group.modules, saved_cols):
            weight_out_in(m).copy_(w)
        if output_change(out, ref) <= tol:
            return cand
    return None
