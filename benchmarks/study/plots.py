"""The study's figures (matplotlib, Agg backend): one function per claim, each returns its file name."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from study.analytic import ENTROPY_BIN_EDGES  # noqa: E402
from study.common import MODES  # noqa: E402
from study.fits import select  # noqa: E402

COLORS = {"probabilistic": "tab:blue", "greedy": "tab:orange"}
LABELS = {"probabilistic": "rejection sampling (probabilistic drafts)", "greedy": "greedy drafts"}
LOSS_COLORS = {"e2e-tv": "tab:green", "ce": "tab:gray", "kl": "tab:purple", "tv": "tab:olive", "hybrid": "tab:cyan",
               "random-init": "tab:red"}


def _save(fig: Any, out_dir: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out_dir / name, dpi=110)
    plt.close(fig)
    return name


def entropy_scatter(records: list[dict[str, Any]], fits: dict[str, Any], head: str, domains: list[str],
                    out_dir: Path) -> str:
    """Claim 1: per-request acceptance vs mean target entropy, per domain, with the linear fits."""
    cols = [*domains, "all"]
    fig, axes = plt.subplots(1, len(cols), figsize=(4.2 * len(cols), 3.8), sharey=True)
    temps = sorted({r["temperature"] for r in records})
    markers = dict(zip(temps, "o^sDvP*X", strict=False))
    for ax, d in zip(np.atleast_1d(axes), cols, strict=True):
        rs = select(records, head=head, domain=d)
        for mode in MODES:
            for t in temps:
                pts = [r for r in rs if abs(r["temperature"] - t) < 1e-9]
                ax.scatter([r["stats"]["entropy"] for r in pts], [r["stats"][mode]["acceptance"] for r in pts],
                           s=16, alpha=0.6, color=COLORS[mode], marker=markers.get(t, "o"),
                           label=f"T={t:g}" if mode == "probabilistic" and d == cols[0] else None)
            f = fits[mode][d]["acceptance"]
            if rs and math.isfinite(f["slope"]):
                xs = np.linspace(min(r["stats"]["entropy"] for r in rs), max(r["stats"]["entropy"] for r in rs), 20)
                ax.plot(xs, f["intercept"] + f["slope"] * xs, color=COLORS[mode], lw=2,
                        label=f"{mode}: {f['intercept']:.2f}{f['slope']:+.3f}·H, R²={f['r2']:.2f}")
        ax.set_title(f"{d} ({len(rs)} requests)")
        ax.set_xlabel("mean target entropy per request (nats, at T)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6.5, loc="lower left")
    np.atleast_1d(axes)[0].set_ylabel("draft acceptance rate (E[τ]-1)/g")
    fig.suptitle(f"Claim 1 — acceptance vs entropy, head {head} (analytic, teacher-forced); "
                 "blue: rejection sampling, orange: greedy drafts", fontsize=9)
    return _save(fig, out_dir, "claim1_entropy_vs_acceptance.png")


def binned_tokens(curves: dict[str, list[float]], head: str, out_dir: Path) -> str:
    """Claim 1, per token: first-depth acceptance by entropy bin with greedy's ceiling max_v p."""
    centers = (ENTROPY_BIN_EDGES[:-1] + ENTROPY_BIN_EDGES[1:]) / 2
    cnt = np.asarray(curves.get("count", []), float)
    keep = cnt >= 20
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for key, label, color, ls in (("alpha_prob", LABELS["probabilistic"], COLORS["probabilistic"], "-"),
                                  ("alpha_greedy", LABELS["greedy"], COLORS["greedy"], "-"),
                                  ("pmax", "greedy ceiling: max_v p", "black", "--")):
        if key in curves:
            y = np.asarray(curves[key], float)
            ax.plot(centers[keep], y[keep], ls, color=color, marker="o", ms=3, label=label)
    ax.set_xlabel("target entropy at the verified position (nats, bins of 0.25; ≥20 tokens per bin)")
    ax.set_ylabel("first-depth acceptance α₁")
    ax.set_title(f"Per-token acceptance vs entropy, head {head} (analytic, all temperatures)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out_dir, "claim1_per_token_binned.png")


def temperature_curves(rows: list[dict[str, Any]], head: str, out_dir: Path) -> str:
    """Claim 2: acceptance and E[tau] vs temperature for both draft modes."""
    t = [r["temperature"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, ylabel in ((axes[0], "acceptance", "draft acceptance rate (E[τ]-1)/g"),
                            (axes[1], "tau", "mean accepted length E[τ] (tokens / verify step)")):
        for mode in MODES:
            y = [r[f"{key}_{mode}"] for r in rows]
            se = [r[f"{key}_{mode}_se"] if math.isfinite(r[f"{key}_{mode}_se"]) else 0 for r in rows]
            ax.errorbar(t, y, yerr=se, marker="o", color=COLORS[mode], label=LABELS[mode], capsize=3)
        for r in rows:
            ax.annotate(f"+{r[f'gap_{key}']:.2f}" if r[f"gap_{key}"] >= 0 else f"{r[f'gap_{key}']:.2f}",
                        (r["temperature"], r[f"{key}_probabilistic"]), textcoords="offset points", xytext=(0, 6),
                        ha="center", fontsize=7)
        ax.set_xlabel("sampling temperature T")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax2 = axes[0].twiny()
    ax2.set_xlim(axes[0].get_xlim())
    ax2.set_xticks(t)
    ax2.set_xticklabels([f"{r['entropy']:.2f}" for r in rows], fontsize=7)
    ax2.set_xlabel("mean target entropy (nats)", fontsize=8)
    fig.suptitle(f"Claim 2 — rejection sampling vs greedy drafting, head {head} (analytic; gap annotated)",
                 fontsize=9)
    return _save(fig, out_dir, "claim2_temperature_sweep.png")


def loss_bars(comparison: dict[str, Any], g: int, out_dir: Path) -> str:
    """Claim 3: alpha per depth and E[tau] per head loss at each comparison temperature."""
    temps = list(comparison)
    fig, axes = plt.subplots(1, 2 * len(temps), figsize=(5 * len(temps) * 2 * 0.75, 3.8), squeeze=False)
    for ti, t in enumerate(temps):
        heads = list(comparison[t]["heads"])
        ax_a, ax_t = axes[0, 2 * ti], axes[0, 2 * ti + 1]
        width = 0.8 / max(len(heads), 1)
        for hi, h in enumerate(heads):
            res = comparison[t]["heads"][h]["probabilistic"]
            xs = np.arange(g) + hi * width
            ax_a.bar(xs, res["alpha"], width, label=h, color=LOSS_COLORS.get(h))
            ax_t.bar(hi, res["tau"], 0.7, color=LOSS_COLORS.get(h))
            ax_t.text(hi, res["tau"], f"{res['tau']:.2f}", ha="center", va="bottom", fontsize=8)
        ax_a.set_xticks(np.arange(g) + width * (len(heads) - 1) / 2, [f"α{j + 1}" for j in range(g)])
        ax_a.set_ylabel("held-out acceptance per depth")
        ax_a.set_title(f"T={t}: α per depth (probabilistic)", fontsize=9)
        ax_a.legend(fontsize=7)
        ax_a.set_ylim(0, 1)
        ax_t.set_xticks(range(len(heads)), heads, fontsize=8)
        ax_t.set_ylabel("E[τ] (tokens / verify step)")
        ax_t.set_title(f"T={t}: mean accepted length", fontsize=9)
        ax_t.set_ylim(1, g + 1)
        for ax in (ax_a, ax_t):
            ax.grid(alpha=0.3, axis="y")
    fig.suptitle("Claim 3 — heads by training loss (analytic, held-out prompts)", fontsize=9)
    return _save(fig, out_dir, "claim3_losses.png")


def throughput(rows: list[dict[str, Any]], out_dir: Path) -> str:
    """Claim 4: batch-1 speedup vs no speculation per config, against measured accepted length."""
    ok = [r for r in rows if r.get("speedup") is not None]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    names = [r["config"] for r in ok]
    axes[0].bar(range(len(ok)), [r["speedup"] for r in ok],
                color=[COLORS.get(r.get("mode") or "", "tab:gray") for r in ok])
    axes[0].axhline(1.0, color="black", lw=1, ls="--")
    axes[0].set_xticks(range(len(ok)), names, rotation=25, ha="right", fontsize=7)
    axes[0].set_ylabel("tokens/s ÷ no-speculation tokens/s")
    axes[0].set_title("batch-1 speedup (engine, same run)", fontsize=9)
    for i, r in enumerate(ok):
        axes[0].text(i, r["speedup"], f"{r['speedup']:.2f}×", ha="center", va="bottom", fontsize=7)
    spec = [r for r in ok if r.get("measured_tau") is not None]
    axes[1].scatter([r["measured_tau"] for r in spec], [r["speedup"] for r in spec],
                    c=[COLORS.get(r["mode"], "tab:gray") for r in spec])
    for r in spec:
        axes[1].annotate(r["config"].replace("bebop-", ""), (r["measured_tau"], r["speedup"]), fontsize=7,
                         textcoords="offset points", xytext=(3, 3))
    axes[1].axhline(1.0, color="black", lw=1, ls="--")
    axes[1].set_xlabel("measured mean accepted length (vLLM per-request metrics)")
    axes[1].set_ylabel("speedup")
    axes[1].set_title("throughput vs acceptance", fontsize=9)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle("Claim 4 — throughput follows acceptance (vLLM, CPU, batch 1)", fontsize=9)
    return _save(fig, out_dir, "claim4_throughput.png")


def predictor_plot(pred: dict[str, Any], head: str, out_dir: Path) -> str:
    """Beyond the paper: predicted vs actual E[tau] on the held-out half of the requests."""
    fig, axes = plt.subplots(1, len(MODES), figsize=(5 * len(MODES), 4))
    for ax, mode in zip(axes, MODES, strict=True):
        pts = pred[mode]["points"]
        ax.scatter([p["actual"] for p in pts], [p["predicted"] for p in pts], s=14, color=COLORS[mode], alpha=0.7)
        lo = min([p["actual"] for p in pts] + [p["predicted"] for p in pts] + [1.0])
        hi = max([p["actual"] for p in pts] + [p["predicted"] for p in pts] + [1.5])
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        ax.set_xlabel("actual E[τ] (analytic)")
        ax.set_ylabel("predicted from entropy")
        ax.set_title(f"{mode}: MAE {pred[mode]['mae_linear']:.3f} (constant: {pred[mode]['mae_constant']:.3f})",
                     fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Predicting accepted length from entropy, head {head} (fit half → evaluation half)", fontsize=9)
    return _save(fig, out_dir, "predictor.png")
