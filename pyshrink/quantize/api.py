"""The quantization stage: walk the model block by block, quantize its projections, record the result.

With calibration data the walk is :func:`pyshrink.layerwise.for_each_block` (each block sees the outputs
of the already quantized blocks before it, so later blocks compensate earlier error). In every block:

1. group the projections by shared input and collect each group's ``H = X^T X`` and ``mean|x|``
   (:mod:`pyshrink.quantize.calib`);
2. for methods that search scales (awq, auto), find each group's activation-aware scale ``s`` and fold
   ``1/s`` into the op that produced the input where that is exact (a norm's weight, the previous
   projection's rows), else keep it as ``input_scale`` in the quantized layers;
3. quantize every projection with the method (:mod:`pyshrink.quantize.methods`) and swap in
   :class:`~pyshrink.quantize.linear.QuantLinear` / ``QuantLinear8``.

The output head is quantized last (only when not skipped), from the final hidden states of the
calibration data. Without data every layer is rounded to nearest, with no forward pass at all.
The model's ``pyshrink.json`` transform lists every quantized module with its shapes, so
:func:`pyshrink.load_model` rebuilds the skeleton and loads the packed tensors strictly.
"""
from __future__ import annotations

import fnmatch
import inspect
import math
import time
from dataclasses import asdict, dataclass, field, fields

import torch

from .. import data
from ..arch import adapter_for, get_path, module_name
from ..arch.linears import in_features, is_projection, weight_out_in
from ..errors import DataError, InvalidSetting
from ..models import (check_finite, id_limit, max_positions, record_transform, structure_handler, transforms_of,
                      window_length)
from . import awq
from .calib import collect_stats, discover_groups, find_fold, first_batch, scale_inputs, scale_outputs
from .config import HEAD, QuantConfig
from .grid import Grid
from .hessian import output_error
from .linear import empty_layer, is_quantized, quant_layer
from .methods import METHODS

KIND = "quantize"


@dataclass
class LayerReport:
    name: str
    bits: int
    group_size: int | None
    shape: tuple  # (out, in)
    method: str  # what produced the codes (rtn, awq-clip, gptq)
    rel_error: float  # ||X (W - Q)^T|| / ||X W^T|| on the calibration data; weight-space without data
    error_kind: str  # "output" or "weight"
    scaled: str = ""  # where AWQ's 1/s went: a module name, "input_scale", or "" (not scaled)
    bits_per_weight: float = 0.0


