"""Entropy-aware draft length: how many tokens to draft next, from the target's entropy.

Bebop's first finding is that acceptance falls with the target's entropy H. With a linear fit
alpha(H) = a + b * H (``benchmarks/acceptance_study.py`` reports a and b per drafting mode) and
the simplification that every depth accepts with the same alpha, drafting k tokens yields

    E[tokens per verify step](k) = 1 + alpha + alpha^2 + ... + alpha^k

(the accepted drafts plus the bonus/resampled token) and costs roughly ``1 + c * k`` verify-step
units, where c is the relative cost of one more draft token (draft forward + one more verified
position). The policy picks the k in 0..max_k with the most tokens per unit cost. A request
whose last step was low-entropy keeps long drafts; a high-entropy request drafts few or none,
which saves the verifier work that would be rejected anyway.

Exactness is untouched: rejection sampling is exact for any number of drafts, so the policy
changes speed only, never the output distribution.
"""

from __future__ import annotations

MAX_ALPHA = 0.999  # alpha = 1 would make every draft length "free"; keep the series finite


def predicted_alpha(entropy_nats: float, fit: tuple[float, float]) -> float:
    """alpha(H) = a + b * H clipped to [0, MAX_ALPHA]."""
    a, b = fit
    return min(max(a + b * entropy_nats, 0.0), MAX_ALPHA)


def expected_tokens(alpha: float, k: int) -> float:
    """1 + alpha + ... + alpha^k: tokens emitted per verify step with k drafts (k >= 0)."""
    return sum(alpha**j for j in range(k + 1))


def choose_draft_length(entropy_nats: float | None, fit: tuple[float, float], max_k: int,
                        token_cost: float) -> int:
    """The k in 0..max_k maximising expected_tokens / (1 + token_cost * k).

    ``entropy_nats`` None (no verify step yet, e.g. right after prefill) gives ``max_k``. Ties go
    to the longer draft (more tokens per step at equal efficiency).
    """
    if entropy_nats is None:
        return max_k
    alpha = predicted_alpha(entropy_nats, fit)
    best_k, best_rate = 0, 0.0
    for k in range(max_k + 1):
        rate = expected_tokens(alpha, k) / (1.0 + token_cost * k)
        if rate >= best_rate - 1e-12:
            best_k, best_rate = k, rate
    return best_k
