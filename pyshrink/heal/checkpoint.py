"""Checkpoints of a healing run, written so that an interruption at any moment leaves a usable folder.

``OUT/checkpoint-best`` and ``OUT/checkpoint-last`` are ordinary pyshrink model folders (``load_model``
reads them), each replaced atomically as a whole. ``checkpoint-last`` also holds what ``resume`` needs:
``trainer_state.json`` (step, tokens, curve, settings) and ``optimizer.pt`` (AdamW moments and the RNG
state: tensors only, read back with ``torch.load(weights_only=True)``, so nothing is ever unpickled).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .. import jsonio, models
from ..errors import ModelLoadError, PyshrinkError

BEST = "checkpoint-best"
LAST = "checkpoint-last"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
REPORT_FILE = "heal.json"


class CheckpointError(PyshrinkError):
    pass


def write_json_atomic(path: Path, obj) -> None:
    with models.atomic_file(path) as tmp:
        tmp.write_text(jsonio.dumps(obj, indent=2))


def save_checkpoint(folder: Path, model, tokenizer, *, metadata: dict, state: dict | None = None,
                    optimizer: torch.optim.Optimizer | None = None, rng: dict | None = None) -> Path:
    """Write the model (and, for ``checkpoint-last``, the trainer and optimizer state) as one atomic folder.
    ``rng``: the random state to save with the optimizer (default: the current one, see :func:`rng_state`)."""
    with models.atomic_output_dir(folder, overwrite=True) as tmp:
        models.save(model, tokenizer, tmp, metadata=metadata, overwrite=True)
        if optimizer is not None:
            torch.save({"optimizer": optimizer.state_dict(), **(rng or rng_state())}, tmp / OPTIMIZER_FILE)
        if state is not None:  # written last: its presence marks a complete resumable checkpoint
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=2, default=str))
    return folder


def load_weights(model, folder: Path) -> None:
    """Copy the weights saved in ``folder`` into ``model`` (whose structure must match: strict)."""
    try:
        sd = models.read_state_dict(Path(folder))
    except ModelLoadError as exc:  # raised as the checkpoint's own error, which `heal --resume` reports
        raise CheckpointError(str(exc)) from exc
    own = model.state_dict()
    tied = getattr(model.config, "tie_word_embeddings", False)
    missing = [k for k in own if k not in sd and not (tied and k.endswith("lm_head.weight"))]
    missing = models.required(model, missing)
    unexpected = [k for k in sd if k not in own]
    wrong = [k for k in sd if k in own and own[k].shape != sd[k].shape]
    if missing or unexpected or wrong:
        raise CheckpointError(f"the checkpoint in {folder} does not fit this student (is it the same student the "
                              f"run started from?): missing {missing[:3]}, unexpected {unexpected[:3]}, "
                              f"different shapes {wrong[:3]}")
    with torch.no_grad():
        for k, v in sd.items():
            own[k].copy_(v)


def rng_state() -> dict:
    """The random state a resumed run needs to draw what the uninterrupted run would have drawn (dropout
    masks on a GPU come from the CUDA generators)."""
    state = {"rng": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(blob: dict) -> None:
    torch.set_rng_state(blob["rng"].cpu())
    if "cuda_rng" in blob and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in blob["cuda_rng"]])


def load_state(folder: Path) -> tuple[dict, dict]:
    """(trainer state, {"optimizer": ..., "rng": ..., ["cuda_rng": ...]}) of a resumable checkpoint. Loaded
    on the CPU: ``Optimizer.load_state_dict`` moves the moments to each parameter's device, while AdamW's
    step counters must stay CPU scalars (on a GPU, every step would read each one back with a sync)."""
    state_file, opt_file = Path(folder) / STATE_FILE, Path(folder) / OPTIMIZER_FILE
    if not state_file.is_file() or not opt_file.is_file():
        raise CheckpointError(f"{folder} is not a resumable checkpoint (it lacks {STATE_FILE} or {OPTIMIZER_FILE})")
    try:
        state = json.loads(state_file.read_text())
        blob = torch.load(opt_file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read the checkpoint state in {folder}: {exc}") from exc
    return state, blob


def has_resumable(out: Path) -> bool:
    return (Path(out) / LAST / STATE_FILE).is_file()


def recover_checkpoints(out: Path) -> list:
    """Put back checkpoints that a kill interrupted mid-replacement; returns the names put back.

    A checkpoint is replaced by two renames (models.atomic_output_dir: the old folder aside as ``.NAME.old-PID``,
    then the new one in place). A kill between them leaves only the set-aside copy; the newest such copy of a
    missing checkpoint is the last one written, so it goes back in place."""
    restored = []
    for name in (BEST, LAST):
        target = Path(out) / name
        olds = [p for p in Path(out).glob(f".{name}.old-*") if p.is_dir()]
        if target.exists() or not olds:
            continue
        os.replace(max(olds, key=lambda p: p.stat().st_mtime_ns), target)
        restored.append(name)
    return restored
