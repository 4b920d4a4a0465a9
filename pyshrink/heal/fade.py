"""Fade-out: remove MLP neurons gradually during training instead of at once (``heal_schedule="fade"``).

Gradual pruning (Zhu & Gupta 2017, "To prune or not to prune"; soft-masking methods): the neurons a slice will
remove are chosen first (contraction's own ranking, on the current model), then, during the next stretch of
training, their activation (the down projection's input channel) is scaled by a factor that goes from 1 to 0
while the rest of the network trains; when the factor is 0 they are cut physically. The cut then changes
nothing in the function (no perplexity jump), and the network has adapted to their loss while they faded.

What fades is the neurons' deviation from their calibration mean: channel ``j`` enters the down projection as
``f * x_j + (1 - f) * mu_j``. At ``f = 0`` the removed channels are the constant ``mu``, which the cut folds into
the down projection's bias (``b + W[:, removed] @ mu``), exactly as contraction's ``refit="mean"`` (FLAP's
compensation) does. Why the mean is kept: contraction's default criterion (``fluctuation``) removes the
channels that vary least, i.e. the ones closest to a constant; dropping that constant would shift every block's
output by ``W_removed @ mu``, which a short heal with a small learning rate on the bias cannot undo. Why
contraction's least-squares refit (``lstsq``) is *not* applied at the cut: it re-solves the kept columns and the
bias to reproduce the block's current output from the kept channels, and at ``f = 0`` that output *is* already a
function of the kept channels plus a constant, so the exact solution is the current weights and bias; the
refit's ridge damping would only pull the trained weights away from it (a perturbation, no gain), at the price
of a calibration pass. The trained kept weights have had the whole fade to take over the removed neurons' work.
The bias the cut adds is also what keeps the final size equal to one-shot contraction's (whose refit adds it).
"""
from __future__ import annotations

import torch

from ..arch import adapter_for
from ..arch.linears import in_features, weight_out_in


def fade_factor(step: int, start: int, stop: int) -> float:
    """The factor of the fading neurons during optimizer step ``step`` of a fade over steps ``[start, stop)``.

    Linear from 1 towards 0, reaching 0 in the fade's last step (``1 - (step - start + 1) / (stop - start)``):
    every step of the fade already trains without part of the neurons, the last one without them at all, and
    a measurement after it sees exactly the function the cut keeps. 1 before the fade, 0 after it.
    """
    if not stop > start:
        raise ValueError(f"a fade needs at least one step: start {start}, stop {stop}")
    if step < start:
        return 1.0
    return max(0.0, 1.0 - (step - start + 1) / (stop - start))


@torch.no_grad()
def channel_means(model, blocks, windows: torch.Tensor, *, batch_size: int = 4) -> dict:
    """``{block: mean of each down-projection input channel}`` (float64) of ``model`` over ``windows``."""
    adapter = adapter_for(model)
    mods = {i: adapter.mlp_out_module(adapter.blocks(model)[i]) for i in blocks}
    sums = {i: torch.zeros(in_features(m), dtype=torch.float64) for i, m in mods.items()}
    count = [0]

    def hook(i):
        def pre(_mod, args):
            x = args[0].detach()
            sums[i] += x.reshape(-1, x.shape[-1]).double().sum(0).cpu()
        return pre

    handles = [m.register_forward_pre_hook(hook(i)) for i, m in mods.items()]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for s in range(0, len(windows), batch_size):
            batch = windows[s:s + batch_size].to(device)
            model(input_ids=batch, use_cache=False)
            count[0] += batch.numel()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {i: v / max(count[0], 1) for i, v in sums.items()}


