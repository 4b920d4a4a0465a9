"""Which blocks to contract: the ones whose measured damage is smallest.

Every block gets a candidate plan (its neurons, and heads when asked, removed at the requested ratio, with
the refit applied), and the plan's cost is the relative output error of the block it would cause on the
calibration tokens: ``E||change of the block output||^2 / E||block output||^2``. Both terms come from the
calibration statistics in closed form, so scoring all blocks costs no extra forward pass.

Post-LayerNorm blocks (BERT; OPT with do_layer_norm_before=False) are the exception. A projection's change
lands in a residual sum that a LayerNorm then rescales, so the block's own relative output error is the
change relative to that residual sum (``relative_error``, what the summary reports; on tiny random BERT and
post-norm OPT blocks it was within 10 % of the measured relative error of the block output; the norm's
per-channel gain is not in it). Blocks are still ranked by the change relative to the block output's energy
(``cost``), a figure 7-8x larger on BERT: ranking by the relative error picked worse blocks on MiniLM-L6
(3 blocks at ratio 0.5 on 8,192 WikiText tokens: embedding cosine 0.968 against 0.981 with MLP neurons
removed, 0.867 against 0.952 with heads too). Its residual sums are dominated by a few large channels, which
the relative error divides by although the norm takes them out again. The
``num_layers_to_contract`` cheapest blocks are contracted (in threshold mode, where blocks remove different
numbers of neurons, the cost per removed neuron ranks them).
"""
from __future__ import annotations

from dataclasses import dataclass

from .heads import HeadPlan
from .neurons import NeuronPlan


@dataclass
class LayerCandidate:
    index: int
    neurons: NeuronPlan | None
    heads: HeadPlan | None
    out_ms: float  # E||block output||^2 per token
    residual_ms: tuple | None = None  # post-norm blocks: E||.||^2 per token of the attention's, the MLP's residual sum

    @property
    def error(self) -> float:
        return (self.neurons.error if self.neurons else 0.0) + (self.heads.error if self.heads else 0.0)

    @property
    def cost(self) -> float:
        """What ranks the blocks: the plan's output change relative to the block output's energy (pre-norm
        blocks: the relative output error)."""
        return self.error / max(self.out_ms, 1e-30)

    @property
    def relative_error(self) -> float:
        """The block's relative output error if this plan is applied (what the summary reports)."""
        if self.residual_ms is None:
            return self.cost
        attn_ms, mlp_ms = self.residual_ms
        return ((self.neurons.error / max(mlp_ms, 1e-30) if self.neurons else 0.0)
                + (self.heads.error / max(attn_ms, 1e-30) if self.heads else 0.0))

    @property
    def removed_neurons(self) -> int:
        return self.neurons.width_before - len(self.neurons.keep) if self.neurons else 0

    @property
    def removes_something(self) -> bool:
        return self.removed_neurons > 0 or self.heads is not None


def choose(candidates: list[LayerCandidate], n: int, *, per_removed: bool = False) -> list[LayerCandidate]:
    """The ``n`` cheapest candidates (by cost, or cost per removed neuron), in block order."""
    usable = [c for c in candidates if c.removes_something]
    key = (lambda c: c.cost / max(c.removed_neurons, 1)) if per_removed else (lambda c: c.cost)
    return sorted(sorted(usable, key=key)[:n], key=lambda c: c.index)
