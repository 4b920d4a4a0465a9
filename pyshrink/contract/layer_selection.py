"""Which blocks to contract: the ones whose measured damage is smallest.

Every block gets a candidate plan (its neurons, and heads when asked, removed at the requested ratio, with
the refit applied), and the plan's cost is the relative output error of the block it would cause on the
calibration tokens: ``E||change of the block output||^2 / E||block output||^2``. Both terms come from the
calibration statistics in closed form, so scoring all blocks costs no extra forward pass. In post-LayerNorm
blocks (BERT) each sub-block's change is relative to its residual sum instead, the input of the norm it lands
in: the output after the norm is on another scale, and the norm passes on a relative change. The
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
    out_ms: float  # E||block output||^2 per token (post-norm blocks: of the MLP's residual sum)
    attn_ms: float | None = None  # post-norm blocks: E||attention's residual sum||^2 per token; else out_ms

    @property
    def cost(self) -> float:
        """Relative output error of the block if this plan is applied."""
        mlp = self.neurons.error / max(self.out_ms, 1e-30) if self.neurons else 0.0
        attn_ms = self.out_ms if self.attn_ms is None else self.attn_ms
        return mlp + (self.heads.error / max(attn_ms, 1e-30) if self.heads else 0.0)

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
