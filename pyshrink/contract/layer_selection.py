"""Which blocks to contract: the ones whose measured damage is smallest.

Every block gets a candidate plan (its neurons, and heads when asked, removed at the requested ratio, with
the refit applied), and the plan's cost is the relative output error of the block it would cause on the
calibration tokens: ``E||change of the block output||^2 / E||block output||^2``. Both terms come from the
calibration statistics in closed form, so scoring all blocks costs no extra forward pass. The
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

    @property
    def error(self) -> float:
        return (self.neurons.error if self.neurons else 0.0) + (self.heads.error if self.heads else 0.0)

    @property
    def cost(self) -> float:
        """Relative output error of the block if this plan is applied."""
        return self.error / max(self.out_ms, 1e-30)

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
