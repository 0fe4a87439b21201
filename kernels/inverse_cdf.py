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
    # A vocabulary smaller than one block is one block. Full blocks are a strided view (no
    # copy, no padding); the partial last block is summed separately.
    block_size = min(BLOCK_V, vocab)
    num_full = vocab // block_size
    full_mass = weights[:, : num_full * block_size].unflatten(1, (num_full, block_size)).sum(-1)
    if num_full * block_size < vocab:
        tail_mass = weights[:, num_full * block_size :].sum(dim=-1, keepdim=True)
        full_mass = torch.cat([full_mass, tail_mass], dim=1)
    num_blocks = full_mass.shape[1]
    block_mass = full_mass.double()  # [R, nb]
    cum_mass = torch.cumsum(block_mass, dim=-1)  # [R, nb]: the kernel's running float64 sum
    target = (u * cum_mass[:, -1]).unsqueeze(-1)  # [R, 1]
    # First block whose cumulative mass exceeds the target.
    block = torch.searchsorted(cum_mass, target, right=True).squeeze(-1)  # [R]
    overflow = block >= num_blocks
    # Overflow (rounding only): the last positive block, where no threshold is hit below.
    last_block = last_positive_index(block_mass)
    block = torch.where(overflow, last_block, block)
    previous = cum_mass.gather(1, (block - 1).clamp(min=0).unsqueeze(-1))
    mass_before = torch.where(block.unsqueeze(-1) > 0, previous, torch.zeros_like(previous))
    columns = block.unsqueeze(-1) * block_size + torch.arange(block_size, device=weights.device)
    local = weights.gather(1, columns.clamp(max=vocab - 1))
    local = torch.where(columns < vocab, local, torch.zeros_like(local))  # [R, block]
    local_cdf = torch.cumsum(local, dim=-1)  # [R, block]
    threshold = (target - mass_before).float()  # [R, 1]
    hit = (local_cdf > threshold) & ~overflow.unsqueeze(-1)
    offset = torch.where(hit.any(dim=-1), hit.int().argmax(dim=-1), last_positive_index(local))
    return block * block_size + offset


def sample_float64_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row of ``probs [R, V]`` (>= 0, any float dtype) for ``u`` float64 ``[R]`` in [0, 1).

    Returns int64 ``[R]``: the first token whose float64 cumulative mass exceeds ``u * total``.
    Token t is returned exactly when ``u`` falls in ``[cdf(t-1), cdf(t)) / total``, an interval
    of length ``probs[t] / total`` up to float64 rounding (2^-53 relative to the mass before t,
    per addition): a zero-probability token gets no share, and any token above ~1e-16 of the
    cumulative mass its own. This is the sampler for drafting, where a draft must be drawn from
    exactly the ``q`` the verifier is handed: float32 exponential-race noise (vLLM's default)
    is ~6e-8 apart near 0, so it can never draw a token below a few 1e-9 of the row maximum and
    draws those near that at the wrong rate. One uniform per row, no ``[R, V]`` noise tensor.
    """
    if probs.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=probs.device)
    cdf = probs.to(torch.float64).cumsum_(dim=-1)  # [R, V]
    target = (u.to(torch.float64) * cdf[:, -1]).unsqueeze(-1)  # [R, 1]
    token = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    # u * total can round up to total (u within 2^-53 of 1): take the last positive token.
    return torch.minimum(token, last_positive_index(probs))
