"""The study's statistics: linear fits, per-temperature gaps, loss comparisons, the predictor.

A *record* is one request (prompt + continuation sampled at temperature T) seen by one head:
``{"domain", "prompt_id", "temperature", "head", "stats": analytic.head_stats(...)}``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
from scipy import stats as sps

from study.common import MODES, prompt_half

Record = dict[str, Any]


def linfit(x: Iterable[float], y: Iterable[float]) -> dict[str, float]:
    """Least squares y = intercept + slope * x with R^2, the slope's standard error and p-value."""
    xa, ya = np.asarray(list(x), float), np.asarray(list(y), float)
    ok = np.isfinite(xa) & np.isfinite(ya)
    xa, ya = xa[ok], ya[ok]
    if len(xa) < 3 or np.ptp(xa) == 0:
        return {"n": int(len(xa)), "slope": math.nan, "intercept": math.nan, "r2": math.nan, "slope_se": math.nan,
                "p_value": math.nan}
    r = sps.linregress(xa, ya)
    return {
        "n": int(len(xa)),
        "slope": float(r.slope),
        "intercept": float(r.intercept),
        "r2": float(r.rvalue**2),
        "slope_se": float(r.stderr),
        "p_value": float(r.pvalue),
    }


def _mean_se(values: Iterable[float]) -> tuple[float, float]:
    v = np.asarray([x for x in values if math.isfinite(x)], float)
    if len(v) == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else math.nan


def select(records: list[Record], head: str | None = None, temperature: float | None = None,
           domain: str | None = None) -> list[Record]:
    return [
        r for r in records
        if (head is None or r["head"] == head)
        and (temperature is None or abs(r["temperature"] - temperature) < 1e-9)
        and (domain is None or domain == "all" or r["domain"] == domain)
    ]


# -- claim 1: entropy bounds acceptance ----------------------------------------------------------
def entropy_fits(records: list[Record], head: str, domains: list[str]) -> dict[str, Any]:
    """Per mode and domain (and all domains): acceptance = a + b * entropy over requests.

    Two acceptance measures: ``acceptance`` (vLLM's draft acceptance rate, (E[tau]-1)/g) and
    ``alpha1`` (first-depth one-step acceptance)."""
    out: dict[str, Any] = {}
    for mode in MODES:
        out[mode] = {}
        for d in [*domains, "all"]:
            rs = select(records, head=head, domain=d)
            x = [r["stats"]["entropy"] for r in rs]
            out[mode][d] = {
                "acceptance": linfit(x, [r["stats"][mode]["acceptance"] for r in rs]),
                "alpha1": linfit(x, [r["stats"][mode]["alpha"][0] for r in rs]),
                "tau": linfit(x, [r["stats"][mode]["tau"] for r in rs]),
            }
    return out


def binned_curves(records: list[Record], head: str) -> dict[str, list[float]]:
    """Per-token first-depth acceptance by entropy bin, pooled over all requests of ``head``."""
    rs = select(records, head=head)
    if not rs:
        return {}
    keys = rs[0]["stats"]["bins"].keys()
    tot = {k: np.sum([r["stats"]["bins"][k] for r in rs], axis=0) for k in keys}
    cnt = tot["count"]
    with np.errstate(invalid="ignore", divide="ignore"):
        out = {k: np.where(cnt > 0, tot[k] / cnt, np.nan).tolist() for k in keys if k != "count"}
    out["count"] = cnt.tolist()
    return out


# -- claim 2: rejection sampling vs greedy drafting over temperature ------------------------------
def temperature_sweep(records: list[Record], head: str, temperatures: list[float]) -> list[dict[str, Any]]:
    """Per temperature: request means (and standard errors) of entropy, acceptance and E[tau] for
    both modes, and the paired gap probabilistic - greedy."""
    rows = []
    for t in temperatures:
        rs = select(records, head=head, temperature=t)
        if not rs:
            continue
        row: dict[str, Any] = {"temperature": t, "n": len(rs)}
        row["entropy"], row["entropy_se"] = _mean_se(r["stats"]["entropy"] for r in rs)
        for mode in MODES:
            for k in ("acceptance", "tau"):
                row[f"{k}_{mode}"], row[f"{k}_{mode}_se"] = _mean_se(r["stats"][mode][k] for r in rs)
            row[f"alpha1_{mode}"], _ = _mean_se(r["stats"][mode]["alpha"][0] for r in rs)
        for k in ("acceptance", "tau"):
            row[f"gap_{k}"], row[f"gap_{k}_se"] = _mean_se(
                r["stats"]["probabilistic"][k] - r["stats"]["greedy"][k] for r in rs
            )
        rows.append(row)
    return rows


# -- claim 3: losses ------------------------------------------------------------------------------
def _pooled(rs: list[Record], mode: str, g: int) -> dict[str, Any]:
    a_sum = np.sum([r["stats"][mode]["alpha_sum"] for r in rs], axis=0)
    a_cnt = np.sum([r["stats"][mode]["alpha_count"] for r in rs], axis=0)
    tau = sum(r["stats"][mode]["tau_sum"] for r in rs) / max(sum(r["stats"][mode]["tau_count"] for r in rs), 1)
    return {"alpha": (a_sum / np.maximum(a_cnt, 1)).tolist(), "tau": float(tau), "acceptance": float((tau - 1) / g)}


