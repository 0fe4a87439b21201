"""Held-out learning curves of several training runs in one picture, each run a chain of stages.

A run is ``LABEL=LOG[,LOG...]``: the ``train_log.json`` files of its stages in order (a heads
folder works too: its ``train_log.json`` is read). A continued stage's curve is shifted by the
chain positions of the stages before it, so e.g. the shipped recipe's three KL stages draw one
line. Each evaluation point is the trainer's periodic held-out evaluation (``--eval-sequences``
sequences; the final evaluation of a stage, on all held-out sequences, is drawn as a larger
marker). Runs made on different machines evaluated on different held-out samples of the same
held-out prompts: compare their levels, not their third decimal.

    H=benchmarks/results/heads_training
    python benchmarks/plot_learning_curves.py \\
        "v6 recipe (KL x3, e2e-TV, aux-TV)=$H/kl_train_log.json,$H/v4_kl_train_log.json,\\
$H/v5_kl_train_log.json,heads/smollm2-135m-v5,heads/smollm2-135m-v6" \\
        "features recipe: KL, e2e-TV (v7)=$H/v7_kl_features_train_log.json,heads/smollm2-135m-v7" \\
        --out $H/v7_vs_v6_recipe.png

(A label may not contain "=".)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="LABEL=LOG[,LOG...]: a run's stage logs (train_log.json or heads folders)")
    p.add_argument("--out", type=Path, required=True, help="PNG to write")
    p.add_argument("--title", default="held-out E[tokens per verify step], teacher-forced, T = 1", help="plot title")
    return p.parse_args(argv)


def load_log(path: Path) -> dict[str, Any]:
    """A stage's train log: ``path`` itself or ``path/train_log.json``."""
    file = path / "train_log.json" if path.is_dir() else path
    if not file.is_file():
        raise SystemExit(f"no train log at {file} (expected a train_log.json or a heads folder holding one)")
    return json.loads(file.read_text())


def run_curve(logs: list[dict[str, Any]]) -> tuple[list[float], list[float], list[tuple[float, float]]]:
    """(chain positions in M, E[tokens/step]) of every periodic eval across the stages, and the
    stages' final evaluations, with each stage shifted by the positions of the stages before it."""
    xs: list[float] = []
    ys: list[float] = []
    finals: list[tuple[float, float]] = []
    offset = 0
    for log in logs:
        history = log["history"]
        for point in history:
            if "heldout" not in point:
                continue
            x = (offset + point["chains_seen"]) / 1e6
            y = point["heldout"]["expected_accepted_length"]
            if point.get("final"):
                finals.append((x, y))
            else:
                xs.append(x)
                ys.append(y)
        offset += max(p.get("chains_seen", 0) for p in history)
    return xs, ys, finals


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for spec in args.runs:
        label, _, paths = spec.partition("=")
        if not paths:
            raise SystemExit(f"run {spec!r} is not LABEL=LOG[,LOG...]")
        xs, ys, finals = run_curve([load_log(Path(p)) for p in paths.split(",")])
        (line,) = ax.plot(xs, ys, marker=".", label=label)
        if finals:
            ax.plot(*zip(*finals, strict=True), linestyle="none", marker="o", markersize=8, color=line.get_color())
    ax.set(xlabel="chain positions seen (M)", ylabel="E[tokens per verify step]", title=args.title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
