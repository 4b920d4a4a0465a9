"""Models larger than memory: weights stay on disk until their block's turn, results go to disk block by block.

:class:`StreamedModel` builds the model with its parameters on the meta device (no memory; buffers such as
rotary frequencies are real), loads what lies outside the blocks (embeddings, final norm, head) from the
source's safetensors files, and loads one block at a time on request. :class:`ShardWriter` writes each finished
block to its own shard of the output, in the layout ``save_pretrained`` gives (same keys, index file), so the
result loads like any other pyshrink folder. With :mod:`pyshrink.layerwise` caching what enters a block, peak
memory is one block's float weights, what lies outside the blocks and the cached activations, not the model.

:func:`stack_replaced` runs the model's own forward (embeddings, masks, final norm, head, loss) around
hidden states computed block by block: it is how streamed runs measure perplexity with the same code as
loaded models.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import nn

from .arch import adapter_for, module_name
from .errors import InvalidSetting, ModelLoadError
from .ops.memory import release_freed_memory
from .models import (load_tokenizer, model_class, num_params, open_safetensors, read_config, read_metadata, resolve,
                     require_weights, retie, safetensors_files, skeleton, sliding_windows)


class _Checkpoint:
    """The tensors of a folder's .safetensors files, read a few at a time (never a pickle). Files are opened only
    while their tensors are read: an open file stays memory-mapped, and the pages read through the mapping would
    stay in the process's resident memory, a whole model's worth by the last block."""

    def __init__(self, path: Path):
        self.where = {}  # key -> file
        for f in safetensors_files(path):
            with open_safetensors(f) as handle:
                self.where.update((k, f) for k in handle.keys())

    def read(self, keys) -> dict:
        """``{key: tensor}`` for ``keys``, each file opened once."""
        by_file = {}
        for k in keys:
            by_file.setdefault(self.where[k], []).append(k)
        out = {}
        for f, ks in by_file.items():
            with open_safetensors(f) as handle:
                out.update((k, handle.get_tensor(k)) for k in ks)
        return out


def _checkpoint_keys(model, ckpt: _Checkpoint) -> dict:
    """``{model key: checkpoint key}`` for every tensor of the model the checkpoint holds. A checkpoint of the base
    model loads into a model with a head and the other way round, as in transformers (``base_model_prefix``)."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    found = {}
    for key in model.state_dict(keep_vars=True):
        for cand in (key, key[len(prefix) + 1:] if prefix and key.startswith(prefix + ".") else None,
                     f"{prefix}.{key}" if prefix else None):
            if cand is not None and cand in ckpt.where:
                found[key] = cand
                break
    return found


def _put(model, key: str, tensor: torch.Tensor) -> None:
    owner_name, _, name = key.rpartition(".")
    owner = model.get_submodule(owner_name)
    if name in owner._parameters:
        owner._parameters[name] = nn.Parameter(tensor, requires_grad=owner._parameters[name].requires_grad)
    else:
        owner._buffers[name] = tensor


