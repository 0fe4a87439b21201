"""From stage results to claims, verdicts, study.json, study.md and the figures."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats as sps

from study import fits, plots
from study.common import FINETUNE_ORDER, LOSS_ORDER, MODES, StudyConfig
from study.report import write_markdown

# Verdict thresholds, stated in the report next to each verdict.
R2_STRONG = 0.5
P_SIGNIFICANT = 0.01


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _clean(x: Any) -> Any:
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python, tuples -> lists."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def claim1(entropy_fits: dict[str, Any]) -> dict[str, Any]:
    g = entropy_fits["greedy"]["all"]["acceptance"]
    p = entropy_fits["probabilistic"]["all"]["acceptance"]
    if not (_finite(g["slope"]) and _finite(p["slope"])):
        return {"verdict": "not tested", "why": "too few requests for a fit"}
    neg = g["slope"] < 0 and g["p_value"] < P_SIGNIFICANT
    if neg and g["r2"] >= R2_STRONG:
        verdict = "confirmed"
    elif neg:
        verdict = "partly"
    else:
        verdict = "not on our model"
    flatter = abs(p["slope"]) < 0.5 * abs(g["slope"])
    why = (
        f"greedy drafting: acceptance = {g['intercept']:.3f} {g['slope']:+.3f}·H (R² {g['r2']:.2f}, "
        f"p {g['p_value']:.1e}, n {g['n']}); rejection sampling: {p['intercept']:.3f} {p['slope']:+.3f}·H "
        f"(R² {p['r2']:.2f}). Rule: confirmed if the greedy slope is negative with p < {P_SIGNIFICANT} and "
        f"R² ≥ {R2_STRONG}; partly if negative and significant but R² < {R2_STRONG}. "
        f"Rejection sampling's slope is {'less' if flatter else 'not less'} than half of greedy's "
        f"({abs(p['slope']) / max(abs(g['slope']), 1e-12):.2f}×)."
    )
    return {"verdict": verdict, "why": why, "greedy": g, "probabilistic": p, "probabilistic_flatter": flatter}


def claim2(rows: list[dict[str, Any]]) -> dict[str, Any]:
    if len(rows) < 2:
        return {"verdict": "not tested", "why": "needs at least two temperatures"}
    gaps = [r["gap_acceptance"] for r in rows]
    ses = [r["gap_acceptance_se"] if _finite(r["gap_acceptance_se"]) else 0.0 for r in rows]
    always = all(gp > 2 * se and gp > 0 for gp, se in zip(gaps, ses, strict=True))
    trend = fits.linfit([r["temperature"] for r in rows], gaps)
    grows = _finite(trend["slope"]) and trend["slope"] > 0 and trend["p_value"] < 0.05
    if always and grows:
        verdict = "confirmed"
    elif always or (grows and gaps[-1] > 0):
        verdict = "partly"
    else:
        verdict = "not on our model"
    why = (
        "gap (rejection sampling − greedy) in draft acceptance rate per T: "
        + ", ".join(f"T={r['temperature']:g}: {r['gap_acceptance']:+.3f}±{r['gap_acceptance_se']:.3f}" for r in rows)
        + f"; gap vs T slope {trend['slope']:+.3f}/unit T (p {trend['p_value']:.2g}). Rule: confirmed if the gap "
        "is > 0 (by > 2 s.e.) at every T and grows with T (p < 0.05); partly if only one of the two holds."
    )
    return {"verdict": verdict, "why": why, "gap_trend": trend, "gap_positive_everywhere": always}


def claim3(comparison: dict[str, Any], available: list[str], ours: str = "e2e-tv") -> dict[str, Any]:
    baselines = [b for b in ("ce", "kl") if b in available]
    missing = [b for b in ("ce", "kl", ours) if b not in available]
    if ours not in available or not baselines:
        return {"verdict": "not tested", "why": f"heads missing: {missing}", "missing": missing}
    cells, wins, losses_ = [], 0, 0
    for t, res in comparison.items():
        for b in baselines:
            gst = res["gains"].get(f"{ours}_vs_{b}", {}).get("acceptance_probabilistic")
            if not gst:
                continue
            lo, hi = gst["ci95"]
            cells.append(f"T={t} vs {b}: {100 * gst['gain']:+.1f}% (95% CI {100 * lo:+.1f}…{100 * hi:+.1f}%)")
            wins += int(_finite(lo) and lo > 0)
            losses_ += int(_finite(hi) and hi < 0)
    n = len(cells)
    if n and wins == n:
        verdict = "confirmed"
    elif wins > 0:
        verdict = "partly"
    else:
        verdict = "not on our model"
    why = (
        "relative gain of e2e-TV heads in draft acceptance rate (probabilistic drafting, held-out, analytic): "
        + "; ".join(cells)
        + f". Rule: confirmed if every CI is above 0; partly if some are. Missing heads: {missing or 'none'}."
    )
    finetune = []
    for t, res in comparison.items():
        gst = res["gains"].get(f"{FINETUNE_ORDER[0]}_vs_{FINETUNE_ORDER[1]}", {}).get("acceptance_probabilistic")
        if gst:
            lo, hi = gst["ci95"]
            finetune.append(f"T={t}: {100 * gst['gain']:+.1f}% (95% CI {100 * lo:+.1f}…{100 * hi:+.1f}%)")
    if finetune:
        why += (" Fine-tuning CE heads with e2e-TV vs the same extra steps of CE (not part of the verdict): "
                + "; ".join(finetune) + ".")
    return {"verdict": verdict, "why": why, "wins": wins, "significant_losses": losses_, "cells": n,
            "missing": missing, "finetune": finetune}


def _agg(timed: list[dict[str, Any]]) -> tuple[float, float, dict[tuple[int, float], float]]:
    """(total tokens / total seconds, median per-request tokens/s, per-request tokens/s)."""
    toks = sum(len(r["tokens"]) for r in timed)
    secs = sum(r["seconds"] for r in timed)
    per = {(r["prompt_index"], r["temperature"]): len(r["tokens"]) / r["seconds"] for r in timed}
    return toks / secs, float(np.median(list(per.values()))), per


def throughput_rows(engines: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per engine; speedups are against the no-speculation engine of the same group."""
    base = engines.get("none", {})
    if not base.get("timed"):
        return []
    b_tps, b_med, _ = _agg(base["timed"])
    rows = [{"config": "no speculation", "mode": None, "loss": None, "k": 0, "tokens_per_s": b_tps,
             "median_request_tokens_per_s": b_med, "speedup": 1.0, "median_paired_speedup": 1.0,
             "measured_tau": None, "measured_acceptance": None, "requests": len(base["timed"]), "group": 0}]
    for name, r in engines.items():
        if name == "none":
            continue
        if "error" in r:
            rows.append({"config": name, "mode": r.get("mode"), "loss": r.get("loss"), "k": r.get("k"),
                         "error": r["error"][-600:], "speedup": None})
            continue
        tps, med, per = _agg(r["timed"])
        g_tps, _, g_per = _agg(r["baseline_timed"])
        paired = [per[k] / g_per[k] for k in per if k in g_per]
        specs = [x["spec"] for x in r["timed"] if x.get("spec")]
        steps = sum(s.get("num_spec_steps", 0) for s in specs)
        acc = sum(s.get("num_accepted_draft_tokens", 0) for s in specs)
        drafted = sum(s.get("num_draft_tokens", 0) for s in specs)
        ents = [s["mean_target_entropy"] for s in specs if isinstance(s.get("mean_target_entropy"), (int, float))]
        rows.append({
            "config": name, "mode": r["mode"], "loss": r["loss"], "k": r.get("k"), "tokens_per_s": tps,
            "median_request_tokens_per_s": med, "group_baseline_tokens_per_s": g_tps, "speedup": tps / g_tps,
            "median_paired_speedup": float(np.median(paired)) if paired else None,
            "measured_tau": 1 + acc / steps if steps else None,
            "measured_acceptance": acc / drafted if drafted else None,
            "engine_mean_target_entropy": float(np.mean(ents)) if ents else None,
            "requests": len(r["timed"]), "startup_seconds": r.get("startup_seconds"), "group": r.get("group"),
        })
    return rows


