"""What the teacher says about a window, computed once: its top-k next-token log-probabilities.

The teacher's forward pass costs as much as the student's, and a healing run, the slices of an iterative
schedule, or a benchmark comparing heals all show the teacher the same windows again. With
``teacher_topk=k`` each window's teacher targets are reduced to the ``k`` most likely tokens per position
(log-probabilities at the distillation temperature, and their ids) and kept in a :class:`TeacherCache`;
the loss then compares distributions over those ``k`` tokens plus one bucket holding the rest of the
vocabulary (:func:`pyshrink.heal.losses.topk_kl`). A cached window costs ~0.3 MB (k=64, 512 tokens).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class TopkTargets:
    logp: torch.Tensor  # [B, T, k] teacher log-probabilities (softened by the temperature) of the top-k tokens
    idx: torch.Tensor  # [B, T, k] their token ids
    hidden_states: tuple | None = None


class TeacherCache:
    """Window (token ids) -> the teacher's top-k targets; shareable between heals with the same teacher."""

    def __init__(self, k: int = 64):
        if k < 1:
            raise ValueError(f"teacher top-k must be >= 1, got {k}")
        self.k = k
        self.hits = self.misses = 0
        self._store: dict = {}
        self._teacher = None

    def __len__(self) -> int:
        return len(self._store)

    @staticmethod
    def _key(window: torch.Tensor, temperature: float) -> bytes:
        return hashlib.sha1(window.cpu().numpy().tobytes()).digest() + repr(float(temperature)).encode()

    @torch.no_grad()
    def targets(self, teacher, batch: torch.Tensor, temperature: float) -> TopkTargets:
        if self._teacher is None:
            self._teacher = id(teacher)
        elif self._teacher != id(teacher):
            raise ValueError("this TeacherCache was filled by another teacher model; use one cache per teacher")
        keys = [self._key(w, temperature) for w in batch]
        todo = [i for i, k in enumerate(keys) if k not in self._store]
        self.hits += len(keys) - len(todo)
        self.misses += len(todo)
        if todo:
            dev = next(teacher.parameters()).device
            logits = teacher(input_ids=batch[todo].to(dev), use_cache=False).logits.float()
            logp = F.log_softmax(logits / temperature, dim=-1)
            top = logp.topk(min(self.k, logp.shape[-1]), dim=-1)
            for j, i in enumerate(todo):
                self._store[keys[i]] = (top.values[j].cpu(), top.indices[j].to(torch.int32).cpu())
        dev = batch.device
        logp = torch.stack([self._store[k][0] for k in keys]).to(dev)
        idx = torch.stack([self._store[k][1] for k in keys]).to(dev).long()
        return TopkTargets(logp=logp, idx=idx)
