"""``AcceptanceMonitor``: are frozen pre-RL heads going stale as the policy trains?

Raw acceptance is no staleness signal: RL moves the policy's entropy, and acceptance moves with
entropy even for perfectly fresh heads. So the monitor compares each RL step's acceptance with what
the *pre-RL* acceptance-vs-entropy fit predicts at that step's entropy, per draft position.

The fit (:class:`AcceptanceFit`): for draft position i, ``acceptance_i(H) = a_i + b_i * H`` by
least squares over sequences (x = the sequence's mean target entropy in nats, y = its accepted /
proposed drafts at position i, weighted by its proposed drafts at i), on rollouts of the policy
before RL. Acceptance is vLLM's per-position rate (unconditional: accepting depth i needs every
earlier depth accepted).

Drift rule (``AcceptanceMonitor.RULE``), per RL step, all positions pooled:
    predicted = sum over sequences and positions of drafts_i * clip(a_i + b_i * H_seq, 0, 1) / drafts
    gap = predicted - observed  (observed = accepted drafts / proposed drafts)
    se = cluster-robust standard error of the gap, sequences as clusters:
         sqrt(sum_seq (accepted_seq - predicted_seq)^2) / drafts
    the step is *below the fit* if gap > max(tolerance, z * se)   (defaults 0.05 absolute, z = 3)
    drift is flagged once `patience` consecutive steps (default 2) are below the fit, and stays
    flagged until a step is not.
The fit's own uncertainty is not propagated; ``tolerance`` absorbs it. A step whose entropy lies
outside the fitted range is marked ``extrapolated``.

Greedy drafting vs rejection sampling: given a second fit from greedy-drafting rollouts of the same
pre-RL policy, the two lines cross at ``H* = (a_g - a_p) / (b_p - b_g)``; :meth:`greedy_crossover`
says on which side of H* greedy drafting accepts more (per position), and each step report says
whether greedy would beat rejection sampling at that step's entropy.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bebop_vllm.rl.stats import RolloutStats, SequenceRecord


@dataclass(frozen=True)
class PositionFit:
    """acceptance(H) = intercept + slope * H for one draft position."""

    intercept: float
    slope: float
    n: int  # sequences used
    drafts: int  # proposed drafts behind the fit
    residual_sd: float  # weighted sd of per-sequence residuals

    def predict(self, entropy: float) -> float:
        return min(1.0, max(0.0, self.intercept + self.slope * entropy))


def _wls(x: Sequence[float], y: Sequence[float], w: Sequence[float]) -> tuple[float, float, float]:
    """Weighted least squares y = a + b x; returns (a, b, weighted residual sd). Flat x -> b = 0."""
    sw = math.fsum(w)
    mx = math.fsum(wi * xi for wi, xi in zip(w, x, strict=True)) / sw
    my = math.fsum(wi * yi for wi, yi in zip(w, y, strict=True)) / sw
    sxx = math.fsum(wi * (xi - mx) ** 2 for wi, xi in zip(w, x, strict=True))
    sxy = math.fsum(wi * (xi - mx) * (yi - my) for wi, xi, yi in zip(w, x, y, strict=True))
    b = sxy / sxx if sxx > 1e-12 else 0.0
    a = my - b * mx
    res = math.fsum(wi * (yi - a - b * xi) ** 2 for wi, xi, yi in zip(w, x, y, strict=True)) / sw
    return a, b, math.sqrt(res)


def _records(data: RolloutStats | Iterable[SequenceRecord]) -> list[SequenceRecord]:
    recs = data.sequences if isinstance(data, RolloutStats) else list(data)
    return [r for r in recs if r.mean_entropy is not None and sum(r.drafted_per_pos) > 0]


@dataclass(frozen=True)
class AcceptanceFit:
    """Per-position acceptance-vs-entropy lines fitted on pre-RL rollouts."""

    positions: tuple[PositionFit, ...]
    entropy_range: tuple[float, float]
    label: str = ""

    @classmethod
    def fit(cls, data: RolloutStats | Iterable[SequenceRecord] | Iterable[RolloutStats], label: str = "",
            min_sequences: int = 3) -> AcceptanceFit:
        """Fit from pre-RL rollouts: a RolloutStats, several (e.g. one per temperature), or records."""
        data = list(data) if not isinstance(data, RolloutStats) else data
        if isinstance(data, list) and data and isinstance(data[0], RolloutStats):
            recs = [r for s in data for r in _records(s)]
        else:
            recs = _records(data)
        if len(recs) < min_sequences:
            raise ValueError(f"an acceptance fit needs >= {min_sequences} sequences with drafts and entropy, "
                             f"got {len(recs)}")
        width = max(len(r.drafted_per_pos) for r in recs)
        fits = []
        for i in range(width):
            pts = [(r.mean_entropy, r.accepted_per_pos[i] / r.drafted_per_pos[i], r.drafted_per_pos[i])
                   for r in recs if i < len(r.drafted_per_pos) and r.drafted_per_pos[i] > 0]
            if not pts:
                fits.append(PositionFit(0.0, 0.0, 0, 0, 0.0))
                continue
            x, y, w = zip(*pts, strict=True)
            a, b, sd = _wls(x, y, w)
            fits.append(PositionFit(a, b, len(pts), int(sum(w)), sd))
        ents = [r.mean_entropy for r in recs]
        return cls(tuple(fits), (min(ents), max(ents)), label)

    @classmethod
    def from_study(cls, study_json: str | Path, head: str | None = None, mode: str = "probabilistic") -> AcceptanceFit:
        """From ``benchmarks/acceptance_study.py``'s study.json (analytic, teacher-forced per-request
        acceptance; its per-depth alphas are conditional, turned here into vLLM's unconditional rate
        by cumulative products). ``head`` defaults to the study's primary head."""
        study = json.loads(Path(study_json).read_text())
        head = head or study["config"]["primary"]
        recs = []
        for r in study["requests"]:
            if r["head"] != head or f"{mode}_alpha" not in r:
                continue
            cum, prod = [], 1.0
            for a in r[f"{mode}_alpha"]:
                prod *= a
                cum.append(prod)
            n = int(r.get("new_tokens", 1)) or 1
            # Pseudo-counts: n drafts per position, expected acceptances at the analytic rate.
            recs.append(SequenceRecord(n, n, tuple([n] * len(cum)), tuple(c * n for c in cum),  # type: ignore[arg-type]
                                       float(r["entropy"]), n))
        return cls.fit(recs, label=f"study:{head}:{mode}")

    def predict(self, position: int, entropy: float) -> float:
        return self.positions[position].predict(entropy)

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "entropy_range": list(self.entropy_range),
                "positions": [asdict(p) for p in self.positions]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AcceptanceFit:
        return cls(tuple(PositionFit(**p) for p in d["positions"]), tuple(d["entropy_range"]), d.get("label", ""))


