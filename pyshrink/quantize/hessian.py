"""Output error of a weight change, measured through the calibration activations' second moment.

For a linear layer with calibration inputs ``X [T, K]`` and ``H = X^T X``, replacing ``W`` by ``W + D``
changes the outputs by ``||X D^T||^2 = sum((D @ H) * D)``: every quantizer here compares candidates with
this one number (exactly the squared output error over all calibration tokens) without touching ``X``
again. Restricted to one group of ``g`` input channels, it is ``d^T H_gg d`` with ``H_gg`` the group's
diagonal block, which is how clipping is chosen per group.
"""
from __future__ import annotations

import torch


def output_error(delta: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """``sum((delta @ H) * delta)`` for ``delta [N, K]``: the squared output error on the calibration data."""
    return ((delta @ H) * delta).sum()


def diagonal_blocks(H: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[nb, g, g]``: the diagonal blocks of ``H`` for consecutive groups of ``g`` channels (zero-padded)."""
    K = H.shape[0]
    nb = -(-K // group_size)
    Hp = H
    if nb * group_size != K:
        Hp = H.new_zeros(nb * group_size, nb * group_size)
        Hp[:K, :K] = H
    idx = torch.arange(nb, device=H.device)
    return Hp.view(nb, group_size, nb, group_size)[idx, :, idx, :]


def group_errors(delta_g: torch.Tensor, H_blocks: torch.Tensor | None, H_diag: torch.Tensor | None = None) -> torch.Tensor:
    """Per-(row, group) output error ``[N, nb]`` of grouped changes ``delta_g [N, nb, g]``.

    With ``H_blocks [nb, g, g]`` the group-local error is exact; with only ``H_diag [nb, g]`` (used where
    the groups are whole rows and a full block would cost ``N K^2`` per candidate) it is the diagonal term.
    """
    if H_blocks is not None:
        return (torch.einsum("nbi,bij->nbj", delta_g, H_blocks) * delta_g).sum(-1)
    return (delta_g * delta_g * H_diag).sum(-1)
