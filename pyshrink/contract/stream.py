"""Contract a model larger than memory: one block in memory at a time, from the source's files to the output's.

The in-memory run (:func:`pyshrink.contract.contract`) observes every block on the calibration text, plans each
block's contraction, chooses the cheapest blocks, contracts them and measures the result. Streamed, that is two
walks over the blocks (:class:`pyshrink.streaming.StreamedModel`):

1. **observe**: load block ``i``, run it on the evaluation windows' source hidden states and, with the
   calibration hooks attached, on the cached calibration inputs; plan its contraction; free it. A plan's refit
   weights (a new down projection for every block) would add up to a sizeable part of the model, so they wait on
   disk (:class:`PlanSpill`) until the choice is made.
2. **contract and write**: load block ``i`` again, contract it if it was chosen, run it on the evaluation windows'
   contracted hidden states, write it to its shard and free it.

The model's own forward then turns the last block's hidden states into ``ppl_source`` and ``ppl_final``
(:func:`pyshrink.streaming.stack_replaced`), so the numbers and the files are the ones the in-memory run gives.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import models
from ..errors import InvalidSetting
from ..layerwise import BlockInputs, capture_block_inputs
from ..streaming import (Replay, ShardWriter, StreamedModel, check_same_masks, outside_blocks_params, returns_tuple,
                         saved_tensors, stack_replaced, write_rest)
from . import calibration as stats_pass
from .api import ContractionResult, apply_candidate, check_model, choose, make_summary, planner, prune_vocabulary
from .quality import Quality


class PlanSpill:
    """Keeps candidate plans' refit weights in safetensors files under ``folder`` between planning and the choice;
    what ranks the candidates (errors, kept indices) stays in memory."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir()

    def _file(self, c) -> Path:
        return self.folder / f"block-{c.index}.safetensors"

    def put(self, c):
        """Move ``c``'s weights to disk; returns ``c`` (None stays None)."""
        from safetensors.torch import save_file

        if c is None:
            return None
        tensors = {}
        for name in ("neurons", "heads"):
            plan = getattr(c, name)
            for attr in ("weight", "bias") if plan is not None else ():
                if getattr(plan, attr) is not None:
                    tensors[f"{name}.{attr}"] = getattr(plan, attr).contiguous()
                    setattr(plan, attr, None)
        save_file(tensors, self._file(c))
        return c

    def get(self, c):
        """``c`` with its weights read back."""
        from safetensors.torch import load_file

        for key, t in load_file(self._file(c)).items():
            name, attr = key.split(".")
            setattr(getattr(c, name), attr, t)
        return c

    def remove(self) -> None:
        shutil.rmtree(self.folder)