def claim4(rows: list[dict[str, Any]]) -> dict[str, Any]:
    spec = [r for r in rows if r.get("measured_tau") is not None and r.get("speedup") is not None]
    failed = [r["config"] for r in rows if r.get("error")]
    if not spec:
        return {"verdict": "not tested", "why": f"no successful speculative engine run (failed: {failed})"}
    # no speculation is the point (1 token per step, speedup 1) every configuration is compared with
    taus = [1.0] + [r["measured_tau"] for r in spec]
    speedups = [1.0] + [r["speedup"] for r in spec]
    rho = float(sps.spearmanr(taus, speedups).statistic)
    best = max(spec, key=lambda r: r["speedup"])
    if _finite(rho) and rho >= 0.8 and best["speedup"] > 1:
        verdict = "confirmed"
    elif (_finite(rho) and rho > 0) or best["speedup"] > 1:
        verdict = "partly"
    else:
        verdict = "not on our model"
    why = (
        f"Spearman ρ(measured accepted length, speedup) = {rho:.2f} over {len(spec)} speculative configurations "
        "and no speculation; best "
        f"{best['config']} {best['speedup']:.2f}× at measured E[τ] {best['measured_tau']:.2f}. Rule: confirmed "
        "if ρ ≥ 0.8 and some configuration beats no speculation; partly if ρ > 0 or some beats it."
        + (f" Failed runs: {failed}." if failed else "")
    )
    return {"verdict": verdict, "why": why, "spearman": rho}