class StreamedModel:
    """A local safetensors model with only its non-block weights in memory; :meth:`load_block` / :meth:`free_block`
    bring one block's weights in and out. ``model`` is a transformers model like any other, except that the blocks
    not loaded hold meta tensors."""

    def __init__(self, source, dtype: torch.dtype = torch.float32):
        kind, path = resolve(source)
        if kind != "folder":
            what = {"gguf": "a GGUF file", "hub": "a model hub id", "embedded": "an embedded model"}.get(kind, kind)
            raise ModelLoadError(f"streaming reads a local folder of .safetensors files, and {source} is {what}: "
                                 "load it whole (without --stream)")
        self.path, self.dtype = Path(path), dtype
        config = read_config(self.path)
        transforms = read_metadata(self.path).get("transforms", [])
        self.model = skeleton(self.path, config, model_class(config), transforms, dtype, empty=True).eval()
        if self.model.can_generate() and (self.path / "generation_config.json").is_file():  # as from_pretrained
            from transformers import GenerationConfig

            self.model.generation_config = GenerationConfig.from_pretrained(self.path)
        self.tokenizer = load_tokenizer(self.path)
        self.adapter = adapter_for(self.model)
        self.blocks = self.adapter.blocks(self.model)
        self.blocks_name = module_name(self.model, self.blocks)
        self._ckpt = _Checkpoint(self.path)
        self._keys = _checkpoint_keys(self.model, self._ckpt)
        require_weights(self.model, self.path,
                        [k for k in self.model.state_dict(keep_vars=True) if k not in self._keys])
        self._load(lambda k: not k.startswith(self.blocks_name + "."))
        retie(self.model)
        left = [n for n, p in self.model.named_parameters() if p.is_meta and not n.startswith(self.blocks_name + ".")]
        if left:
            raise ModelLoadError(f"weights in {self.path} leave {left[:5]} outside the blocks unset")

    def _load(self, wanted) -> None:
        keys = {key: ck for key, ck in self._keys.items() if wanted(key)}
        tensors = self._ckpt.read(keys.values())
        for key, ck in keys.items():
            t = tensors[ck]  # two names may read one tensor
            _put(self.model, key, t.to(self.dtype) if t.is_floating_point() else t)

    def load_block(self, i: int) -> nn.Module:
        prefix = f"{self.blocks_name}.{i}."
        self._load(lambda k: k.startswith(prefix))
        block = self.blocks[i]
        unset = [n for n, p in block.named_parameters() if p.is_meta]
        if unset:
            raise ModelLoadError(f"weights in {self.path} leave {prefix}{unset[0]} unset")
        return block

    def free_block(self, i: int) -> None:
        self.blocks[i].to("meta")
        release_freed_memory()


@contextlib.contextmanager
def stack_replaced(blocks: nn.ModuleList, stand_in: nn.Module):
    """``blocks`` holds only ``stand_in`` for the duration (the model's forward runs it in place of every block)."""
    saved = dict(blocks._modules)
    blocks._modules.clear()
    blocks.append(stand_in)
    try:
        yield
    finally:
        blocks._modules.clear()
        blocks._modules.update(saved)


class Replay(nn.Module):
    """Stands in for the whole stack of blocks: returns, for each batch the model runs, the next rows of
    ``hidden`` (the last block's outputs for the same windows, in order, computed block by block), in the form the
    real blocks return (``as_tuple``)."""

    def __init__(self, hidden, as_tuple: bool):
        super().__init__()
        self.hidden = torch.cat(hidden) if isinstance(hidden, (list, tuple)) else hidden  # batches, or concatenated
        self.as_tuple, self.pos = as_tuple, 0

    def forward(self, hidden_states, *args, **kwargs):
        n = hidden_states.shape[0]
        out = self.hidden[self.pos:self.pos + n]
        if out.shape != hidden_states.shape:
            raise RuntimeError(f"replayed hidden states {tuple(out.shape)} do not fit the batch "
                               f"{tuple(hidden_states.shape)}: the windows differ from the ones computed")
        self.pos += n
        return (out.to(hidden_states.dtype),) if self.as_tuple else out.to(hidden_states.dtype)


def check_same_masks(streamed: "StreamedModel", length: int) -> None:
    """Refuse a model whose blocks see different attention masks on ``length``-token windows (sliding-window layers
    mixed with full-attention ones, the window shorter than ``length``): the blocks are run from what the first one
    receives, its mask included (:mod:`pyshrink.layerwise`), so the streamed perplexities would not be the model's."""
    windows = sliding_windows(streamed.model.config, len(streamed.blocks))
    if len({w if w is not None and w < length else None for w in windows}) > 1:
        raise InvalidSetting(f"{streamed.path} mixes sliding-window layers (window {max(w or 0 for w in windows)}) "
                             f"with full-attention ones, and the {length}-token windows are longer than that window: "
                             "streaming runs every block with the first block's attention mask. Stream with windows "
                             "no longer than the sliding window (quantize --seq-len, contract(seq_len=...)), or run "
                             "without --stream")


