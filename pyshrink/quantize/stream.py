"""Quantize a model larger than memory: one block in memory at a time, from the source's files to the output's.

The walk is the in-memory one (:func:`pyshrink.quantize.api.quantize_model`) with the weights streamed: for each
block, load it (:class:`pyshrink.streaming.StreamedModel`), run it as the source on the evaluation windows'
"before" hidden states, quantize it from the cached calibration inputs, hand its outputs on to the next block,
run it quantized on the "after" hidden states, write it to its shard and free it. The model's own forward then
turns the last block's hidden states into the before/after perplexity (:func:`pyshrink.streaming.stack_replaced`),
so the numbers and the files are the ones the in-memory run gives.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..layerwise import BlockInputs, capture_block_inputs
from ..models import atomic_output_dir, check_finite, round_floats_to, write_metadata
from ..streaming import (Replay, ShardWriter, check_same_masks, returns_tuple, saved_tensors, stack_replaced,
                         write_rest)
from .api import finish, prepare
from .pipeline import represented_params

def quantize_streamed(streamed, config, calib_ids, quality, out, store, metadata, *, overwrite: bool = False):
    """Quantize ``streamed`` (:class:`~pyshrink.streaming.StreamedModel`) with ``config`` into the folder ``out``;
    returns ``(report, before, after, params)`` as the in-memory pipeline measures them."""

    model, adapter, blocks, tok = streamed.model, streamed.adapter, streamed.blocks, streamed.tokenizer
    stage, batches = prepare(model, config, calib_ids, tok)
    n = len(blocks)
    prefix = streamed.blocks_name + "."
    windows = quality.windows
    check_same_masks(streamed, max([windows.shape[1], *(b.shape[1] for b in batches)]))
    params = 0
    with torch.no_grad(), atomic_output_dir(out, overwrite=overwrite) as tmp:
        writer = ShardWriter(tmp, n + 1)  # one shard per block, and one for what lies outside the blocks
        calib = capture_block_inputs(model, adapter, batches) if batches else None
        # in the batches the measure runs (a batch's rows could depend on its size, in the last bits)
        b = quality.batch_size
        evals = capture_block_inputs(model, adapter, [windows[i:i + b] for i in range(0, len(windows), b)])
        before, after = evals.hidden, evals.hidden
        as_tuple = None
        for i in tqdm(range(n), desc="quantize (streamed)", disable=not stage.cfg.progress, leave=False):
            block = streamed.load_block(i)
            check_finite(block, "quantizing", prefix=f"{prefix}{i}.")
            if as_tuple is None:
                as_tuple = returns_tuple(block, evals)
            before = BlockInputs(before, evals.args, evals.kwargs).run(block)
            if calib is not None:
                stage.block_calibrated(i, block, calib, f"{prefix}{i}.", i == n - 1)
                calib = BlockInputs(calib.run(block), calib.args, calib.kwargs)  # unrounded, as in memory
            else:
                stage.block_data_free(block, f"{prefix}{i}.")
            round_floats_to(block, store)
            after = BlockInputs(after, evals.args, evals.kwargs).run(block)
            params += represented_params(block)
            writer.write(saved_tensors(block, f"{prefix}{i}.", store))
            streamed.free_block(i)
        with stack_replaced(blocks, Replay(before, as_tuple)):
            ppl_before = quality.before(model)
        report = finish(stage, batches)
        round_floats_to(model, store)
        with stack_replaced(blocks, Replay(after, as_tuple)):
            ppl_after = quality.after(model)
        with stack_replaced(blocks, torch.nn.Identity()):
            params += represented_params(model)
        write_rest(streamed, writer, tmp, store)
        write_metadata(tmp, model, metadata(report, ppl_before, ppl_after))
    return report, ppl_before, ppl_after, params


__all__ = ["quantize_streamed"]