def draft_length_policy(cfg: StudyConfig, engines: dict[str, Any], crosscheck: dict[str, Any],
                        records: list[dict[str, Any]]) -> dict[str, Any]:
    """Entropy-aware draft length, estimated (not an engine option yet): measured cost of a verify
    step with k drafts (fixed-k engines of the primary head, relative to the same group's
    no-speculation per-token time) and analytic E[tau_k] of the engine's own requests; the policy
    picks k per request from its entropy with per-k linear fits made on the held-out samples."""
    g = cfg.num_depths
    cost: dict[int, float] = {}
    for e in engines.values():
        if e.get("loss") != cfg.primary or e.get("mode") != "probabilistic" or "timed" not in e:
            continue
        steps = sum((x.get("spec") or {}).get("num_spec_steps", 0) for x in e["timed"])
        secs = sum(x["seconds"] for x in e["timed"])
        b_tok = sum(len(x["tokens"]) for x in e["baseline_timed"])
        b_secs = sum(x["seconds"] for x in e["baseline_timed"])
        if steps and b_tok:
            cost[int(e["k"])] = (secs / steps) / (b_secs / b_tok)
    full = f"bebop-{cfg.primary}-probabilistic"
    rows = [r for r in crosscheck.get(full, []) if r.get("analytic_tau_by_k")]
    if sorted(cost) != list(range(1, g + 1)) or not rows:
        return {"available": False, "why": f"needs fixed-k engines k=1..{g} of {cfg.primary} (have {sorted(cost)})"}
    rs = fits.select(records, head=cfg.primary)
    xs = [r["stats"]["entropy"] for r in rs]
    kfits = [fits.linfit(xs, [r["stats"]["probabilistic"]["tau_by_k"][k - 1] for r in rs]) for k in range(1, g + 1)]
    fixed = {k: float(np.mean([r["analytic_tau_by_k"][k - 1] / cost[k] for r in rows])) for k in cost}
    chosen, policy, oracle = [], [], []
    for r in rows:
        h = r["entropy_teacher_forced"]
        pred = {k: (kfits[k - 1]["intercept"] + kfits[k - 1]["slope"] * h) / cost[k] for k in cost}
        k_r = max(pred, key=pred.get)
        chosen.append(k_r)
        policy.append(r["analytic_tau_by_k"][k_r - 1] / cost[k_r])
        oracle.append(max(r["analytic_tau_by_k"][k - 1] / cost[k] for k in cost))
    return {
        "available": True,
        "relative_step_cost": {str(k): v for k, v in sorted(cost.items())},
        "estimated_speedup_fixed_k": {str(k): v for k, v in sorted(fixed.items())},
        "estimated_speedup_entropy_policy": float(np.mean(policy)),
        "estimated_speedup_oracle_per_request": float(np.mean(oracle)),
        "chosen_k_counts": {str(k): chosen.count(k) for k in sorted(cost)},
        "n_requests": len(rows),
    }


