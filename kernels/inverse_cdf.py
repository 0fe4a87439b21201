"""Sampling one token per row by inverse CDF, blockwise (the torch reference of the kernels).

Given non-negative weights ``w [R, V]`` (need not sum to 1) and ``u`` uniform in [0, 1),
return the first token t with ``cdf(t) > u * total``. Zero-weight tokens never satisfy that
strictly before a positive-weight token does, so they are never sampled.

Precision: the vocabulary is cut into blocks of ``BLOCK_V`` tokens; block masses are float32
sums accumulated in float64, and only inside the chosen block is a float32 cumulative sum
taken. The Triton kernel does exactly this, so float32 rounding can only misplace mass at
the scale of one float32 ulp of a block's mass per token (≤ BLOCK_V * 2^-24 ≈ 6e-5 TV per
row), instead of an ulp of the whole row per token (~V * 2^-24) for a flat float32 cumsum.
"""

from __future__ import annotations

import torch

# Shared with kernels/rejection_triton.py: both paths cut the vocabulary the same way.
BLOCK_V = 1024


def last_positive_index(weights: torch.Tensor) -> torch.Tensor:
    """Index of the last positive entry per row, 0 if none: ``[R, V]`` -> int64 ``[R]``."""
    vocab = weights.shape[-1]
    index = torch.arange(vocab, device=weights.device)
    return torch.where(weights > 0, index, torch.zeros_like(index)).amax(dim=-1)


def sample_inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row from ``weights [R, V]`` (>= 0, float32) with ``u`` float64 ``[R]``.

    Returns int64 ``[R]``. If rounding pushes ``u * total`` past the last block, the last
    positive-weight token is returned.
    """
    rows, vocab = weights.shape
    if rows == 0:
        return torch.empty(0, dtype=torch.int64, device=weights.device)
    weights = weights.float()
    num_blocks = -(-vocab // BLOCK_V)
    padded = torch.nn.functional.pad(weights, (0, num_blocks * BLOCK_V - vocab))
    blocks = padded.view(rows, num_blocks, BLOCK_V)
    block_mass = blocks.sum(dim=-1).double()  # [R, nb]
    cum_mass = torch.cumsum(block_mass, dim=-1)  # [R, nb]
    target = (u * cum_mass[:, -1]).unsqueeze(-1)  # [R, 1]
    # First block whose cumulative mass exceeds the target.
    block = torch.searchsorted(cum_mass, target, right=True).squeeze(-1)  # [R]
    overflow = block >= num_blocks
    block = block.clamp(max=num_blocks - 1)
    # Mass of the blocks before the chosen one: the running float64 sum the kernel keeps.
    previous = cum_mass.gather(1, (block - 1).clamp(min=0).unsqueeze(-1))
    mass_before = torch.where(block.unsqueeze(-1) > 0, previous, torch.zeros_like(previous))
    local = blocks.gather(1, block.view(rows, 1, 1).expand(rows, 1, BLOCK_V)).squeeze(1)  # [R, BV]
    local_cdf = torch.cumsum(local, dim=-1)
    threshold = (target - mass_before).float()  # [R, 1]
    hit = local_cdf > threshold
    offset = torch.where(
        hit.any(dim=-1), hit.int().argmax(dim=-1), last_positive_index(local)
    )
    token = block * BLOCK_V + offset
    return torch.where(overflow, last_positive_index(weights), token)
