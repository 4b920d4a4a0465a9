"""Quality measurements: perplexity for decoders, embedding similarity for encoders."""
from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from . import data, models
from .errors import InvalidSetting


@torch.no_grad()
def perplexity(model, tokenizer=None, text=None, *, ids: torch.Tensor | None = None, seq_len: int | None = None,
               max_tokens: int | None = None, batch_size: int = 4, progress: bool = True) -> float:
    """Perplexity over non-overlapping ``seq_len`` windows of ``text`` (or of pre-tokenized ``ids``).

    Every window is scored independently (the first token of a window has no context and is not scored),
    so results are comparable across models that see the same windows. ``seq_len`` (default: 512, or the
    model's positions if fewer) must fit the model's positions.
    """
    seq_len = models.window_length(model, seq_len)
    if ids is None:
        ids = data.tokenize(tokenizer, data.read_texts(text))
    win = data.windows(data.as_ids(ids, "evaluation text"), seq_len, max_tokens, what="evaluation text",
                       vocab=models.id_limit(model))
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for i in tqdm(range(0, len(win), batch_size), desc="perplexity", disable=not progress, leave=False):
        batch = win[i:i + batch_size].to(device)
        out = model(input_ids=batch, use_cache=False)
        if getattr(out, "logits", None) is None:
            raise InvalidSetting(f"perplexity needs next-token logits, and {type(model).__name__} returns none: "
                                 "it is an encoder or a model without its language-model head")
        # One window at a time: a [batch, L, vocab] float copy and log-softmax of all of them at once took more
        # memory than the model (SmolLM2-135M, 4 windows of 512: 2.2 GB peak against 0.5 GB for the model).
        for b in range(batch.shape[0]):
            nll += torch.nn.functional.cross_entropy(out.logits[b, :-1].float(), batch[b, 1:], reduction="sum").item()
        count += batch[:, 1:].numel()
        del out
    return math.exp(nll / count)


@torch.no_grad()
def embeddings(model, windows: torch.Tensor, *, batch_size: int = 8, progress: bool = False) -> torch.Tensor:
    """Mean-pooled last hidden states ``[n, hidden]`` of an encoder on token windows ``[n, L]`` (sentence
    embeddings, the quality measure of encoders), float32 on the model's device."""
    device = next(model.parameters()).device
    # A task model (BertForSequenceClassification ...) returns no last_hidden_state; its base model does, and
    # asking the task model for output_hidden_states instead would keep every layer's states of the batch.
    encoder = getattr(model, "base_model", model)
    out = []
    for i in tqdm(range(0, len(windows), batch_size), desc="embeddings", disable=not progress, leave=False):
        h = encoder(input_ids=windows[i:i + batch_size].to(device)).last_hidden_state
        out.append(h.float().mean(1))
    return torch.cat(out)
