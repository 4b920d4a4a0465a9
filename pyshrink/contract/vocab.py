"""Dropping vocabulary the domain never uses, while the original tokenizer and token ids keep working.

The input embedding becomes :class:`CompactEmbedding` (rows only for kept ids, plus an id -> row map, so
the model still takes ORIGINAL token ids), and the output head becomes :class:`CompactHead` (scores only
kept ids, returns full-vocabulary logits with ``-inf`` at removed ids, so ``generate()`` returns original
ids and never a removed one). Tied embeddings stay tied: the head shares the embedding's compact weight.

Recorded as the structure transform ``contract.vocab`` with the kept ids (the map), so
:func:`pyshrink.load_model` rebuilds both modules before loading the weights.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..models import record_transform, structure_handler

KIND = "contract.vocab"


class CompactEmbedding(nn.Module):
    """An embedding over original ids whose table holds only kept ids; removed ids read ``fallback``'s row."""

    def __init__(self, kept_ids: torch.Tensor, vocab_size: int, dim: int, fallback: int = 0, *, dtype=None, device=None):
        super().__init__()
        kept_ids = torch.as_tensor(kept_ids, dtype=torch.long, device=device)
        self.num_embeddings, self.embedding_dim = vocab_size, dim
        self.weight = nn.Parameter(torch.empty(len(kept_ids), dim, dtype=dtype, device=device))
        row = torch.full((vocab_size,), fallback, dtype=torch.long, device=device)
        row[kept_ids] = torch.arange(len(kept_ids), device=device)
        self.register_buffer("row_of_id", row)  # original id -> row of ``weight``
        self.padding_idx = None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(self.row_of_id[input_ids], self.weight)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]} of {self.num_embeddings} ids, dim={self.embedding_dim}"


class CompactHead(nn.Module):
    """A vocabulary projection that scores kept ids only; logits of removed ids are ``-inf``."""

    def __init__(self, kept_ids: torch.Tensor, vocab_size: int, dim: int, *, bias: bool = False, dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features = dim, vocab_size
        self.register_buffer("kept_ids", torch.as_tensor(kept_ids, dtype=torch.long, device=device))
        self.weight = nn.Parameter(torch.empty(len(self.kept_ids), dim, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(len(self.kept_ids), dtype=dtype, device=device)) if bias else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        compact = F.linear(h, self.weight, self.bias)
        out = compact.new_full((*compact.shape[:-1], self.out_features), float("-inf"))
        return out.index_copy_(-1, self.kept_ids, compact)

    def extra_repr(self) -> str:
        return f"{len(self.kept_ids)} of {self.out_features} ids, dim={self.in_features}"


def protected_ids(tokenizer, config) -> set:
    """Ids that are never removed: every special token the tokenizer or the config names."""
    ids = set(getattr(tokenizer, "all_special_ids", None) or [])
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "decoder_start_token_id",
                 "sep_token_id", "cls_token_id", "mask_token_id"):
        v = getattr(config, attr, None)
        for x in (v if isinstance(v, (list, tuple)) else [v]):
            if isinstance(x, int) and x >= 0:
                ids.add(x)
    return ids


def kept_ids(used: torch.Tensor, tokenizer, config) -> torch.Tensor:
    """Sorted ids to keep: those the domain corpus uses plus the protected ones."""
    vocab = config.vocab_size
    keep = torch.zeros(vocab, dtype=torch.bool)
    keep[used[(used >= 0) & (used < vocab)]] = True
    for i in protected_ids(tokenizer, config):
        if i < vocab:
            keep[i] = True
    return keep.nonzero().squeeze(1)


def _tied(model) -> bool:
    head = model.get_output_embeddings()
    return head is not None and head.weight is model.get_input_embeddings().weight


def unknown_token_id(tokenizer) -> int | None:
    """The tokenizer's unknown token, unless it doubles as its end, start or padding token (GPT-2's and OPT's
    unk is their end-of-text token: removed ids should not read as the end of the text)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    others = {getattr(tokenizer, f"{t}_token_id", None) for t in ("eos", "bos", "pad")}
    return unk if isinstance(unk, int) and unk not in others else None


def _fallback(config, kept: torch.Tensor, unk_id=None) -> int:
    """The row removed ids read: unk's if kept (the tokenizer's, else the config's), else the first kept id's.
    The tokenizer's comes first because BertConfig names no unk id: removed ids read [PAD]'s row there."""
    for unk in (unk_id, getattr(config, "unk_token_id", None)):
        pos = (kept == unk).nonzero() if isinstance(unk, int) else torch.empty(0)
        if len(pos):
            return int(pos[0, 0])
    return 0


@torch.no_grad()
def apply(model, kept: torch.Tensor, unk_id: int | None = None) -> dict:
    """Keep vocabulary ``kept`` (sorted original ids) in the input embedding and the output head; removed ids
    read the row of ``unk_id`` (the tokenizer's unknown token) where it is kept."""
    config = model.config
    fallback = _fallback(config, kept, unk_id)
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = _tied(model)
    V, dim = emb.weight.shape
    new_emb = CompactEmbedding(kept, V, dim, fallback, dtype=emb.weight.dtype, device=emb.weight.device)
    new_emb.weight.copy_(emb.weight[kept])
    model.set_input_embeddings(new_emb)
    has_head = head is not None
    head_bias = has_head and getattr(head, "bias", None) is not None
    if has_head:
        new_head = CompactHead(kept, V, head.weight.shape[1], bias=head_bias, dtype=head.weight.dtype,
                               device=head.weight.device)
        if tied:
            new_head.weight = new_emb.weight
        else:
            new_head.weight.copy_(head.weight[kept])
        if head_bias:
            new_head.bias.copy_(head.bias[kept])
        model.set_output_embeddings(new_head)
    record = dict(vocab_size=V, kept_ids=kept.tolist(), fallback_row=fallback,
                  head=has_head, head_bias=bool(head_bias), tied=tied)
    record_transform(model, KIND, **record)
    return {"vocab_before": V, "vocab_after": len(kept)}


@structure_handler(KIND)
def _rebuild(model, record) -> None:
    emb = model.get_input_embeddings()
    kept = torch.tensor(record["kept_ids"], dtype=torch.long)
    V, dim = record["vocab_size"], emb.weight.shape[1]
    dt = emb.weight.dtype
    new_emb = CompactEmbedding(kept, V, dim, record.get("fallback_row", 0), dtype=dt)
    model.set_input_embeddings(new_emb)
    if record.get("head"):
        head = model.get_output_embeddings()
        new_head = CompactHead(kept, V, head.weight.shape[1], bias=record.get("head_bias", False), dtype=dt)
        if record.get("tied"):
            new_head.weight = new_emb.weight
        model.set_output_embeddings(new_head)
