"""Cost-aware draft lengths (``draft_length="auto"``): pure math, no vLLM.

One step of a speculative engine verifies, for every request i in the batch, ``1 + k_i`` tokens
(its k_i drafts plus the bonus position) and drafts ``K = max_i k_i`` depths for the whole batch.
With request i's per-draft acceptance probability alpha_i (every depth accepts with the same
alpha, the model :mod:`bebop_vllm.draft_length` already uses) the step emits in expectation

    E = sum_i (1 + alpha_i + alpha_i^2 + ... + alpha_i^k_i)

tokens and costs ``step_seconds(num_tokens = base + sum_i k_i, depths = K)`` (a
:class:`bebop_vllm.step_cost.StepCostModel`). :func:`plan_draft_lengths` picks the k_i that
maximise E / seconds: for a fixed K and a fixed total of m drafts, the best drafts are the m
largest marginal gains alpha_i^j (j <= K), which per request are automatically a prefix
(alpha^j falls with j), so trying every (K, m) is exact and cheap (B * k^2 candidates).

When even the best drafting plan is not ``1 + min_gain`` times faster than drafting nothing, every
k_i is 0 and K is 0: the drafter then runs no draft depth at all (vLLM's proposer still runs its
first pass over the step's tokens, which keeps the drafter's KV cache complete so drafting can
resume when the batch thins).

Acceptance per request (:class:`AcceptanceEstimate`): a Beta posterior over alpha whose prior
mean is the entropy fit alpha(H) = a + b * H when a fit and an entropy are known (else the
heads' held-out acceptance), with ``prior_weight`` pseudo-observations; the request's own verify
steps add successes (accepted drafts) and failures (the first rejected draft), discounted by
``decay`` per step so the estimate follows the request's recent behaviour.

The step-cost model is calibrated on bare forward passes; a real step also pays the scheduler, the
sampler and verifier, the proposer's bookkeeping and attention over long contexts, and these do
not scale the same way for drafting and plain steps. :class:`StepTimeCorrection` measures each
step's wall time against the model's prediction, per batch size (powers of two): for plain steps
the observed/predicted ratio; for drafting steps the part they cost on top of the plain step, fitted
as a per-step overhead c (paid by any drafting step, whatever its depth) plus r times the model's
marginal cost of the drafts and depths (decayed least squares over weighted moments, so that
steps with a tiny extra part cannot swing it; every 8th drafting step runs one depth more or less
so that c and r can be told apart). The planner prices candidate steps with these, so a batch
where drafting costs more than calibrated stops drafting after a few steps, and a drafting step
is charged its fixed part once, not once per depth.

Exactness is untouched: rejection sampling is exact for any number of drafts per request, so the
policy changes speed only, never the output distribution.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bebop_vllm.draft_length import MAX_ALPHA, expected_tokens, predicted_alpha

__all__ = ["AcceptanceEstimate", "DraftPlan", "StepTimeCorrection", "batch_expected_tokens", "expected_tokens",
           "plan_draft_lengths"]


@dataclass(frozen=True)
class DraftPlan:
    """The chosen drafts per request (request order) and what the policy expects of them."""

    lengths: tuple[int, ...]
    depths: int  # max(lengths): draft depths the drafter runs
    expected_tokens: float  # E over the batch
    seconds: float  # predicted step seconds
    plain_rate: float  # tokens/s of the same batch without drafts (1 token per request)

    @property
    def rate(self) -> float:
        return self.expected_tokens / self.seconds if self.seconds > 0 else float("inf")

    @property
    def predicted_speedup(self) -> float:
        return self.rate / self.plain_rate if self.plain_rate > 0 else 1.0


def batch_expected_tokens(alphas: Sequence[float], lengths: Sequence[int]) -> float:
    """sum_i expected_tokens(alpha_i, k_i)."""
    return sum(expected_tokens(min(max(a, 0.0), MAX_ALPHA), k) for a, k in zip(alphas, lengths, strict=True))


def plan_draft_lengths(alphas: Sequence[float], max_k: int, step_seconds: Callable[[int, int], float],
                       base_tokens: int | None = None, min_gain: float = 0.0,
                       eligible: Sequence[bool] | None = None) -> DraftPlan:
    """Per-request draft lengths in 0..max_k maximising expected emitted tokens per second.

    ``step_seconds(num_tokens, depths)``: predicted seconds of a step verifying ``num_tokens``
    tokens after ``depths`` draft depths. ``base_tokens``: tokens of the step without drafts
    (default: one per request). ``min_gain``: draft only when the best plan's rate is at least
    ``1 + min_gain`` times the no-draft rate (a margin against cost-model error). ``eligible``:
    False for requests that cannot draft (prefill chunks); they keep k = 0 but count in the batch.
    Ties go to fewer drafts.
    """
    batch = len(alphas)
    base = batch if base_tokens is None else int(base_tokens)
    clipped = [min(max(float(a), 0.0), MAX_ALPHA) for a in alphas]
    can_draft = [True] * batch if eligible is None else [bool(e) for e in eligible]
    plain_seconds = step_seconds(base, 0)
    plain_rate = batch / plain_seconds if plain_seconds > 0 else float("inf")
    best = DraftPlan(tuple([0] * batch), 0, float(batch), plain_seconds, plain_rate)
    if batch == 0 or max_k <= 0 or not any(can_draft):
        return best
    threshold = plain_rate * (1.0 + max(min_gain, 0.0))

    best_rate, best_key = threshold, None
    for depths in range(1, max_k + 1):
        gains = sorted(((clipped[i] ** j, j, i) for i in range(batch) if can_draft[i]
                        for j in range(1, depths + 1)), key=lambda g: (-g[0], g[1], g[2]))
        # Upper bound for this K (every gain, the cheapest drafting step): skip hopeless K cheaply.
        cheapest = step_seconds(base + 1, depths)
        if cheapest > 0 and (batch + sum(g[0] for g in gains)) / cheapest <= best_rate:
            continue
        values = [g[0] for g in gains]
        totals = list(itertools.accumulate(values, initial=float(batch)))[1:]
        counts = range(1, len(values) + 1)
        seconds_of = _batched(step_seconds, [base + m for m in counts], depths)
        for m, total, seconds in zip(counts, totals, seconds_of, strict=True):
            if values[m - 1] <= 0.0:
                break
            rate = total / seconds if seconds > 0 else float("inf")
            if rate > best_rate * (1.0 + 1e-9):
                best_rate, best_key = rate, (depths, m, total, seconds, gains)
    if best_key is None:
        return best
    depths, m, total, seconds, gains = best_key
    lengths = [0] * batch
    for _, j, i in gains[:m]:
        lengths[i] = max(lengths[i], j)
    return DraftPlan(tuple(lengths), max(lengths), total, seconds, plain_rate)


def _batched(step_seconds: Callable[[int, int], float], tokens: list[int], depths: int) -> list[float]:
    """step_seconds over many token counts: one vectorised call when it takes a numpy array."""
    try:
        import numpy as np

        out = step_seconds(np.asarray(tokens), depths)  # type: ignore[arg-type]
        if isinstance(out, np.ndarray) and out.shape == (len(tokens),):
            return out.tolist()
    except (TypeError, ValueError, ImportError):
        pass
    return [step_seconds(n, depths) for n in tokens]


@dataclass
class AcceptanceEstimate:
    """A request's acceptance alpha: Beta posterior with a discounted history (see module doc)."""

    prior_alpha: float
    prior_weight: float = 4.0
    decay: float = 0.8
    successes: float = 0.0
    failures: float = 0.0
    entropy: float | None = None  # mean target entropy (nats) of its latest step with a signal

    def observe(self, drafted: int, accepted: int) -> None:
        """One verify step: ``accepted`` of ``drafted`` drafts (chain: the first rejection stops it)."""
        if drafted <= 0:
            return
        accepted = min(max(int(accepted), 0), int(drafted))
        self.successes = self.decay * self.successes + accepted
        self.failures = self.decay * self.failures + (1.0 if accepted < drafted else 0.0)

    def alpha(self, fit: tuple[float, float] | None = None) -> float:
        prior = self.prior_alpha
        if fit is not None and self.entropy is not None:
            prior = predicted_alpha(self.entropy, fit)
        mean = (self.successes + self.prior_weight * prior) / (self.successes + self.failures + self.prior_weight)
        return min(max(mean, 0.0), MAX_ALPHA)


