"""Calibration statistics, gathered block by block with forward hooks.

For every block, hooks on the MLP's down projection (its input is the intermediate activation, one channel
per neuron) and, when heads are pruned, on the attention output projection (one channel per head
dimension) feed each activation to the native ``act_stats_`` op (sum |x|, sum x, sum x^2 per channel, and
the token count) and keep its second moments for the least-squares refit of the down projection: the tokens
themselves while there are few of them (at most half as many as channels), then their Gram matrix ``x^T x``.
The per-channel sums give the mean (for bias compensation), the variance (FLAP's fluctuation) and the mean
magnitude (the contextual threshold).

The whole model is observed in ONE pass of :func:`pyshrink.layerwise.for_each_block`: the hooks of block
``i`` fire while the runner computes block ``i``'s outputs for block ``i + 1``; ``consume(i, block, obs)`` is
called as soon as block ``i``'s statistics are complete, so only one block's Gram matrices live at a time.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..arch.linears import in_features
from ..layerwise import for_each_block
from ..ops import act_stats_, new_accumulators


GRAM_ROWS = 1024  # rows of a Gram matrix per product (bounds the temporaries to GRAM_ROWS x channels)
# float64 bytes of a band that is a matrix product's operand (see band_rows). Wider bands than GRAM_ROWS were
# meant to speed the products up; `python bench/plan_tokens.py bands 13824 8192 1024` gave 2.98 against 2.90 s,
# then 5.49 against 3.49 s (this VM is noisy), so the gain is not established
BAND_BYTES = 256 << 20


def row_bands(rows: int, size: int | None = None):
    """``(r0, r1)`` for consecutive bands of ``size`` (default GRAM_ROWS) rows, the last one partial, covering
    ``rows`` rows."""
    size = size or GRAM_ROWS
    for r0 in range(0, rows, size):
        yield r0, min(r0 + size, rows)


def band_rows(width: int) -> int:
    """Rows of a float64 band ``width`` wide for a matrix product: as many as fit BAND_BYTES, at least GRAM_ROWS."""
    return max(GRAM_ROWS, BAND_BYTES // (8 * width))


def float64_bands(t: torch.Tensor, buf: torch.Tensor | None = None, size: int | None = None):
    """``(r0, r1, t[r0:r1] in float64)`` for the bands of ``size`` rows (:func:`row_bands`) of the 2-D ``t``, each
    band copied into one reused buffer (the caller may change it in place, and must not keep it past its turn), or
    into ``buf`` (float64, at least as many rows as the first band, ``t``'s width), to reuse it across calls. A fresh
    float64 tensor per band cost about 5x the copy into a reused one (51-53 against 9-10 ms for 1024 x 13824 float32
    values, ``bench/plan_tokens.py bands``): large blocks go back to the system when freed, and each new one is
    paged in again."""
    for r0, r1 in row_bands(t.shape[0], size):
        if buf is None:
            buf = torch.empty(r1 - r0, t.shape[1], dtype=torch.float64, device=t.device)
        band = buf[:r1 - r0]
        band.copy_(t[r0:r1])
        yield r0, r1, band


def _mirror_upper(g: torch.Tensor) -> None:
    """Copy the upper triangle of the square ``g`` onto the lower one, in place, a band of rows at a time.

    ChannelStats.add leaves the blocks left of its diagonal bands unset. The diagonal blocks it computes whole, but
    float32 products need not be symmetric to the last bit; mirroring them too makes the matrix exactly symmetric,
    so that formulas reading either triangle (the refit's error reads both) agree to float64 rounding."""
    for r0, r1 in row_bands(g.shape[0]):
        g[r0:r1, :r0] = g[:r0, r0:r1].T
        d = g[r0:r1, r0:r1]
        d.copy_(d.triu() + d.triu(1).T)


# Tokens kept as they are, per channel, before their Gram matrix replaces them. With T tokens of C channels the
# refit from the tokens (scores._lstsq_samples) costs about T (C + k) + T^2 multiply-adds per output (k kept
# channels) and holds T x C floats; from the Gram matrix it costs about k C + k^2 + r^2 / 2 (r removed) after the
# sums of x^T x, and holds C x C doubles. Measured at the 11.4 B model's shape (13824 -> 5120, half kept; RESULTS,
# "Planning a block"; bench/plan_tokens.py switch), the two took the same time at T = C / 2 (within 5 % in two runs),
# and the tokens' way was 2.4-2.9x faster at C / 4; below C / 2 the tokens are also a quarter of the matrix's size
# or less.
SAMPLES_PER_CHANNEL = 0.5


class ChannelStats:
    """Per-channel statistics of one activation ``[..., C]``: act_stats_ sums, count and (optionally) second moments,
    as the tokens themselves (:attr:`samples`) while there are at most ``max_samples`` (default
    ``SAMPLES_PER_CHANNEL * C``) of them, then as their Gram matrix (:attr:`gram`)."""

    def __init__(self, channels: int, *, gram: bool = True, max_samples: int | None = None):
        self.acc, self.count = new_accumulators(channels)
        self.max_samples = int(SAMPLES_PER_CHANNEL * channels) if max_samples is None else max_samples
        # float32 [t, C] chunks while few (None once the Gram matrix replaces them, or when no moments are kept)
        self._samples = [] if gram else None
        self._joined = None  # their concatenation, once asked for
        self._gram = None
        self._lower_stale = False  # _add_gram sums the bands right of the diagonal; reading mirrors them

    @property
    def samples(self) -> torch.Tensor | None:
        """Every token added, float32 ``[T, C]``, while there are at most ``max_samples`` (None after, or before any)."""
        if not self._samples:
            return None
        if len(self._samples) == 1:
            return self._samples[0]
        if self._joined is None or len(self._joined) != sum(map(len, self._samples)):
            # one tensor, whose row blocks become the chunks (no second copy): _fold still sums by the adds' chunks
            self._joined = torch.cat(self._samples)
            self._samples = list(self._joined.split([len(x2) for x2 in self._samples]))
        return self._joined

    @property
    def gram(self) -> torch.Tensor | None:
        """Sum of ``x^T x`` over every token added (float64, symmetric; None once freed or when not kept). Reading
        it while the tokens are held replaces them with it."""
        if self._samples is not None:
            self._fold()
        if self._lower_stale:
            _mirror_upper(self._gram)
            self._lower_stale = False
        return self._gram

    @gram.setter
    def gram(self, value: torch.Tensor | None) -> None:
        """Set the Gram matrix, or free the second moments (held tokens too) with None."""
        self._gram, self._lower_stale, self._samples, self._joined = value, False, None, None

    def _fold(self) -> None:
        """Replace the held tokens by their Gram matrix, chunk by chunk as they are held: during calibration (adds
        only) the same sums, in the same order, as if the Gram matrix had been summed from the first add."""
        chunks, self._samples, self._joined = self._samples, None, None
        self._gram = torch.zeros(self.acc.shape[1], self.acc.shape[1], dtype=torch.float64, device=self.acc.device)
        for x2 in chunks:
            self._add_gram(x2)

    def _add_gram(self, x2: torch.Tensor) -> None:
        # x^T x by bands of GRAM_ROWS rows, right of the diagonal only: half the products of the whole matrix, and a
        # float32 temporary of one band (a whole one, plus its float64 copy, was 2.2 GB beside the 1.5 GB sum at
        # 13824 channels, 9.9 GB at 28672). The float32 band is added into the float64 sum as it is cast.
        # One buffer for every band's product: a fresh one per band was paged in again each time (see float64_bands).
        C = x2.shape[1]
        buf = torch.empty(min(GRAM_ROWS, C) * C, dtype=x2.dtype, device=x2.device)
        for r0, r1 in row_bands(C):
            prod = buf[:(r1 - r0) * (C - r0)].view(r1 - r0, C - r0)
            self._gram[r0:r1, r0:].add_(torch.matmul(x2[:, r0:r1].T, x2[:, r0:], out=prod))
        self._lower_stale = True

    def to(self, device) -> "ChannelStats":
        """Move the sums and second moments to ``device``, in place; returns self."""
        self.acc, self.count = self.acc.to(device), self.count.to(device)
        if self._samples is not None:
            self._samples, self._joined = [x2.to(device) for x2 in self._samples], None
        if self._gram is not None:
            self._gram = self._gram.to(device)
        return self

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        # Sum where the activations are (act_stats_ needs one device); the first call moves the zeros there.
        if self.acc.device != x.device:
            self.to(x.device)
        act_stats_(x.detach(), self.acc, self.count)
        x2 = x.detach().reshape(-1, x.shape[-1])
        if x2.shape[0] == 0:  # nothing to hold (an empty held chunk would read as held tokens: a 0 / 0 refit)
            return
        if self._samples is not None:
            if sum(map(len, self._samples)) + x2.shape[0] <= self.max_samples:
                self._samples.append(x2.to(torch.float32, copy=True))  # a copy: the model owns its activations
                return
            self._fold()
        if self._gram is not None:
            self._add_gram(x2.float())

    @property
    def n(self) -> float:
        return float(self.count.item())

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.acc[0] / max(self.n, 1.0)

    @property
    def mean(self) -> torch.Tensor:
        return self.acc[1] / max(self.n, 1.0)

    @property
    def mean_sq(self) -> torch.Tensor:
        return self.acc[2] / max(self.n, 1.0)

    @property
    def variance(self) -> torch.Tensor:
        return (self.mean_sq - self.mean ** 2).clamp_min(0)

    @property
    def l2(self) -> torch.Tensor:
        """sqrt(sum x^2) per channel: Wanda's activation norm."""
        return self.acc[2].sqrt()


@dataclass
class BlockObservation:
    """What one block did on the calibration tokens."""
    index: int
    mlp: ChannelStats  # input of the down projection (neurons)
    attn: ChannelStats | None = None  # input of the attention output projection (heads x head_dim)
    out_sq: float = 0.0  # sum of squares of the block's output hidden states
    # post-norm blocks only: sums of squares of the attention's and the MLP's residual sums (their norms' inputs)
    residual_sq: list[float] | None = None
    tokens: int = 0

    @property
    def scales(self) -> dict:
        """E||.||^2 per token of the block output and, for post-norm blocks, of the two residual sums."""
        t = max(self.tokens, 1)
        res = None if self.residual_sq is None else (self.residual_sq[0] / t, self.residual_sq[1] / t)
        return {"out_ms": self.out_sq / t, "residual_ms": res}


def _input_hook(stats: ChannelStats):
    def hook(module, args):
        stats.add(args[0])
    return hook


class BlockObserver:
    """Attaches hooks to one block at a time; finishes a block when the next one is attached."""

    def __init__(self, adapter, consume, *, heads: bool, gram: bool):
        self.adapter, self.consume, self.heads, self.gram = adapter, consume, heads, gram
        self.current = None  # (index, block, observation, handles)

    def attach(self, i, block, inputs):
        self.finish()

        down = self.adapter.mlp_out_module(block)
        obs = BlockObservation(i, ChannelStats(in_features(down), gram=self.gram))
        handles = [down.register_forward_pre_hook(_input_hook(obs.mlp))]
        if self.heads:
            o = self.adapter.attn_out_module(block)
            obs.attn = ChannelStats(in_features(o), gram=self.gram)
            handles.append(o.register_forward_pre_hook(_input_hook(obs.attn)))

        def out_hook(module, args, output):
            h = output[0] if isinstance(output, (tuple, list)) else output
            obs.out_sq += float(h.detach().double().pow(2).sum())
            obs.tokens += h.shape[0] * h.shape[1]

        handles.append(block.register_forward_hook(out_hook))
        norms = self.adapter.post_norm_modules(block)
        if norms is not None:  # post-norm: the residual sums the projections' changes land in, before their norms
            obs.residual_sq = [0.0, 0.0]

            def residual_hook(k):
                def hook(module, args):
                    obs.residual_sq[k] += float(args[0].detach().double().pow(2).sum())
                return hook

            handles += [norm.register_forward_pre_hook(residual_hook(k)) for k, norm in enumerate(norms)]
        self.current = (i, block, obs, handles)

    def detach(self) -> None:
        """Remove the current block's hooks without consuming its statistics (after an error)."""
        if self.current is not None:
            for h in self.current[3]:
                h.remove()
            self.current = None

    def finish(self):
        if self.current is None:
            return
        i, block, obs, handles = self.current
        self.detach()
        # Planning (scores, least-squares refits, head choices) is float64 work on the CPU, whatever device
        # the model runs on; the chosen weights are moved back to the model's device when applied.
        obs.mlp.to("cpu")
        if obs.attn is not None:
            obs.attn.to("cpu")
        self.consume(i, block, obs)


def observe_blocks(model, adapter, batches, consume, *, heads: bool = False, gram: bool = True,
                   progress: bool = True) -> list:
    """Run the calibration ``batches`` through the model block by block and call ``consume(i, block, obs)``
    with each block's :class:`BlockObservation`; returns ``consume``'s results in block order.

    The model is not changed here: the next block sees the unchanged block's outputs, so every block is
    observed on the inputs the source model gives it.
    """
    results = []
    observer = BlockObserver(adapter, lambda i, b, o: results.append(consume(i, b, o)), heads=heads, gram=gram)
    try:
        for_each_block(model, adapter, batches, observer.attach, propagate="rewritten",
                       desc="calibration (blocks)", progress=progress)
        observer.finish()
    finally:
        observer.detach()  # an error mid-pass: leave no hook behind
    return results
