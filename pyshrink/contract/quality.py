"""How good the contracted model still is: perplexity for decoders, embedding similarity for encoders."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..evaluate import perplexity


@torch.no_grad()
def embeddings(model, windows: torch.Tensor, *, batch_size: int = 8, progress: bool = True) -> torch.Tensor:
    """Mean-pooled last hidden states ``[n, hidden]`` of an encoder on token windows."""
    out = []
    for i in tqdm(range(0, len(windows), batch_size), desc="embeddings", disable=not progress, leave=False):
        res = model(input_ids=windows[i:i + batch_size], output_hidden_states=True)
        h = res.hidden_states[-1] if getattr(res, "hidden_states", None) else res.last_hidden_state
        out.append(h.float().mean(1))
    return torch.cat(out)


class Quality:
    """Measures the source once, then any contracted model against it on the same evaluation windows."""

    def __init__(self, kind: str, windows: torch.Tensor, *, progress: bool = True):
        self.kind, self.windows, self.progress = kind, windows, progress
        self.reference = None

    @property
    def metric(self) -> str:
        return "perplexity" if self.kind == "decoder" else "embedding_cosine"

    def measure(self, model) -> float:
        if self.kind == "decoder":
            return perplexity(model, ids=self.windows.reshape(-1), seq_len=self.windows.shape[1],
                              progress=self.progress)
        emb = embeddings(model, self.windows, progress=self.progress)
        if self.reference is None:
            self.reference = emb
            return 1.0
        return float(torch.nn.functional.cosine_similarity(emb, self.reference, dim=-1).mean())