def crosscheck_summary(crosscheck: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for name, rows in crosscheck.items():
        ok = [r for r in rows if r["analytic_tau"] is not None and r["measured_tau"] is not None]
        if not ok:
            out[name] = {"n": 0}
            continue
        a = np.array([r["analytic_tau"] for r in ok])
        m = np.array([r["measured_tau"] for r in ok])
        ent_e = [r["engine_entropy"] for r in ok if r["engine_entropy"] is not None]
        ent_t = [r["entropy_teacher_forced"] for r in ok if r["engine_entropy"] is not None]
        out[name] = {
            "n": len(ok),
            "mean_analytic_tau": float(a.mean()),
            "mean_measured_tau": float(m.mean()),
            "mae_tau": float(np.abs(a - m).mean()),
            "pearson": float(np.corrcoef(a, m)[0, 1]) if len(ok) > 2 and a.std() > 0 and m.std() > 0 else None,
            "engine_entropy_available": bool(ent_e),
            "entropy_mae_engine_vs_teacher_forced": float(np.abs(np.array(ent_e) - np.array(ent_t)).mean())
            if ent_e else None,
        }
    return out


def summarize(
    cfg: StudyConfig,
    prompts: list[dict[str, Any]],
    records: list[dict[str, Any]],
    engines: dict[str, Any],
    crosscheck: dict[str, Any],
    meta: dict[str, Any],
    out_dir: Path,
) -> dict[str, Any]:
    heads = [h for h in cfg.heads]
    efits = fits.entropy_fits(records, cfg.primary, cfg.domains)
    sweep = fits.temperature_sweep(records, cfg.primary, cfg.temperatures)
    comparison = fits.loss_comparison(records, heads, cfg.compare_temperatures, cfg.num_depths,
                                      baseline_heads=tuple(h for h in heads if h in LOSS_ORDER and h != "e2e-tv"))
    if all(h in heads for h in FINETUNE_ORDER):  # same extra budget on a CE start: e2e-TV vs more CE
        finetune = fits.loss_comparison(records, heads, cfg.compare_temperatures, cfg.num_depths,
                                        baseline_heads=(FINETUNE_ORDER[1],), ours=FINETUNE_ORDER[0])
        for t, res in finetune.items():
            comparison[t]["gains"].update(res["gains"])
    pred = fits.predictor(records, cfg.primary, cfg.domains)
    curves = fits.binned_curves(records, cfg.primary)
    tput = throughput_rows(engines) if cfg.engine else []
    policy = draft_length_policy(cfg, engines, crosscheck, records) if cfg.engine else {"available": False}
    claims = {
        "1_entropy_bounds_acceptance": claim1(efits),
        "2_rejection_beats_greedy": claim2(sweep),
        "3_e2e_tv_beats_ce_kl": claim3(comparison, heads),
        "4_throughput_follows_acceptance": claim4(tput) if cfg.engine else {"verdict": "not tested",
                                                                           "why": "--no-engine"},
    }
    figures = [
        plots.entropy_scatter(records, efits, cfg.primary, cfg.domains, out_dir),
        plots.binned_tokens(curves, cfg.primary, out_dir),
        plots.temperature_curves(sweep, cfg.primary, out_dir),
        plots.loss_bars(comparison, cfg.num_depths, out_dir),
        plots.predictor_plot(pred, cfg.primary, out_dir),
    ]
    if tput:
        figures.append(plots.throughput(tput, out_dir))
    engine_info = {
        name: {k: v for k, v in r.items() if k not in ("sample", "timed")} for name, r in engines.items()
    }
    summary = {
        "meta": meta,
        "config": {k: v for k, v in cfg.__dict__.items()},
        "prompts": [{"domain": p["domain"], "prompt_id": p["prompt_id"], "prompt_tokens": len(p["ids"])}
                    for p in prompts],
        "claims": claims,
        "entropy_fits": efits,
        "temperature_sweep": sweep,
        "loss_comparison": comparison,
        "predictor": {m: {k: v for k, v in pred[m].items() if k != "points"} for m in MODES}
        | {"n_fit": pred["n_fit"], "n_eval": pred["n_eval"]},
        "per_token_binned": curves,
        "throughput": tput,
        "engines": engine_info,
        "crosscheck": crosscheck_summary(crosscheck),
        "draft_length_policy": policy,
        "figures": figures,
        "requests": [{k: v for k, v in r.items() if k != "stats"}
                     | {"entropy": r["stats"]["entropy"], "pmax": r["stats"]["pmax"]}
                     | {f"{m}_{k}": r["stats"][m][k] for m in MODES for k in ("alpha", "tau", "acceptance")}
                     for r in records],
    }
    (out_dir / "study.json").write_text(json.dumps(_clean(summary), indent=1) + "\n")
    write_markdown(summary, out_dir / "study.md")
    return summary
