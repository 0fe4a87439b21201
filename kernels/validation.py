"""Input checks for the public sampling entry points: a ValueError that names the problem.

These read values back from the device (they are the slow, friendly path); the hot path in
vLLM passes ``validate=False``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# float32 softmax rows over 151,936 tokens sum to 1 within ~1e-5; 1e-3 leaves room for
# bf16-derived probabilities while still catching unnormalised weights or logits.
ROW_SUM_TOLERANCE = 1e-3


def check_num_draft_tokens(num_draft_tokens: Sequence[int] | torch.Tensor) -> list[int]:
    """k_i as host ints; ValueError for a non-1-D / non-integer / negative ``num_draft_tokens``."""
    if isinstance(num_draft_tokens, torch.Tensor):
        if num_draft_tokens.ndim != 1:
            raise ValueError(
                f"num_draft_tokens must be 1-D [batch_size], got shape {tuple(num_draft_tokens.shape)}"
            )
        if num_draft_tokens.dtype.is_floating_point or num_draft_tokens.dtype == torch.bool:
            raise ValueError(f"num_draft_tokens must be integers, got dtype {num_draft_tokens.dtype}")
        counts = [int(c) for c in num_draft_tokens.tolist()]
    else:
        counts = list(num_draft_tokens)
        for c in counts:
            if isinstance(c, bool) or not isinstance(c, int):
                raise ValueError(f"num_draft_tokens must be a list of ints, got element {c!r}")
    negative = [c for c in counts if c < 0]
    if negative:
        raise ValueError(f"num_draft_tokens must be >= 0, got {negative[0]}")
    return counts


def check_draft_tokens(
    draft_token_ids: torch.Tensor, counts: list[int], vocab_size: int, device: torch.device
) -> None:
    """Shape ``[sum k_i]``, integer dtype, ids ``< V``, on ``device``.

    Negative ids are allowed: vLLM pads drafts that a grammar rejected with -1 and the
    samplers reject them at their position. An id ``>= V`` is a caller bug.
    """
    if draft_token_ids.ndim != 1:
        raise ValueError(
            f"draft_token_ids must be 1-D [sum(num_draft_tokens)], got shape {tuple(draft_token_ids.shape)}"
        )
    if draft_token_ids.dtype.is_floating_point or draft_token_ids.dtype == torch.bool:
        raise ValueError(f"draft_token_ids must be integers, got dtype {draft_token_ids.dtype}")
    if draft_token_ids.shape[0] != sum(counts):
        raise ValueError(
            f"draft_token_ids has {draft_token_ids.shape[0]} entries but num_draft_tokens sums to "
            f"{sum(counts)}: they must match"
        )
    if draft_token_ids.device != device:
        raise ValueError(f"draft_token_ids is on {draft_token_ids.device}, target on {device}")
    if draft_token_ids.numel():
        high = int(draft_token_ids.max())
        if high >= vocab_size:
            raise ValueError(
                f"draft token id {high} is out of range [0, {vocab_size}) (negative ids mean 'rejected')"
            )


def check_target_rows(target: torch.Tensor, counts: list[int], name: str, bonus_rows: bool = True) -> None:
    """``target`` is 2-D with ``sum(k_i + 1)`` rows (``sum(k_i)`` without bonus rows)."""
    rows = "sum(k_i + 1)" if bonus_rows else "sum(k_i)"
    if target.ndim != 2:
        raise ValueError(f"{name} must be 2-D [{rows}, V], got shape {tuple(target.shape)}")
    expected = sum(counts) + (len(counts) if bonus_rows else 0)
    if target.shape[0] != expected:
        hint = "" if bonus_rows else " (bonus_token_ids given: draft rows only)"
        raise ValueError(
            f"{name} has {target.shape[0]} rows but num_draft_tokens {counts[:8]}"
            f"{'...' if len(counts) > 8 else ''} needs {rows} = {expected}{hint}"
        )


def check_bonus_token_ids(
    bonus_token_ids: torch.Tensor, batch_size: int, vocab_size: int, device: torch.device
) -> None:
    """``[B]`` or ``[B, 1]`` integer ids in ``[0, V)`` on ``device``."""
    if bonus_token_ids.dtype.is_floating_point or bonus_token_ids.dtype == torch.bool:
        raise ValueError(f"bonus_token_ids must be integers, got dtype {bonus_token_ids.dtype}")
    if bonus_token_ids.numel() != batch_size or bonus_token_ids.ndim not in (1, 2):
        raise ValueError(
            f"bonus_token_ids must have shape ({batch_size},) or ({batch_size}, 1), "
            f"got {tuple(bonus_token_ids.shape)}"
        )
    if bonus_token_ids.device != device:
        raise ValueError(f"bonus_token_ids is on {bonus_token_ids.device}, target on {device}")
    if bonus_token_ids.numel():
        low, high = int(bonus_token_ids.min()), int(bonus_token_ids.max())
        if low < 0 or high >= vocab_size:
            raise ValueError(f"bonus token id {low if low < 0 else high} is out of range [0, {vocab_size})")


def check_distribution(probs: torch.Tensor, name: str) -> None:
    """float rows that are finite, non-negative and sum to 1 within ``ROW_SUM_TOLERANCE``."""
    if not probs.dtype.is_floating_point:
        raise ValueError(f"{name} must be floating point, got {probs.dtype}")
    if probs.numel() == 0:
        return
    if not bool(torch.isfinite(probs).all()):
        raise ValueError(f"{name} contains NaN or inf")
    if bool((probs < 0).any()):
        raise ValueError(f"{name} contains negative probabilities")
    sums = probs.sum(dim=-1, dtype=torch.float64)
    worst = int((sums - 1).abs().argmax())
    if abs(float(sums[worst]) - 1) > ROW_SUM_TOLERANCE:
        raise ValueError(
            f"{name} row {worst} sums to {float(sums[worst]):.6g}; every row must sum to 1 "
            f"(within {ROW_SUM_TOLERANCE})"
        )


def check_draft_probs(
    draft_probs: torch.Tensor, draft_token_ids: torch.Tensor, vocab_size: int, device: torch.device
) -> None:
    """``[sum k_i, V]`` distributions that give each valid drafted token positive probability."""
    expected = (draft_token_ids.shape[0], vocab_size)
    if draft_probs.ndim != 2 or tuple(draft_probs.shape) != expected:
        raise ValueError(
            f"draft_probs must have shape [sum(num_draft_tokens), V] = {expected}, "
            f"got {tuple(draft_probs.shape)}"
        )
    if draft_probs.device != device:
        raise ValueError(f"draft_probs is on {draft_probs.device}, target on {device}")
    check_distribution(draft_probs, "draft_probs")
    if draft_token_ids.numel():
        rows = torch.arange(draft_token_ids.shape[0], device=device)
        ids = draft_token_ids.long()
        valid = ids >= 0  # negative ids are rejected drafts (vLLM's -1 padding): no q to check
        q_at_draft = draft_probs[rows, ids.clamp(min=0)]
        zero = torch.nonzero((q_at_draft <= 0) & valid)
        if zero.numel():
            t = int(zero[0, 0])
            raise ValueError(
                f"draft token {int(draft_token_ids[t])} at draft position {t} has draft probability "
                "0: draft tokens must be sampled from draft_probs"
            )


def check_logits(logits: torch.Tensor) -> None:
    """float ``[N, V]`` logits with no NaN / +inf and at least one finite entry per row."""
    if not logits.dtype.is_floating_point:
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    if logits.numel() == 0:
        return
    if bool(torch.isnan(logits).any()) or bool((logits == float("inf")).any()):
        raise ValueError("logits contain NaN or +inf")
    if not bool(torch.isfinite(logits).any(dim=-1).all()):
        raise ValueError("a logits row is entirely -inf: no token can be sampled")


def check_sampling_params(
    temperature: torch.Tensor,
    top_k: torch.Tensor | None,
    top_p: torch.Tensor | None,
    batch_size: int,
    vocab_size: int,
) -> None:
    """Per-request temperature >= 0, 1 <= top_k <= V, 0 < top_p <= 1, each of shape ``[B]``."""
    for name, tensor in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p)):
        if tensor is not None and tuple(tensor.shape) != (batch_size,):
            raise ValueError(f"{name} must have shape ({batch_size},), got {tuple(tensor.shape)}")
    if not bool(torch.isfinite(temperature).all()) or bool((temperature < 0).any()):
        raise ValueError("temperature must be finite and >= 0 (0 = greedy)")
    if top_k is not None:
        if top_k.dtype.is_floating_point:
            raise ValueError(f"top_k must be integers, got {top_k.dtype}")
        if bool((top_k < 1).any()) or bool((top_k > vocab_size).any()):
            raise ValueError(f"top_k must be in [1, {vocab_size}] (V means no top-k)")
    if top_p is not None and (bool((top_p <= 0).any()) or bool((top_p > 1).any())):
        raise ValueError("top_p must be in (0, 1] (1 means no top-p)")