@dataclass
class QuantReport:
    config: dict
    method: str  # the method that ran (auto resolves to rtn without data)
    calib_tokens: int
    seconds: float
    layers: list = field(default_factory=list)
    untied_head: bool = False

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per quantized weight (codes + scales + zero points), over all quantized layers."""
        n = sum(l.shape[0] * l.shape[1] for l in self.layers)
        return sum(l.bits_per_weight * l.shape[0] * l.shape[1] for l in self.layers) / max(n, 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["bits_per_weight"] = self.bits_per_weight
        return d


# ---------------------------------------------------------------------------------------------------------
# public API


def quantize(model, bits: int = 4, group_size: int = 64, symmetric: bool = True, method: str = "auto",
             calibration=None, skip=("lm_head",), tokenizer=None, *, config: QuantConfig | None = None,
             **options):
    """Quantize ``model``'s projections in place and return it.

    ``calibration``: text (a string, a file path, a list of them; needs ``tokenizer``) or token ids
    (a 1-D LongTensor or ``[n, seq_len]`` windows). ``method``: "rtn", "awq", "gptq" or "auto" (AWQ scales,
    then per layer the best of plain rounding, clipped rounding and GPTQ; "rtn" when no calibration is given).
    ``skip``: module names or fnmatch patterns left in floating point (the output head by default).
    Other settings (``head_bits``, ``fast``, ``calib_tokens``, ``seq_len`` ...) are the fields of
    :class:`QuantConfig`, which may also be passed whole as ``config``. See :func:`quantize_model` for the
    variant that returns a per-layer :class:`QuantReport`.
    """
    if config is not None:  # the recipe is whole: a setting beside it would be ignored without a word
        defaults = inspect.signature(quantize).parameters
        given = {k: v for k, v in dict(bits=bits, group_size=group_size, symmetric=symmetric, method=method,
                                        skip=skip).items()
                 if (tuple(v) if isinstance(v, list) else v) != defaults[k].default}
        given.update(options)
        if given:
            raise InvalidSetting(f"quantize() got config= and also {', '.join(map(repr, given))}: put every setting "
                                 "in the QuantConfig (dataclasses.replace(config, ...)), or pass none as config=")
    if config is None:
        unknown = sorted(set(options) - {f.name for f in fields(QuantConfig)})
        if unknown:  # a clear error instead of the dataclass's TypeError (e.g. device=: there is none to set)
            raise InvalidSetting(f"quantize() has no setting {', '.join(map(repr, unknown))}; its settings are the "
                                 f"fields of QuantConfig: {', '.join(f.name for f in fields(QuantConfig))}")
        config = QuantConfig(bits=bits, group_size=group_size, symmetric=symmetric, method=method, skip=skip,
                             **options)
    quantize_model(model, config, calibration=calibration, tokenizer=tokenizer)
    return model


def is_quantized_model(model) -> bool:
    return any(rec.get("kind") == KIND for rec in transforms_of(model)) or any(
        is_quantized(m) for m in model.modules())


def calibration_batches(model, cfg: QuantConfig, calibration, tokenizer, adapter) -> list:
    """Token windows ``[batch, seq_len]`` for calibration (checked: enough tokens, a tokenizer for text)."""
    if calibration is None:
        return []
    limit = max_positions(model.config)
    seq_len = window_length(model, cfg.seq_len)
    if isinstance(calibration, torch.Tensor):
        ids = data.as_ids(calibration, "calibration text")
        if ids.dim() > 2:
            raise DataError(f"calibration ids must be 1-D (a token stream) or [n, seq_len] windows, got shape "
                            f"{tuple(ids.shape)}")
        if ids.dim() == 2:
            seq_len, ids = ids.shape[1], ids.reshape(-1)
            if limit and seq_len > limit:
                raise DataError(f"calibration windows of {seq_len} tokens are longer than the model's {limit} "
                                "positions: pass shorter windows, or a 1-D tensor of ids to be cut at seq_len")
    else:
        if tokenizer is None:
            raise DataError("calibration text needs the model's tokenizer (pass tokenizer=...)")
        ids = data.tokenize(tokenizer, data.read_texts(calibration))
    need = max(cfg.min_calib_tokens, seq_len)
    if ids.numel() < need:
        raise DataError(f"the calibration text has {ids.numel()} tokens; quantization with calibration needs at "
                        f"least {need} (min_calib_tokens={cfg.min_calib_tokens}, windows of {seq_len}); "
                        f"{cfg.calib_tokens} are used when available")
    win = data.windows(ids, seq_len, cfg.calib_tokens, what="calibration text", vocab=id_limit(model))
    return [win[i:i + cfg.batch_size] for i in range(0, len(win), cfg.batch_size)]


def _subpaths(name: str) -> list:
    """Every run of consecutive dotted parts of ``name`` ("a.b.c": a, a.b, a.b.c, b, b.c, c)."""
    parts = name.split(".")
    return [".".join(parts[i:j]) for i in range(len(parts)) for j in range(i + 1, len(parts) + 1)]


def _matches(name: str, pattern: str) -> bool:
    """Whether skip ``pattern`` names the module ``name`` or a module it sits in: an fnmatch pattern against the
    qualified name or any run of its parts ("down_proj", "self_attn", "mlp.*", "model.layers.0.*")."""
    return any(fnmatch.fnmatchcase(sub, pattern) for sub in _subpaths(name))


def _skipped(name: str, patterns) -> bool:
    return any(_matches(name, p) for p in patterns)


def _check_skip(model, adapter, patterns) -> None:
    """A skip pattern that names no projection of the model is a mistake (a typo, another family's names)
    that would quietly quantize what the user meant to keep; patterns that keep every projection in float
    ("model", GPT-2's "h"; the head is skipped too) would quietly quantize nothing: refuse both. Skipping every
    block but quantizing the head is allowed."""
    projections = [(n, m) for n, m in model.named_modules() if is_projection(m)]
    names = [n for n, _ in projections]
    unknown = [p for p in patterns if p != HEAD and not any(_matches(n, p) for n in names)]
    if unknown:
        raise InvalidSetting(f"skip pattern(s) {', '.join(map(repr, unknown))} match no projection of this model "
                             f"(its projections are named like {', '.join(names[:3])}, ...)")
    head = adapter.output_head(model)
    blocks = [n for n, m in projections if m is not head]
    if blocks and all(_skipped(n, patterns) for n in blocks) and head_to_quantize(model, adapter, patterns) is None:
        raise InvalidSetting(f"skip {tuple(patterns)!r} keeps every projection in floating point: "
                             "nothing would be quantized (name the modules to keep, e.g. 'down_proj' or "
                             "'model.layers.0.*')")


def _bits_per_weight(bits: int, group_size: int, symmetric: bool, N: int, K: int) -> float:
    if bits == 8:
        return 8.0 + 32.0 / K
    nb = math.ceil(K / group_size)
    stored = N * nb * group_size * 4 + N * nb * 32 + (0 if symmetric else N * math.ceil(nb / 2) * 8)
    return stored / (N * K)


class _Stage:
    """One quantization run: the resolved method and config, and the records it accumulates."""

    def __init__(self, model, cfg: QuantConfig, method, adapter, t0: float):
        self.model, self.cfg, self.method, self.adapter = model, cfg, method, adapter
        self.specs: dict = {}
        self.layers: list[LayerReport] = []
        self.head_H = None
        self.t0 = t0  # when the run started (the report's seconds)

    def grid(self, bits: int, K: int) -> Grid:
        return Grid.for_layer(bits, self.cfg.group_size, self.cfg.symmetric, K)

    def replace(self, parent, local_name: str, qualname: str, module, bits: int, H, input_scale=None,
                scaled: str = "", method=None):
        """Quantize ``module`` (weights as they are now) and put the quantized layer in its place."""
        method = method or self.method
        w = weight_out_in(module).detach().float()
        N, K = w.shape
        grid = self.grid(bits, K)
        buffers, deq, label = method.quantize(w, H, grid, self.cfg)
        if H is not None:
            ref = float(output_error(w, H))
            rel, kind = math.sqrt(float(output_error(deq - w, H)) / max(ref, 1e-30)), "output"
        else:
            rel, kind = float((deq - w).norm() / w.norm().clamp(min=1e-30)), "weight"
        bias = module.bias.detach() if getattr(module, "bias", None) is not None else None
        new = quant_layer(bits, buffers, K, bias=bias, input_scale=input_scale, fast=self.cfg.fast)
        new.to(w.device)
        parent.set_submodule(local_name, new)
        self.specs[qualname] = {"bits": bits, "in": K, "out": N, "bias": bias is not None,
                                "group_size": self.cfg.group_size if bits == 4 else None,
                                "symmetric": self.cfg.symmetric if bits == 4 else True,
                                "input_scale": input_scale is not None, "fast": self.cfg.fast}
        self.layers.append(LayerReport(qualname, bits, self.cfg.group_size if bits == 4 else None, (N, K), label,
                                       rel, kind, scaled,
                                       _bits_per_weight(bits, self.cfg.group_size, self.cfg.symmetric, N, K)))

    # ---- one block, with calibration data -------------------------------------------------------------
    def block_calibrated(self, i, block, inputs, prefix: str, last: bool):
        targets = {n: m for n, m in block.named_modules() if is_projection(m) and not _skipped(prefix + n, self.cfg.skip)}
        if not targets:
            return
        groups = discover_groups(block, inputs, targets)
        collect_stats(block, inputs, groups)
        names = {id(m): n for n, m in block.named_modules()}
        plans = []  # (group, input_scale or None, label)
        reference = first_batch(inputs).run(block) if self.method.searches_scales else None
        for grp in groups:
            input_scale, label = None, ""
            if self.method.searches_scales:
                grids = [self.grid(self.cfg.bits, in_features(m)) for m in grp.modules]
                ws = [weight_out_in(m).detach().float() for m in grp.modules]
                s, best, base = awq.search_scale(ws, grids, grp.H, grp.x_mean, self.cfg.awq_grid)
                if best < base:
                    producer = find_fold(block, inputs, grp, reference)
                    if producer is not None:
                        scale_outputs(producer, 1.0 / s)
                        scale_inputs(grp.modules, s)
                        label = prefix + names.get(id(producer), "?")
                    elif self.cfg.scale_unfoldable:
                        input_scale, label = 1.0 / s, "input_scale"
                    else:
                        s = None
                    if s is not None:
                        grp.H.div_(s[:, None] * s[None, :])
            plans.append((grp, input_scale, label))
        for grp, input_scale, label in plans:  # unfoldable scales go into the weights only now (see find_fold)
            if input_scale is not None:
                scale_inputs(grp.modules, 1.0 / input_scale)
        for grp, input_scale, label in plans:
            for name, mod in zip(grp.names, grp.modules):
                self.replace(block, name, prefix + name, mod, self.cfg.bits, grp.H, input_scale, label)
            grp.H = None
        if last:
            self.head_H = self._head_hessian(inputs, block)

    def _head_hessian(self, inputs, block):
        """``H`` of the output head's input: the last block's outputs through the final norm (None when the head is
        not quantized, or its input is not the final norm's output: e.g. post-norm OPT has no final norm)."""
        found = head_to_quantize(self.model, self.adapter, self.cfg.skip)
        if found is None or self.adapter.final_norm is None:
            return None
        head = found[0]
        norm = get_path(self.model.base_model, self.adapter.final_norm)
        if norm is None:
            return None
        K = in_features(head)
        H = None
        with torch.no_grad():
            for out in inputs.run(block):
                x = norm(out).reshape(-1, out.shape[-1]).float()
                if x.shape[-1] != K:
                    return None
                H = x.T @ x if H is None else H.addmm_(x.T, x)
        return H

    # ---- one block, without data ----------------------------------------------------------------------
    def block_data_free(self, block, prefix: str):
        for n, m in list(block.named_modules()):
            if is_projection(m) and not _skipped(prefix + n, self.cfg.skip):
                self.replace(block, n, prefix + n, m, self.cfg.bits, None)

    # ---- the output head -------------------------------------------------------------------------------
    def head(self) -> bool:
        """Quantize the output head unless skipped; returns whether a tied head was untied."""
        found = head_to_quantize(self.model, self.adapter, self.cfg.skip)
        if found is None:
            return False
        head, name = found
        emb = self.adapter.embedding(self.model)
        tied = emb is not None and head.weight is emb.weight
        method = self.method if self.head_H is not None else METHODS["rtn"]
        self.replace(self.model, name, name, head, self.cfg.head_bits or self.cfg.bits, self.head_H, method=method)
        if tied:
            _untie(self.model)
        return tied


def head_to_quantize(model, adapter, skip):
    """``(head, name)`` of the output head if the settings quantize it, else None. A head that is asked for but is
    not a Linear is an error, checked before anything is quantized, rather than left in float unasked."""
    head = adapter.output_head(model)
    name = None if head is None else module_name(model, head)
    # "lm_head" in skip means the output head, whatever the architecture calls it (BERT: cls.predictions.decoder)
    if name is None or _skipped(name, skip) or HEAD in skip:
        return None
    if not is_projection(head):
        raise InvalidSetting(f"the output head {name} is a {type(head).__name__} (e.g. the vocabulary-pruned head of "
                             "`contract --prune-vocab`), which the quantizer cannot pack; keep it in float: leave "
                             f"{name} in skip (the default) and head_bits / --head-bits unset")
    return head, name


def method_for(cfg: QuantConfig, has_data: bool):
    """The method ``cfg.method`` resolves to with or without calibration data; one that needs data it was not
    given is an error (callers check this before loading or measuring anything)."""
    method = METHODS[cfg.method].resolve(has_data)
    if method.needs_data and not has_data:
        raise DataError(f"method {cfg.method!r} needs calibration text (at least {cfg.min_calib_tokens} tokens; "
                        f"{cfg.calib_tokens} are used when available); use method='rtn' to quantize without data")
    return method


def _untie(model) -> None:
    """The head is quantized now, the embedding is not: the config must not tie them on reload."""
    for cfg in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        if hasattr(cfg, "tie_word_embeddings"):
            cfg.tie_word_embeddings = False


def quantize_model(model, config: QuantConfig, calibration=None, tokenizer=None) -> QuantReport:
    """Quantize ``model`` in place as :func:`quantize` does; returns the per-layer :class:`QuantReport`."""
    stage, batches = prepare(model, config, calibration, tokenizer)
    blocks = stage.adapter.blocks(model)
    blocks_name = module_name(model, blocks)
    n = len(blocks)
    with torch.no_grad():
        if batches:
            from ..layerwise import for_each_block

            for_each_block(model, stage.adapter, batches,
                           lambda i, b, inp: stage.block_calibrated(i, b, inp, f"{blocks_name}.{i}.", i == n - 1),
                           propagate="rewritten", desc="quantize", progress=stage.cfg.progress)
        else:
            for i, block in enumerate(blocks):
                stage.block_data_free(block, f"{blocks_name}.{i}.")
    return finish(stage, batches)


def prepare(model, config: QuantConfig, calibration=None, tokenizer=None) -> tuple:
    """Check the model and settings (nothing is changed on an error) and make the calibration windows: returns the
    run's :class:`_Stage` and its calibration batches (none without data). The blocks are then walked, in memory
    (:func:`quantize_model`) or streamed from disk (:mod:`pyshrink.quantize.stream`), and :func:`finish`
    quantizes the head and records the result."""
    if not isinstance(model, torch.nn.Module):
        raise InvalidSetting(f"quantize() quantizes a loaded model in place, got a {type(model).__name__}: load it "
                             "first (model, tok = pyshrink.load_model(...)), or use `pyshrink quantize SOURCE -o OUT`")
    cfg = config.validate()
    adapter = adapter_for(model)
    if is_quantized_model(model):
        raise InvalidSetting("the model is already quantized (it holds QuantLinear layers / its pyshrink.json "
                             "records a quantize step); quantize the floating-point model instead")
    _check_skip(model, adapter, cfg.skip)
    head_to_quantize(model, adapter, cfg.skip)  # a head that cannot be packed fails here, before any change
    check_finite(model, "quantizing")  # a NaN weight would become a NaN scale for its whole group, silently
    method = method_for(cfg, calibration is not None)
    t0 = time.perf_counter()
    model.eval()
    batches = calibration_batches(model, cfg, calibration, tokenizer, adapter) if method.needs_data or (
        calibration is not None) else []
    return _Stage(model, cfg, method, adapter, t0), batches


def finish(stage: "_Stage", batches) -> QuantReport:
    """Quantize the output head (after every block) and record the run in the model's transforms."""
    with torch.no_grad():
        untied = stage.head()
    cfg, method = stage.cfg, stage.method
    report = QuantReport(config=cfg.to_dict(), method=method.name,
                         calib_tokens=sum(b.numel() for b in batches), seconds=time.perf_counter() - stage.t0,
                         layers=stage.layers, untied_head=untied)
    record_transform(stage.model, KIND, config=cfg.to_dict(), method=method.name, modules=stage.specs,
                     untied_head=untied)
    return report


@structure_handler(KIND)
def _replay(model, record) -> None:
    """Give an empty skeleton the quantized layers a saved model was written with."""
    if record.get("untied_head"):
        _untie(model)
    first = next(model.parameters())  # an empty skeleton (meta parameters) gets meta layers: no zeros to allocate
    for name, spec in record["modules"].items():
        model.set_submodule(name, empty_layer(spec, dtype=first.dtype, device=first.device))
