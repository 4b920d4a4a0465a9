"""How good the contracted model still is: perplexity for decoders, embedding similarity for encoders."""
from __future__ import annotations

import torch

from ..evaluate import embeddings, perplexity


class Quality:
    """Measures the source once, then any contracted model against it on the same evaluation windows."""

    def __init__(self, kind: str, windows: torch.Tensor, *, progress: bool = True):
        self.kind, self.windows, self.progress = kind, windows, progress
        self.batch_size = 4 if kind == "decoder" else 8  # windows per forward (a streamed run batches them alike)
        self.reference = None

    @property
    def metric(self) -> str:
        return "perplexity" if self.kind == "decoder" else "embedding_cosine"

    def measure(self, model) -> float:
        if self.kind == "decoder":
            return perplexity(model, ids=self.windows.reshape(-1), seq_len=self.windows.shape[1],
                              batch_size=self.batch_size, progress=self.progress)
        emb = embeddings(model, self.windows, batch_size=self.batch_size, progress=self.progress)
        if self.reference is None:
            self.reference = emb
            return 1.0
        return float(torch.nn.functional.cosine_similarity(emb, self.reference, dim=-1).mean())
