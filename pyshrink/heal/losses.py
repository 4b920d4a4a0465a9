"""Distillation losses: what the student is trained to match.

All losses take logits ``[B, T, V]`` for the same token windows and return a scalar (float32). The
teacher's tensors must carry no graph (they come from a ``no_grad`` forward).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def next_token_ce(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Ordinary language-model loss: position ``t`` predicts token ``t + 1`` (the last position is unscored)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def softened_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(teacher_T || student_T)`` per token, averaged (Hinton et al.'s distillation term).

    Both distributions are softened by ``temperature``; the ``T^2`` factor keeps the gradient scale of the
    term independent of ``T``. Every position is scored, the last one too: the teacher's prediction of the
    token after the window is as informative as any other.
    """
    t = temperature
    s = F.log_softmax(student_logits.float() / t, dim=-1)
    with torch.no_grad():
        p = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = F.kl_div(s.flatten(0, 1), p.flatten(0, 1), log_target=True, reduction="batchmean")
    return kl * (t * t)


def topk_kl(student_logits: torch.Tensor, teacher_logp: torch.Tensor, teacher_idx: torch.Tensor,
            temperature: float) -> torch.Tensor:
    """``T^2 * KL`` over the teacher's top-k tokens plus one bucket for the rest of the vocabulary.

    ``teacher_logp``/``teacher_idx`` ``[B, T, k]`` are the teacher's softened log-probabilities of its k most
    likely tokens. Merging the other tokens into one bucket gives a lower bound of the full KL that is exact
    when k covers the vocabulary, and it needs only k numbers per position from the teacher.
    """
    t = temperature
    s = F.log_softmax(student_logits.float() / t, dim=-1)
    s_top = s.gather(-1, teacher_idx)
    p_top = teacher_logp.exp()
    p_rest = (1.0 - p_top.sum(-1)).clamp_min(0.0)
    q_rest = (-torch.expm1(torch.logsumexp(s_top, dim=-1))).clamp_min(1e-12)  # 1 - sum(q_top), stably
    kl = (p_top * (teacher_logp - s_top)).sum(-1) + p_rest * (p_rest.clamp_min(1e-12).log() - q_rest.log())
    return kl.mean() * (t * t)


def _rms_normalize(h: torch.Tensor) -> torch.Tensor:
    h = h.float()
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)


def hidden_mse(student_hidden, teacher_hidden) -> torch.Tensor:
    """MSE between RMS-normalized hidden states of corresponding blocks (contraction keeps depth: 1:1).

    ``*_hidden`` are the ``hidden_states`` tuples transformers returns (embedding output first, then one
    entry per block); the embedding output is skipped. Normalizing each token's vector makes the term
    insensitive to the very different activation scales of early and late blocks.
    """
    pairs = list(zip(student_hidden[1:], teacher_hidden[1:]))
    return sum(F.mse_loss(_rms_normalize(s), _rms_normalize(t)) for s, t in pairs) / max(1, len(pairs))


def distillation_loss(student_out, teacher_out, ids: torch.Tensor, *, temperature: float, alpha: float,
                      hidden_weight: float = 0.0) -> tuple[torch.Tensor, dict]:
    """``alpha * T^2 KL + (1 - alpha) * CE (+ hidden_weight * hidden MSE)``; returns (loss, parts as floats).

    ``alpha = 0`` is plain fine-tuning (the teacher is not needed), ``alpha = 1`` pure distillation.
    """
    ce = next_token_ce(student_out.logits, ids)
    loss = (1.0 - alpha) * ce
    parts = {"ce": ce.item()}
    if alpha > 0:
        dev = student_out.logits.device
        if getattr(teacher_out, "idx", None) is not None:  # cached top-k targets (pyshrink.heal.teacher)
            kl = topk_kl(student_out.logits, teacher_out.logp.to(dev), teacher_out.idx.to(dev), temperature)
        else:
            kl = softened_kl(student_out.logits, teacher_out.logits.to(dev), temperature)
        loss = loss + alpha * kl
        parts["kl"] = kl.item()
    if hidden_weight > 0:
        dev = student_out.logits.device
        hm = hidden_mse(student_out.hidden_states, [h.to(dev) for h in teacher_out.hidden_states])
        loss = loss + hidden_weight * hm
        parts["hidden"] = hm.item()
    parts["loss"] = loss.item()
    return loss, parts