@dataclass
class StepTimeCorrection:
    """Observed / predicted step seconds, decayed least-squares fits per (batch bucket, drafting).

    Plain steps fit observed = r * predicted. Drafting steps fit the part they cost on top of the
    plain step, y = observed - (plain r) * base, against the model's extra part x = predicted -
    base (base: the model's plain step for the same batch), as an affine function y = c + r * x:
    c is what any drafting step pays on top of the plain step whatever its drafts (proposer
    bookkeeping, the verifier's pass), r scales the calibrated marginal cost of drafts and depths.
    :meth:`corrected` prices a candidate drafting step as plain r * base + c + r * (its predicted
    cost - base). The fit through the origin used before 2026-12-07 (c = 0) charged any per-step
    part to every draft depth, and a plan settled on one depth gave it nothing to tell the two
    apart: at batch 1 on a bf16 AVX-512 CPU its ratio sat at 6-8x during T = 1 runs and the plan
    drafted 1.95 depths on average (1.21-1.26x plain, a fixed k = 3 1.36x); with this fit and
    :meth:`explore` the same engine fitted c = -0.5 ms, r = 1.89, drafted 2.60 depths and ran
    1.31x (benchmarks/results/batch1_v6_bf16_policy.md).

    The fits use decayed sums (weighted moments of x and y), not means of per-step ratios: a
    drafting step with one draft has an extra part of a fraction of a millisecond, and its timing
    noise divided by that would swing a per-step ratio by several x. The slope is ridge-regularised
    towards 1 (``slope_prior`` pseudo-variance relative to mean x squared): when the steps drafted
    all about the same depths, x barely varies and the data cannot separate c from r, so r stays
    near 1 (the calibrated marginal costs) and c takes the rest; where x varies (per-request
    lengths, probes, changing batches) the data decides. r is clipped to
    [1/``max_ratio``, ``max_extra_ratio``] and c then refitted at the mean.
    Buckets are powers of two of the batch size (1, 2-3, 4-7, ...). :meth:`factor` uses a bucket
    once it has ``min_steps`` observations, else the nearest bucket of the same kind that has,
    else 1 (trust the calibrated model). Each step's observation is clipped to
    [1/``max_ratio``, ``max_ratio``] times its prediction (``max_extra_ratio`` for the extra
    part) so one stalled step (a page fault, another process) cannot switch drafting off.

    A kind the plan stopped choosing is never observed again on its own, so a few slow steps at
    a bad moment (a cold start, another engine starting on the same cores, a trainer process)
    would price it out for the engine's lifetime. :meth:`probe` therefore measures a kind afresh
    once ``reprobe_after`` observed steps have passed in its bucket without it (its old fit is
    dropped, then ``min_steps`` steps of it are run): drafting comes back after a transient, and
    where it really does not pay the re-measurement costs ``min_steps`` one-draft steps per
    ``reprobe_after`` steps.
    """

    weight: float = 0.2  # weight of the newest step in the decayed sums
    min_steps: int = 3
    max_ratio: float = 4.0
    max_extra_ratio: float = 10.0  # the extra part: the bare calibration can miss most of it
    max_probes: int = 12  # probe steps per (bucket, kind): a kind that cannot be observed stops being probed
    reprobe_after: int = 128  # observed steps in a bucket without a kind before that kind is measured afresh
    slope_prior: float = 0.02  # drafting fit: ridge towards r = 1, as a variance relative to mean(x)^2
    explore_every: int = 8  # every n-th planned drafting step of a bucket runs one depth more or less
    planned: dict[int, int] = field(default_factory=dict)  # planned drafting steps per bucket
    probes: dict[tuple[int, bool], int] = field(default_factory=dict)
    # decayed weighted moments per (bucket, kind): (sum w, sum wx, sum wy, sum wx^2, sum wxy, steps)
    sums: dict[tuple[int, bool], tuple[float, float, float, float, float, int]] = field(default_factory=dict)
    steps: dict[int, int] = field(default_factory=dict)  # observed steps per bucket
    # the bucket's step count at each kind's last observation
    last_seen: dict[tuple[int, bool], int] = field(default_factory=dict)

    def fit(self, key: tuple[int, bool]) -> tuple[float, float, int]:
        """(c seconds, r, steps seen) for one (bucket, kind); plain steps have c = 0."""
        sw, sx, sy, sxx, sxy, n = self.sums[key]
        if not key[1]:
            return 0.0, sxy / sxx, n
        mx, my = sx / sw, sy / sw
        vxx, vxy = max(sxx / sw - mx * mx, 0.0), sxy / sw - mx * my
        prior = self.slope_prior * mx * mx
        r = min(max((vxy + prior) / (vxx + prior), 1.0 / self.max_ratio), self.max_extra_ratio)
        return my - r * mx, r, n

    @property
    def ratios(self) -> dict[tuple[int, bool], tuple[float, int]]:
        """(fitted r, steps seen) per (bucket, kind), from the decayed sums."""
        return {key: (r, n) for key, (_, r, n) in ((k, self.fit(k)) for k in self.sums)}

    @staticmethod
    def bucket(batch: int) -> int:
        return max(int(batch), 1).bit_length()

    def observe(self, batch: int, drafting: bool, predicted_s: float, observed_s: float, base_s: float) -> None:
        """One decode-only step: the model's prediction for it, its wall time, and the model's
        plain step for the same batch (``base_s``; equal to ``predicted_s`` for a plain step)."""
        if predicted_s <= 0 or observed_s <= 0 or batch <= 0:
            return
        if drafting and 0 < base_s < predicted_s:
            x = predicted_s - base_s
            y = min(max(observed_s - self.factor(batch, False) * base_s, x / self.max_ratio), x * self.max_extra_ratio)
        else:
            x = predicted_s
            y = min(max(observed_s, x / self.max_ratio), x * self.max_ratio)
        key = (self.bucket(batch), bool(drafting))
        *moments, n = self.sums.get(key, (0.0, 0.0, 0.0, 0.0, 0.0, 0))
        w = max(self.weight, 1.0 / (n + 1))  # equal weights for the first steps, then exponential decay
        self.sums[key] = (*((1.0 - w) * m + w * v for m, v in zip(moments, (1.0, x, y, x * x, x * y), strict=True)),
                          n + 1)
        self.steps[key[0]] = self.steps.get(key[0], 0) + 1
        self.last_seen[key] = self.steps[key[0]]

    def factor(self, batch: int, drafting: bool) -> float:
        """The ratio for this kind of step at the nearest measured batch bucket; a kind never
        measured yet takes the other kind's ratio (the model's relative costs are trusted until
        measured: a model uniformly off by 4x must not make the unmeasured kind look 4x cheaper
        or dearer, or drafting could never start); 1 when nothing is measured."""
        return self._nearest(batch, drafting)[1]

    def overhead(self, batch: int) -> float:
        """Seconds every drafting step pays on top of the plain step whatever its drafts (the
        drafting fit's c at the nearest measured bucket; 0 until drafting steps are measured)."""
        return self._nearest(batch, True, fallback=False)[0]

    def _nearest(self, batch: int, drafting: bool, fallback: bool = True) -> tuple[float, float]:
        for kind in (bool(drafting), not drafting) if fallback else (bool(drafting),):
            ready = [k for k, (_, n) in self.ratios.items() if k[1] == kind and n >= self.min_steps]
            if ready:
                b = self.bucket(batch)
                c, r, _ = self.fit(min(ready, key=lambda k: (abs(k[0] - b), k[0])))
                return (c if kind == bool(drafting) else 0.0), r
        return 0.0, 1.0

    def probe(self, batch: int, drafting: bool) -> bool | None:
        """The kind of step to run instead of the planned one (``drafting`` = the plan drafts), or
        None. Only the relative cost of the two kinds decides the plan, so once the planned kind
        is measured in this bucket and the other is not, the other is run until it is measured
        too (a plain probe costs a little speed, a drafting probe drafts one token per request);
        each kind is probed at most ``max_probes`` steps per bucket and measurement. A measured
        kind not observed for ``reprobe_after`` of the bucket's steps is measured afresh."""
        b = self.bucket(batch)
        other = (b, not drafting)
        if self.ratios.get((b, bool(drafting)), (0.0, 0))[1] < self.min_steps:
            return None
        if self.ratios.get(other, (0.0, 0))[1] >= self.min_steps:
            if self.steps.get(b, 0) - self.last_seen.get(other, 0) < self.reprobe_after:
                return None
            del self.sums[other]  # stale: whatever made it look as it did may have passed
            self.probes[other] = 0
        if self.probes.get(other, 0) >= self.max_probes:
            return None
        self.probes[other] = self.probes.get(other, 0) + 1
        return other[1]

    def explore(self, batch: int, depths: int, max_k: int) -> int | None:
        """The draft depth to run instead of the planned ``depths``, or None. The drafting fit
        can only tell the per-step part c from the per-depth scale r if the steps it sees draft
        different depths; a plan that settles on one depth would never show them (and a
        calibration that is off for deep drafts would then never be corrected), so every
        ``explore_every``-th planned drafting step of a bucket drafts one depth more or less
        (alternately, within 1..``max_k``). Costs at most one step in ``explore_every`` at a
        neighbouring depth; exactness does not depend on the depth."""
        if depths <= 0 or max_k < 2:
            return None
        b = self.bucket(batch)
        n = self.planned[b] = self.planned.get(b, 0) + 1
        if n % self.explore_every:
            return None
        up = depths == 1 or (depths < max_k and (n // self.explore_every) % 2 == 1)
        return depths + 1 if up else depths - 1

    def corrected(self, step_seconds: Callable[[Any, int], Any], batch: int,
                  base_tokens: int) -> Callable[[Any, int], Any]:
        """``step_seconds`` with its plain part (the plain step on ``base_tokens``) scaled by the
        plain factor, plus, for a drafting step, the drafting fit's per-step part and its scale on
        the rest; a drafting step is never priced below the plain step (a fit with a negative
        per-step part must not make drafting look free)."""
        import numpy as np

        plain, extra, overhead = self.factor(batch, False), self.factor(batch, True), self.overhead(batch)
        base = step_seconds(base_tokens, 0)

        def corrected(num_tokens: Any, depths: int) -> Any:
            if depths <= 0:
                return step_seconds(num_tokens, depths) * plain
            extra_part = overhead + (step_seconds(num_tokens, depths) - base) * extra
            return base * plain + np.maximum(extra_part, 0.0)

        return corrected

    def summary(self) -> str:
        def one(key: tuple[int, bool]) -> str:
            c, r, n = self.fit(key)
            kind = f"draft@{1 << (key[0] - 1)}+:{c * 1e3:+.1f}ms+" if key[1] else f"plain@{1 << (key[0] - 1)}+:"
            return f"{kind}{r:.2f}(n={n})"

        return " ".join(one(key) for key in sorted(self.sums)) or "none yet"