class Fade:
    """Fading masks on the MLP neurons of some blocks of ``model`` (hooks on their down projections).

    ``kept``: ``{block: indices of the neurons that stay}`` (as ``ContractionResult.kept_neurons``); every other
    neuron of those blocks fades. ``means``: ``{block: per-channel calibration mean}`` (:func:`channel_means`).
    The factor starts at 1 (the model's function is unchanged); :meth:`set_factor` moves it; :meth:`cut` (at
    factor 0) removes the faded neurons physically, folds their mean into the bias and takes the hooks off;
    :meth:`remove` takes the hooks off without cutting.
    """

    def __init__(self, model, kept: dict, means: dict):
        self.model, self.adapter = model, adapter_for(model)
        self.factor = 1.0
        self.kept, self.removed, self.means, self._masks, self._handles = {}, {}, {}, {}, []
        blocks = self.adapter.blocks(model)
        for i, keep in kept.items():
            down = self.adapter.mlp_out_module(blocks[i])
            width = in_features(down)
            keep = torch.as_tensor(keep, dtype=torch.long).sort().values
            gone = torch.ones(width, dtype=torch.bool)
            gone[keep] = False
            if not 0 < int(gone.sum()) < width:
                raise ValueError(f"block {i}: a fade must remove some but not all of its {width} neurons, "
                                 f"{width - len(keep)} given")
            if means[i].shape != (width,):
                raise ValueError(f"block {i}: {tuple(means[i].shape)} channel means for {width} neurons")
            self.kept[i], self.removed[i] = keep, gone.nonzero().squeeze(1)
            self.means[i] = means[i]
            self._masks[i] = gone
            self._handles += [down.register_forward_pre_hook(self._scale(i)), down.register_forward_hook(self._mean(i))]

    @property
    def blocks(self) -> list:
        return sorted(self.kept)

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def set_factor(self, factor: float) -> None:
        if not 0.0 <= factor <= 1.0:
            raise ValueError(f"the fade factor must be in [0, 1], got {factor}")
        self.factor = float(factor)

    def removed_params(self) -> int:
        """Parameters the cut will remove (rows of the up/gate projections, columns of the down projection),
        less the bias it adds to a down projection that has none."""
        n = 0
        for i, gone in self.removed.items():
            block = self.adapter.blocks(self.model)[i]
            for m in self.adapter.mlp_in_modules(block):
                n += len(gone) * (weight_out_in(m).shape[1] + (1 if m.bias is not None else 0))
            down = self.adapter.mlp_out_module(block)
            n += len(gone) * weight_out_in(down).shape[0] - (0 if down.bias is not None else weight_out_in(down).shape[0])
        return n

    # ---- the hooks: channel j enters the down projection as f * x_j + (1 - f) * mu_j ---------------------
    def _scale(self, i):
        def pre(_mod, args):
            if self.factor == 1.0:
                return None
            x = args[0]
            m = torch.where(self._masks[i].to(x.device), self.factor, 1.0).to(x.dtype)
            return (x * m, *args[1:])
        return pre

    def _mean(self, i):
        def post(mod, _args, out):
            if self.factor == 1.0:
                return None
            w = weight_out_in(mod)[:, self.removed[i].to(out.device)]
            return out + (1.0 - self.factor) * (w @ self.means[i][self.removed[i]].to(device=w.device, dtype=w.dtype))
        return post

    # ---- the end of the fade -----------------------------------------------------------------------------
    def remove(self) -> None:
        """Take the hooks off (the model's function is then the unfaded one again, unless it was cut)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    @torch.no_grad()
    def cut(self) -> dict:
        """Remove the faded neurons physically (factor must be 0): keep the kept columns of the down projection
        as trained (no refit, see the module's comment), add ``W[:, removed] @ mu`` to its bias, take the hooks
        off. Returns ``{block: kept indices}`` for :func:`~pyshrink.heal.carry.carry_optimizer_state`."""
        from ..contract import neurons

        if self.factor != 0.0:
            raise ValueError(f"cut() at fade factor {self.factor}: the faded neurons still contribute; fade to 0 first")
        self.remove()
        blocks = self.adapter.blocks(self.model)
        for i, keep in self.kept.items():
            down = self.adapter.mlp_out_module(blocks[i])
            w = weight_out_in(down).detach()
            gone = self.removed[i].to(w.device)
            shift = w[:, gone].double() @ self.means[i][self.removed[i]].to(w.device)
            bias = (down.bias.detach().double() if down.bias is not None else torch.zeros_like(shift)) + shift
            neurons.apply(self.model, self.adapter, i, keep, w[:, keep.to(w.device)].clone(), bias)
        return dict(self.kept)
