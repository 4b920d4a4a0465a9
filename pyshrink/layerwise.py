"""Run a model one block at a time from cached block inputs.

Contraction and quantization both work block by block: capture what enters the first block for every
calibration batch once, then for each block let a stage measure and rewrite it, run the (rewritten) block
on the cached inputs, and hand its outputs on as the next block's inputs. Only one block's activations
live at a time, and nothing outside the current block is touched, so streaming a model larger than
memory is a matter of loading each block's weights just before its turn.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm


class _StopForward(Exception):
    pass


@dataclass
class BlockInputs:
    """What enters a block for each calibration batch: hidden states and the model's keyword arguments."""
    hidden: list = field(default_factory=list)  # one [B, T, H] tensor per batch
    args: list = field(default_factory=list)  # one tuple per batch: positional arguments after the hidden states
    kwargs: list = field(default_factory=list)  # one dict per batch (masks, positions, rotary tables...)

    @torch.no_grad()
    def run(self, block) -> list:
        """The block's output hidden states for every cached batch."""
        outs = []
        for h, args, kw in zip(self.hidden, self.args, self.kwargs):
            out = block(h, *args, **kw)
            outs.append(out[0] if isinstance(out, (tuple, list)) else out)
        return outs

    @property
    def num_tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)


@torch.no_grad()
def capture_block_inputs(model, adapter, batches) -> BlockInputs:
    """Run the model's embeddings on each batch of token ids and record what the first block receives."""
    first = adapter.blocks(model)[0]
    cache = BlockInputs()

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        cache.hidden.append(args[0] if args else kwargs.pop("hidden_states"))
        cache.args.append(tuple(args[1:]))
        cache.kwargs.append(kwargs)
        raise _StopForward

    device = next(model.parameters()).device  # calibration ids usually come from the CPU (a tokenizer, a file)
    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            batch = batch.to(device)
            try:
                model(input_ids=batch, use_cache=False) if adapter.kind == "decoder" else model(input_ids=batch)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return cache


def for_each_block(model, adapter, batches, fn, *, propagate: str = "rewritten", desc: str = "blocks",
                   progress: bool = True):
    """Call ``fn(index, block, inputs)`` for every block, in order.

    ``inputs`` is the :class:`BlockInputs` of that block. ``propagate`` chooses what the next block sees:
    ``"rewritten"`` (outputs of the block after ``fn`` changed it: later blocks adapt to earlier changes,
    as GPTQ and sequential pruning do) or ``"original"`` (outputs of the unchanged block, computed before
    ``fn`` runs). Returns the list of ``fn``'s return values.
    """
    if propagate not in ("rewritten", "original"):
        raise ValueError(f"propagate must be 'rewritten' or 'original', got {propagate!r}")
    inputs = capture_block_inputs(model, adapter, batches)
    results = []
    blocks = adapter.blocks(model)
    for i in tqdm(range(len(blocks)), desc=desc, disable=not progress, leave=False):
        block = blocks[i]
        before = inputs.run(block) if propagate == "original" else None
        results.append(fn(i, block, inputs))
        nxt = before if before is not None else inputs.run(block)
        inputs = BlockInputs(hidden=nxt, args=inputs.args, kwargs=inputs.kwargs)
    return results
