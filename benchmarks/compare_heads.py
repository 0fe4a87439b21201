"""Paired teacher-forced comparison of trained heads folders on the same held-out sequences.

Each heads folder is evaluated with ``recipe_comparison.evaluate`` (every completion chain of
the held-out split's sequences sampled at each ``--temperatures`` value, over the heads' trained
draft vocabulary); every later folder is compared with the first, paired per sequence, with the
verdict rule of the other comparisons (better / worse beyond +-2 standard errors of the mean
paired difference in expected tokens per verify step). For heads trained elsewhere (a
continuation run, a candidate to ship) against the shipped ones:

    .venv/bin/python benchmarks/compare_heads.py heads/smollm2-135m-v5 ~/.cache/bebop/runs/v6-tv \
        --out benchmarks/results/v6_tv_vs_v5
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bebop_vllm.hardware import describe_machine_and_load, machine_info

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_results  # noqa: E402
from recipe_comparison import evaluate, paired, without_per_sequence  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Paired held-out comparison of heads folders (the first is the baseline).")
    p.add_argument("heads", nargs="+", type=Path, help="heads folders; the first is the baseline")
    p.add_argument("--temperatures", default="1.0,0.7", help="held-out sampling temperatures (default: 1.0,0.7)")
    p.add_argument("--data", type=Path, default=None, help="dataset folder (default: $BEBOP_HOME/data/...)")
    p.add_argument("--out", type=Path, required=True, help="results path without suffix (.json and .md are written)")
    return p.parse_args(argv)


def markdown(out: dict) -> str:
    lines = [
        "# Heads compared on the same held-out sequences (teacher-forced)", "", f"`{out['command']}`", "",
        f"Machine: {out['machine_line']}.", "",
        "| heads | T | alpha_1 | alpha_2 | alpha_3 | E[tokens/step] | sequences |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, per_t in out["results"].items():
        for t, r in per_t.items():
            a = r["alphas"]
            lines.append(f"| `{name}` | {t} | {a[0]:.3f} | {a[1]:.3f} | {a[2]:.3f} | "
                         f"{r['expected_tokens_per_step']:.3f} | {r['sequences']} |")
    lines += ["", "Paired per sequence against the first (rule: beyond ±2 SE):", ""]
    for key, v in out["verdicts"].items():
        lines.append(f"- {key}: {v['mean_diff']:+.3f} ± {v['se']:.3f} over {v['sequences']} sequences: "
                     f"**{v['verdict']}**")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if len(args.heads) < 2:
        raise SystemExit("give at least two heads folders: the baseline first, then the ones to compare with it")
    for d in args.heads:
        if not (d / "bebop.json").is_file():
            raise SystemExit(f"{d} is not a heads folder (no bebop.json)")
    temps = [float(t) for t in args.temperatures.split(",")]
    machine = machine_info()
    names = [str(d) for d in args.heads]
    results = {n: {str(t): evaluate(d, args.data, t) for t in temps} for n, d in zip(names, args.heads, strict=True)}
    verdicts = {f"{n} vs {names[0]} @T={t}": paired(results[n][str(t)], results[names[0]][str(t)])
                for n in names[1:] for t in temps}
    out = {
        "command": "python benchmarks/compare_heads.py " + " ".join(argv or sys.argv[1:]),
        "machine": machine,
        # Teacher-forced numbers do not depend on load; it is recorded so a slow run can be explained.
        "machine_line": describe_machine_and_load(machine),
        "heads_notes": {n: json.loads((d / "bebop.json").read_text()).get("notes", "")
                        for n, d in zip(names, args.heads, strict=True)},
        "results": without_per_sequence(results),
        "verdicts": verdicts,
    }
    write_results(args.out, out, markdown(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
