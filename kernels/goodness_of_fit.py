"""Chi-square goodness-of-fit for sampler exactness tests (needs scipy, a dev dependency).

Power: for a sample distribution p' with TV(p', p) = delta, Cauchy-Schwarz gives
sum_i (p'_i - p_i)^2 / p_i >= (sum_i |p'_i - p_i|)^2 / sum_i p_i = (2 delta)^2, so Pearson's
statistic on n samples is (asymptotically) non-central chi-square with non-centrality
lambda >= n (2 delta)^2 whatever the categories. ``samples_for_power`` turns that into the
n that rejects every such p' with the requested power.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Categories with fewer expected counts are pooled so the chi-square approximation holds.
MIN_EXPECTED = 5.0


@dataclass(frozen=True)
class ChiSquareResult:
    statistic: float
    dof: int
    p_value: float
    n: int


def samples_for_power(tv: float, dof: int, alpha: float, power: float) -> int:
    """Smallest n whose chi-square test at ``alpha`` rejects any TV >= ``tv`` with ``power``."""
    from scipy.optimize import brentq
    from scipy.stats import chi2, ncx2

    critical = chi2.ppf(1 - alpha, dof)
    noncentrality = brentq(lambda lam: ncx2.sf(critical, dof, lam) - power, 1e-6, 1e6)
    return int(noncentrality / (2 * tv) ** 2) + 1


def power_at(n: int, tv: float, dof: int, alpha: float) -> float:
    """Worst-case power of the test with ``n`` samples against TV = ``tv``."""
    from scipy.stats import chi2, ncx2

    return float(ncx2.sf(chi2.ppf(1 - alpha, dof), dof, n * (2 * tv) ** 2))


def chi_square_test(samples: torch.Tensor, probs: torch.Tensor) -> ChiSquareResult:
    """Pearson chi-square of integer ``samples [n]`` against ``probs [V]`` (sums to 1).

    Raises AssertionError if any sample falls on a zero-probability category (no statistics
    needed: that alone is a sampler bug). Categories expected fewer than ``MIN_EXPECTED``
    times are pooled into one.
    """
    from scipy.stats import chi2

    samples = samples.flatten().long().cpu()
    probs = probs.double().cpu()
    n = samples.numel()
    counts = torch.bincount(samples, minlength=probs.numel()).double()
    impossible = (probs == 0) & (counts > 0)
    if bool(impossible.any()):
        token = int(torch.nonzero(impossible)[0])
        raise AssertionError(f"sampled token {token} {int(counts[token])} times; it has probability 0")
    expected = probs * n
    big = expected >= MIN_EXPECTED
    observed_bins = counts[big]
    expected_bins = expected[big]
    small_expected = float(expected[~big].sum())
    if small_expected > 0:
        observed_bins = torch.cat([observed_bins, counts[~big].sum().view(1)])
        expected_bins = torch.cat([expected_bins, torch.tensor([small_expected], dtype=torch.float64)])
    statistic = float(((observed_bins - expected_bins) ** 2 / expected_bins).sum())
    dof = max(int(observed_bins.numel()) - 1, 1)
    return ChiSquareResult(statistic, dof, float(chi2.sf(statistic, dof)), n)