@dataclass(frozen=True)
class Crossover:
    """Where greedy drafting's fitted acceptance meets rejection sampling's, for one position."""

    position: int
    entropy: float | None  # H*, None when the lines are parallel
    greedy_better: str  # "below" H*, "above" H*, "always" or "never" (parallel lines)
    within_fit_range: bool

    def greedy_wins_at(self, entropy: float) -> bool:
        if self.greedy_better in ("always", "never"):
            return self.greedy_better == "always"
        assert self.entropy is not None
        return entropy < self.entropy if self.greedy_better == "below" else entropy > self.entropy


def crossover(prob: PositionFit, greedy: PositionFit, position: int,
              entropy_range: tuple[float, float]) -> Crossover:
    da, db = greedy.intercept - prob.intercept, greedy.slope - prob.slope  # greedy - prob = da + db * H
    if abs(db) < 1e-12:
        return Crossover(position, None, "always" if da > 0 else "never", False)
    h = -da / db
    lo, hi = entropy_range
    return Crossover(position, h, "above" if db > 0 else "below", lo <= h <= hi)


@dataclass
class StepReport:
    step: int
    num_sequences: int
    entropy: float | None  # drafts-weighted mean sequence entropy of the step
    observed_per_pos: list[float]
    predicted_per_pos: list[float]
    observed: float  # pooled over positions
    predicted: float
    gap: float  # predicted - observed (positive: heads accept less than the pre-RL fit says)
    se: float
    threshold: float  # max(tolerance, z * se)
    below_fit: bool
    drift: bool  # the flag after `patience` consecutive steps below the fit
    extrapolated: bool
    greedy_would_win: list[bool] | None = None  # per position, at this step's entropy
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class AcceptanceMonitor:
    """Per RL step: acceptance per position vs the pre-RL fit at the step's entropy, and a drift flag."""

    RULE = ("below fit: predicted - observed pooled acceptance > max(tolerance, z * cluster-robust se); "
            "drift: `patience` consecutive steps below fit (defaults: tolerance 0.05, z 3, patience 2)")

    def __init__(self, baseline: AcceptanceFit, greedy_baseline: AcceptanceFit | None = None, *,
                 tolerance: float = 0.05, z: float = 3.0, patience: int = 2) -> None:
        if tolerance < 0 or z < 0 or patience < 1:
            raise ValueError("tolerance and z must be >= 0, patience >= 1")
        self.baseline, self.greedy_baseline = baseline, greedy_baseline
        self.tolerance, self.z, self.patience = tolerance, z, patience
        self.history: list[StepReport] = []
        self._run = 0

    def greedy_crossover(self) -> list[Crossover] | None:
        """Per position, the entropy where greedy drafting would start beating rejection sampling."""
        if self.greedy_baseline is None:
            return None
        lo = min(self.baseline.entropy_range[0], self.greedy_baseline.entropy_range[0])
        hi = max(self.baseline.entropy_range[1], self.greedy_baseline.entropy_range[1])
        n = min(len(self.baseline.positions), len(self.greedy_baseline.positions))
        return [crossover(self.baseline.positions[i], self.greedy_baseline.positions[i], i, (lo, hi))
                for i in range(n)]

    @property
    def drift(self) -> bool:
        return bool(self.history) and self.history[-1].drift

    def observe(self, data: RolloutStats | Iterable[SequenceRecord], step: int | None = None) -> StepReport:
        recs = _records(data)
        step = len(self.history) if step is None else step
        width = len(self.baseline.positions)
        drafted = [0] * width
        accepted = [0] * width
        pred_acc = [0.0] * width
        sq = 0.0
        ent_w = ent_n = 0.0
        for r in recs:
            seq_acc = seq_pred = 0.0
            for i in range(min(width, len(r.drafted_per_pos))):
                d = r.drafted_per_pos[i]
                if d == 0:
                    continue
                p = self.baseline.predict(i, r.mean_entropy)
                drafted[i] += d
                accepted[i] += r.accepted_per_pos[i]
                pred_acc[i] += d * p
                seq_acc += r.accepted_per_pos[i]
                seq_pred += d * p
                ent_w += d * r.mean_entropy
                ent_n += d
            sq += (seq_acc - seq_pred) ** 2
        total = sum(drafted)
        if total == 0:
            raise ValueError("this step has no sequence with drafts and entropy to compare with the fit")
        observed = sum(accepted) / total
        predicted = sum(pred_acc) / total
        gap = predicted - observed
        se = math.sqrt(sq) / total
        threshold = max(self.tolerance, self.z * se)
        below = gap > threshold
        self._run = self._run + 1 if below else 0
        entropy = ent_w / ent_n
        lo, hi = self.baseline.entropy_range
        cross = self.greedy_crossover()
        report = StepReport(
            step=step, num_sequences=len(recs), entropy=entropy,
            observed_per_pos=[a / d if d else math.nan for a, d in zip(accepted, drafted, strict=True)],
            predicted_per_pos=[p / d if d else math.nan for p, d in zip(pred_acc, drafted, strict=True)],
            observed=observed, predicted=predicted, gap=gap, se=se, threshold=threshold, below_fit=below,
            drift=self._run >= self.patience, extrapolated=not (lo <= entropy <= hi),
            greedy_would_win=None if cross is None else [c.greedy_wins_at(entropy) for c in cross],
        )
        self.history.append(report)
        return report
