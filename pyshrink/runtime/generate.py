"""Text generation on an exported decoder: tokenizer + :class:`DecoderSession` + sampling, numpy only."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import is_int
from .session import DecoderSession, read_meta


@dataclass
class Sampling:
    """``temperature == 0`` is greedy; otherwise softmax(logits / temperature) restricted to the top-p nucleus."""
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if not (self.temperature >= 0):
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sample(logits: np.ndarray, s: Sampling, rng: np.random.Generator) -> int:
    if s.temperature == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / s.temperature
    z -= z.max()
    p = np.exp(z)
    p /= p.sum()
    if s.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        csum = np.cumsum(p[order])
        # smallest prefix with mass >= top_p; rounding can leave the whole sum a hair below a top_p near 1
        n = min(int(np.searchsorted(csum, s.top_p, side="left")) + 1, p.size)
        keep = order[:n]
        q = p[keep] / p[keep].sum()
        return int(keep[rng.choice(n, p=q)])
    return int(rng.choice(p.shape[0], p=p))


@dataclass
class Completion:
    text: str
    token_ids: list
    prompt_tokens: int
    finish_reason: str  # "stop" (an end-of-sequence token) or "length"


class OnnxLM:
    """An exported decoder folder, ready to generate: ``OnnxLM(folder).generate("prompt")``."""

    def __init__(self, folder, *, threads: int | None = None, providers=None):
        from tokenizers import Tokenizer

        self.folder = Path(folder)
        self.meta = read_meta(self.folder)
        self.session = DecoderSession(self.folder, providers=providers, threads=threads, meta=self.meta)
        tok_file = self.folder / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(f"{self.folder} has no tokenizer.json (export with a fast tokenizer)")
        self.tokenizer = Tokenizer.from_file(str(tok_file))
        self.eos_ids = set(self.meta.get("eos_token_ids") or [])
        self.max_length = self.session.max_length

    @property
    def name(self) -> str:
        return self.folder.name

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def generate_ids(self, prompt_ids, max_new_tokens: int = 32, sampling: Sampling | None = None,
                     on_token: Callable[[int], None] | None = None, stop_at_eos: bool = True,
                     stop_when: Callable[[list], bool] | None = None):
        """Generate after ``prompt_ids``; returns (new token ids, finish_reason). ``stop_when(new ids)``, asked after
        each token, ends the generation with "stop" when true (the server's stop sequences)."""
        sampling = sampling or Sampling()
        if not hasattr(prompt_ids, "__array__") and not isinstance(prompt_ids, (list, tuple)):
            prompt_ids = list(prompt_ids)  # a generator or map of ids
        if isinstance(prompt_ids, (list, tuple)) and any(isinstance(t, (bool, np.bool_)) for t in prompt_ids):
            raise ValueError("prompt ids must be integer token ids, got bool values")  # numpy would make them 0/1
        arr = np.asarray(prompt_ids)  # a list, a numpy array or a torch tensor of ids: one prompt
        if arr.ndim == 2 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.ndim != 1:
            raise ValueError(f"prompt ids must be one prompt, [n] or [1, n], got shape {arr.shape}")
        if not arr.size:
            raise ValueError("the prompt is empty (no tokens)")
        if not is_int(max_new_tokens) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        vocab = self.meta.get("vocab_size")
        if not np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_:
            raise ValueError(f"prompt ids must be integer token ids, got {arr.dtype} values")
        bad = arr[(arr < 0) | ((arr >= vocab) if vocab else False)]
        if bad.size:  # ONNX Runtime's Gather would wrap a negative id round to the end of the vocabulary
            raise ValueError(f"prompt ids must be token ids in 0..{vocab - 1 if vocab else '?'}, got {int(bad[0])}")
        prompt_ids = arr.tolist()
        room = self.max_length - len(prompt_ids)
        if room <= 0:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the model's maximum length is {self.max_length}")
        max_new = min(int(max_new_tokens), room)
        rng = np.random.default_rng(sampling.seed)
        state = self.session.new_state(len(prompt_ids) + max_new)
        logits = self.session.step(state, prompt_ids)
        out = []
        for i in range(max_new):
            tok = sample(logits, sampling, rng)
            if stop_at_eos and tok in self.eos_ids:
                return out, "stop"
            out.append(tok)
            if on_token is not None:
                on_token(tok)
            if stop_when is not None and stop_when(out):
                return out, "stop"
            if i + 1 < max_new:
                logits = self.session.step(state, [tok])
        return out, "length"

    def generate(self, prompt: str, max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None) -> Completion:
        ids = self.encode(prompt)
        new, reason = self.generate_ids(ids, max_new_tokens, Sampling(temperature, top_p, seed))
        return Completion(self.decode(new), new, len(ids), reason)
