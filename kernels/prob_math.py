"""The acceptance math shared by the verifier kernels, the metrics and the trainer.

Everything here is plain, differentiable torch over the last (vocabulary) dimension, so the
same definitions serve the vLLM hot path (through the kernels built on them), the metrics
and the training losses (docs/design.md#the-math).
"""

from __future__ import annotations

import torch


def acceptance_rate(target_probs: torch.Tensor, draft_probs: torch.Tensor) -> torch.Tensor:
    """One-step acceptance alpha = sum_v min(p(v), q(v)) = 1 - TV(p, q).

    Shapes: ``[..., V]`` and ``[..., V]`` -> ``[...]``. Differentiable in both arguments.
    """
    return torch.minimum(target_probs, draft_probs).sum(dim=-1)


def residual_distribution(target_probs: torch.Tensor, draft_probs: torch.Tensor) -> torch.Tensor:
    """normalize(max(p - q, 0)): where rejection sampling resamples after a rejection.

    Shapes ``[..., V]`` -> ``[..., V]``. Where p == q (no residual mass), returns p: that row
    can only be reached with probability 0, and p keeps the output a valid distribution.
    """
    residual = (target_probs - draft_probs).clamp_min(0)
    mass = residual.sum(dim=-1, keepdim=True)
    return torch.where(mass > 0, residual / mass.clamp_min(torch.finfo(residual.dtype).tiny), target_probs)


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in nats of distributions over the last dimension: ``[..., V]`` -> ``[...]``."""
    p = probs.float()
    return -(p * torch.log(p.clamp_min(1e-30))).sum(dim=-1)


def expected_accepted_length(alphas: torch.Tensor) -> torch.Tensor:
    """E[tokens per verify step] = 1 + sum_j prod_{i<=j} alpha_i, for alphas ``[..., g]`` -> ``[...]``."""
    return 1 + torch.cumprod(alphas, dim=-1).sum(dim=-1)


def residual_weights(target_probs: torch.Tensor, draft_probs: torch.Tensor) -> torch.Tensor:
    """max(p - q, 0) unnormalised: ``residual_distribution`` without the division.

    For samplers that are scale invariant (inverse CDF, exponential race), which skip the
    normalising pass. Shapes ``[..., V]`` -> ``[..., V]``.
    """
    return (target_probs - draft_probs).clamp_min_(0)