def returns_tuple(block: nn.Module, inputs) -> bool:
    """Whether ``block`` returns a tuple (the model's forward expects its blocks' form: :class:`Replay` answers
    alike); runs it on the first cached batch of ``inputs`` (:class:`pyshrink.layerwise.BlockInputs`)."""
    with torch.no_grad():
        out = block(inputs.hidden[0], *inputs.args[0], **inputs.kwargs[0])
    return isinstance(out, (tuple, list))


def _tied_copies(model, state: dict) -> set:
    """Keys ``save_pretrained`` leaves out: a tied parameter's second name (the head tied to the embeddings)."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return {t for t, s in tied.items() if t in state and s in state and state[t] is state[s]}


def write_rest(streamed: "StreamedModel", writer: "ShardWriter", folder: Path, float_dtype: torch.dtype | None) -> None:
    """Finish a streamed folder once every block is written: the last shard (what lies outside the blocks), the
    index, the config (stamped as ``save_pretrained`` stamps it), the generation config and the tokenizer."""
    model = streamed.model
    with stack_replaced(streamed.blocks, nn.Identity()):
        state = model.state_dict(keep_vars=True)
        writer.write(saved_tensors(model, "", float_dtype, skip=_tied_copies(model, state)))
    writer.finish()
    model.config.architectures = [type(model).__name__]
    model.config.dtype = str(float_dtype or model.dtype).split(".")[1]
    model.config.save_pretrained(folder)
    if model.can_generate():
        model.generation_config.save_pretrained(folder)
    if streamed.tokenizer is not None:
        streamed.tokenizer.save_pretrained(folder)


def outside_blocks_params(streamed: "StreamedModel") -> int:
    """Parameters outside the blocks, each tensor once (:func:`pyshrink.models.num_params` of the rest)."""
    with stack_replaced(streamed.blocks, nn.Identity()):
        return num_params(streamed.model)


class ShardWriter:
    """Writes a model's tensors to ``folder`` one part at a time: ``model-0000i-of-0000n.safetensors`` plus
    ``model.safetensors.index.json``, as ``save_pretrained`` lays out a sharded save."""

    def __init__(self, folder: Path, parts: int):
        self.folder, self.parts, self.written = Path(folder), parts, 0
        self.weight_map, self.total = {}, 0

    def write(self, tensors: dict) -> None:
        from safetensors.torch import save_file

        self.written += 1
        if self.written > self.parts:
            raise RuntimeError(f"ShardWriter was told of {self.parts} parts and given more")
        name = f"model-{self.written:05d}-of-{self.parts:05d}.safetensors"
        tensors = {k: t.detach().contiguous() for k, t in tensors.items()}
        save_file(tensors, self.folder / name, metadata={"format": "pt"})
        for k, t in tensors.items():
            self.weight_map[k] = name
            self.total += t.numel() * t.element_size()

    def finish(self) -> None:
        if self.written != self.parts:
            raise RuntimeError(f"ShardWriter wrote {self.written} of its {self.parts} parts")
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def saved_tensors(module, prefix: str, float_dtype: torch.dtype | None, skip=()) -> dict:
    """What ``save_pretrained`` writes of ``module`` (its state dict, keys under ``prefix``), floating-point
    parameters in ``float_dtype`` (buffers, such as quantized layers' float32 scales, as they are); ``skip``:
    keys left out (tied copies)."""
    out = {}
    for k, t in module.state_dict(prefix=prefix, keep_vars=True).items():
        if k in skip:
            continue
        is_param = isinstance(t, nn.Parameter)
        t = t.detach()
        out[k] = t.to(float_dtype) if float_dtype is not None and is_param and t.is_floating_point() else t
    return out


__all__ = ["StreamedModel", "ShardWriter", "Replay", "stack_replaced", "saved_tensors", "returns_tuple", "write_rest",
           "check_same_masks", "outside_blocks_params"]