def _paired_gain(a_recs: list[Record], b_recs: list[Record], mode: str, k: str, g: int, n_boot: int,
                 rng: np.random.Generator) -> dict[str, Any]:
    """Relative gain pooled(a)/pooled(b) - 1 over paired requests, with a bootstrap 95% CI."""

    def gain(idx: np.ndarray) -> float:
        a = _pooled([a_recs[i] for i in idx], mode, g)[k]
        b = _pooled([b_recs[i] for i in idx], mode, g)[k]
        return a / b - 1 if b > 0 else math.nan

    n = len(a_recs)
    point = gain(np.arange(n))
    if n > 1:
        boots = [gain(rng.integers(0, n, n)) for _ in range(n_boot)]
        lo, hi = (float(x) for x in np.nanpercentile(boots, [2.5, 97.5]))
    else:
        lo, hi = math.nan, math.nan
    return {"gain": point, "ci95": [lo, hi], "n": n}


def loss_comparison(
    records: list[Record], heads: list[str], temperatures: list[float], g: int, baseline_heads: tuple[str, ...],
    ours: str = "e2e-tv", n_boot: int = 1000, seed: int = 0,
) -> dict[str, Any]:
    """Held-out alpha per depth and E[tau] per head (chains pooled, as the trainer's held-out eval),
    and the relative gain of ``ours`` over each baseline with a paired bootstrap 95% CI over requests."""
    out: dict[str, Any] = {}
    rng = np.random.default_rng(seed)
    for t in temperatures:
        res: dict[str, Any] = {"heads": {}, "gains": {}}
        by_head = {h: {(r["domain"], r["prompt_id"]): r for r in select(records, head=h, temperature=t)} for h in heads}
        for h in heads:
            if by_head[h]:
                res["heads"][h] = {m: _pooled(list(by_head[h].values()), m, g) for m in MODES}
        if ours in by_head and by_head[ours]:
            for base in baseline_heads:
                if base == ours or not by_head.get(base):
                    continue
                common = sorted(set(by_head[ours]) & set(by_head[base]))
                if not common:
                    continue
                a_recs = [by_head[ours][c] for c in common]
                b_recs = [by_head[base][c] for c in common]
                gains: dict[str, Any] = {}
                for mode in MODES:
                    for k in ("tau", "acceptance"):
                        gains[f"{k}_{mode}"] = _paired_gain(a_recs, b_recs, mode, k, g, n_boot, rng)
                res["gains"][f"{ours}_vs_{base}"] = gains
        out[f"{t:g}"] = res
    return out


# -- beyond the paper: predict E[tau] per request from its entropy ---------------------------------
def predictor(records: list[Record], head: str, domains: list[str]) -> dict[str, Any]:
    """Fit E[tau] = a + b * entropy on one half of the prompts (all temperatures), evaluate the
    mean absolute error on the other half; baselines: the fit half's mean, and per-domain fits."""
    rs = select(records, head=head)
    fit_rs = [r for r in rs if prompt_half(r["domain"], r["prompt_id"]) == 0]
    eval_rs = [r for r in rs if prompt_half(r["domain"], r["prompt_id"]) == 1]
    out: dict[str, Any] = {"n_fit": len(fit_rs), "n_eval": len(eval_rs)}
    for mode in MODES:
        y_fit = [r["stats"][mode]["tau"] for r in fit_rs]
        f = linfit([r["stats"]["entropy"] for r in fit_rs], y_fit)
        per_domain = {d: linfit([r["stats"]["entropy"] for r in select(fit_rs, domain=d)],
                                [r["stats"][mode]["tau"] for r in select(fit_rs, domain=d)]) for d in domains}
        const = float(np.mean(y_fit)) if y_fit else math.nan
        actual, pred, pred_dom = [], [], []
        for r in eval_rs:
            actual.append(r["stats"][mode]["tau"])
            pred.append(f["intercept"] + f["slope"] * r["stats"]["entropy"])
            fd = per_domain.get(r["domain"], f)
            fd = fd if math.isfinite(fd["slope"]) else f
            pred_dom.append(fd["intercept"] + fd["slope"] * r["stats"]["entropy"])
        a = np.asarray(actual, float)

        def mae(p: list[float], a: np.ndarray = a) -> float:
            return float(np.mean(np.abs(np.asarray(p, float) - a))) if len(a) else math.nan

        out[mode] = {
            "fit": f,
            "per_domain_fit": per_domain,
            "mae_linear": mae(pred),
            "mae_per_domain": mae(pred_dom),
            "mae_constant": mae([const] * len(a)),
            "mean_actual": float(a.mean()) if len(a) else math.nan,
            "points": [{"entropy": r["stats"]["entropy"], "actual": y, "predicted": p, "domain": r["domain"],
                        "temperature": r["temperature"]} for r, y, p in zip(eval_rs, actual, pred, strict=True)],
        }
    return out