def contract_streamed(source, st, texts, out, *, overwrite: bool, progress: bool, t_start: float) -> ContractionResult:
    """:func:`pyshrink.contract.contract` with ``stream=True`` (settings validated and texts read by it)."""
    streamed = StreamedModel(source)
    model, adapter, blocks, tok = streamed.model, streamed.adapter, streamed.blocks, streamed.tokenizer
    source_name = str(source)
    check_model(model, source_name, st)
    models.check_finite(model, "contracting")  # what lies outside the blocks; each block when it is loaded
    if adapter.kind == "decoder" and texts.cal_text is None:
        raise InvalidSetting("stream=True / --stream needs calibration text for a decoder (--calibration FILE): "
                             "data-free calibration samples text from the whole model, token by token")
    torch.manual_seed(st.seed)
    texts.tokenize(model, adapter, tok, st, progress)
    check_same_masks(streamed, max(texts.cal_win.shape[1], texts.eval_win.shape[1]))
    quality = Quality(adapter.kind, texts.eval_win, progress=progress)
    store = models.storage_dtype(models.stored_float_dtype(source))
    fp = models.fingerprint(streamed.path)
    n, prefix = len(blocks), streamed.blocks_name + "."
    eval_time = contraction_time = 0.0
    with torch.no_grad(), models.atomic_output_dir(out, overwrite=overwrite) as tmp:
        spill = PlanSpill(tmp / ".plans")
        calib = capture_block_inputs(model, adapter, texts.batches(st))
        # the batches the measure runs (a batch's rows could depend on its size, in the last bits)
        b, ev = quality.batch_size, texts.eval_win
        evals = capture_block_inputs(model, adapter, [ev[i:i + b] for i in range(0, len(ev), b)])
        consume = planner(model, adapter, st)
        candidates = []
        observer = stats_pass.BlockObserver(
            adapter, lambda i, blk, obs: candidates.append(spill.put(consume(i, blk, obs))), heads=st.prune_heads,
            gram=True)
        before, as_tuple = evals.hidden, None
        params_before = outside_blocks_params(streamed)
        # 1. observe and plan every block; run the source on the evaluation windows
        for i in tqdm(range(n), desc="calibration (streamed blocks)", disable=not progress, leave=False):
            block = streamed.load_block(i)
            models.check_finite(block, "contracting", prefix=f"{prefix}{i}.")
            if as_tuple is None:
                as_tuple = returns_tuple(block, evals)
            params_before += models.num_params(block)
            t = time.perf_counter()
            before = BlockInputs(before, evals.args, evals.kwargs).run(block)
            eval_time += time.perf_counter() - t
            t = time.perf_counter()
            observer.attach(i, block, calib)
            try:
                calib = BlockInputs(calib.run(block), calib.args, calib.kwargs)
                observer.finish()  # plans block i while its weights are loaded
            finally:
                observer.detach()
            contraction_time += time.perf_counter() - t
            streamed.free_block(i)
        del calib
        t = time.perf_counter()
        before = torch.cat(before)
        with stack_replaced(blocks, Replay(before, as_tuple)):
            q_source = quality.measure(model)
        eval_time += time.perf_counter() - t
        del before
        chosen = {c.index: c for c in choose(candidates, st, stacklevel=4)}
        del candidates

        # 2. contract the chosen blocks, run the result on the evaluation windows, write every block
        writer = ShardWriter(tmp, n + 1)  # one shard per block, and one for what lies outside the blocks
        after, rows, params_after, kept_neurons = evals.hidden, [], 0, {}
        evals.hidden = []  # the embeddings' output: only ``after`` holds it now, until block 0 has run
        for i in tqdm(range(n), desc="contract (streamed blocks)", disable=not progress, leave=False):
            block = streamed.load_block(i)
            if i in chosen:
                t = time.perf_counter()
                c = spill.get(chosen.pop(i))
                rows.append(apply_candidate(model, adapter, c, st.prune_heads))
                if c.removed_neurons:
                    kept_neurons[i] = c.neurons.keep.sort().values
                del c
                contraction_time += time.perf_counter() - t
            models.round_floats_to(block, store)  # a 16-bit source's output is saved in 16 bits: measure what is saved
            t = time.perf_counter()
            after = BlockInputs(after, evals.args, evals.kwargs).run(block)
            eval_time += time.perf_counter() - t
            params_after += models.num_params(block)
            writer.write(saved_tensors(block, f"{prefix}{i}.", store))
            streamed.free_block(i)
        spill.remove()
        with stack_replaced(blocks, torch.nn.Identity()):
            models.round_floats_to(model, store)

        after = torch.cat(after)

        def measure_final() -> float:
            with stack_replaced(blocks, Replay(after, as_tuple)):
                return quality.measure(model)

        t = time.perf_counter()
        q_final = measure_final()
        vocab_info = prune_vocabulary(model, tok, texts, quality, measure_final) if st.prune_vocab else None
        eval_time += time.perf_counter() - t
        del after
        params_after += outside_blocks_params(streamed)
        summary = make_summary(source_name, fp, adapter, st, texts, quality, params_before, params_after, rows,
                               vocab_info, None, contraction_time, eval_time, q_source, q_final, t_start)
        summary["streamed"] = True
        write_rest(streamed, writer, tmp, store)
        models.write_metadata(tmp, model, {"stage": "contract", "contraction": summary,
                                           "source": {"name": source_name, "fingerprint": fp}})
    summary["out"] = str(out)
    return ContractionResult(None, tok, summary, kept_neurons, float_dtype=store)


__all__ = ["contract_streamed", "PlanSpill"]
