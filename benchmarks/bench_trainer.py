"""Benchmark: chain positions per second of the old and the new head trainer, side by side.

"Old" is ``bebop train`` as it was at commit OLD_COMMIT (the trainer that made the heads shipped
before this benchmark): per step 2 sequences x 64 randomly chosen chains, fp32, the full
49,152-token vocabulary, unrolling the head over the whole sequence for those 64 chains. Its
package is taken from git (``git archive``) into a temporary folder and run in a subprocess.
"New" is today's ``bebop train``: every completion chain of whole sequences, logits over the
draft vocabulary (8,192 tokens by default), bf16 matmuls where the CPU has them. Ablations of the new trainer (full
vocabulary / fp32) show where the gain comes from. Every arm runs in its own subprocess, one
after the other, on the same data, target cache and threads, for a fixed number of steps; the
rate is the trainer's own ``chain_positions_per_second`` (training loop only, the final
held-out eval excluded). Repeats alternate the arms; medians are reported.

Needs the data and target cache of ``bebop generate-data`` / ``bebop train`` under $BEBOP_HOME.

    .venv/bin/python benchmarks/bench_trainer.py            # the committed results
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bebop_vllm.hardware import describe_machine, machine_info

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/, for _results
from _results import write_results  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "benchmarks" / "results"
OLD_COMMIT = "7257858"  # last commit with the old trainer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=None, help="dataset folder (default: $BEBOP_HOME/data/...)")
    p.add_argument("--old-steps", type=int, default=12, help="optimizer steps of the old trainer per run (default 12)")
    p.add_argument("--new-steps", type=int, default=6, help="optimizer steps of each new-trainer arm (default 6)")
    p.add_argument("--repeats", type=int, default=2, help="runs per arm, alternating (default 2)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for every arm (default: all cores)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "trainer", help="results prefix (.json/.md)")
    return p.parse_args(argv)


def run_arm(name: str, pythonpath: Path, args: list[str], threads: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "heads"
        env = dict(os.environ, PYTHONPATH=str(pythonpath), OMP_NUM_THREADS=str(threads))
        cmd = [sys.executable, "-m", "bebop_vllm.cli", "train", "--out", str(out), *args]
        t0 = time.time()
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp)
        if res.returncode != 0:
            raise SystemExit(f"{name} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
        log = json.loads((out / "train_log.json").read_text())
        rate = float(log["chain_positions_per_second"])
        print(f"  {name}: {rate:.1f} chain positions/s ({time.time() - t0:.0f} s with start-up and eval)", flush=True)
        return rate


def markdown(result: dict[str, Any]) -> str:
    """``trainer.md`` from the results dict (also renders results written before ``machine`` was recorded)."""
    machine = result.get("machine")
    where = (describe_machine(machine) if machine
             else f"{result.get('cpu', '?')}, flags: {' '.join(result.get('cpu_flags', []))}")
    repeats = result.get("repeats", len(next(iter(result["chain_positions_per_second"].values()), [])))
    lines = [
        "# Trainer throughput: old vs new (chain positions per second)",
        "",
        f"`{result['command']}` — {where}; {result['threads']} threads; "
        f"{repeats} alternating runs per arm, median; loss kl; wall {result['wall_seconds']} s.",
        "",
        "| trainer | chain positions/s (runs) | median | vs old |",
        "|---|---|---|---|",
    ]
    for k, v in result["chain_positions_per_second"].items():
        lines.append(f"| {k} | {', '.join(f'{x:.0f}' for x in v)} | {result['median'][k]:.0f} | "
                     f"{result['speedup_vs_old'][k]:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    machine = machine_info()  # before the runs: its load average is the one they started under
    data = ["--data", str(args.data)] if args.data else []
    # the first 128 train sequences (cached by any target pass: it caches a prefix of the data, so
    # neither trainer runs the target here; the old one would also rewrite the cache's state)
    common = [*data, "--loss", "kl", "--max-train-sequences", "128", "--heldout-sequences", "2",
              "--eval-every", "100000", "--seed", "0"]
    new_threads = ["--threads", str(args.threads)]
    with tempfile.TemporaryDirectory() as old_pkg:
        subprocess.run(
            f"git -C {shlex.quote(str(REPO))} archive {OLD_COMMIT} bebop_vllm | tar -x -C {shlex.quote(old_pkg)}",
            shell=True,
            check=True,
        )
        arms = {
            # the settings that trained the previously shipped heads (docs/training.md)
            "old trainer (2 seqs x 64 chains, fp32, V=49152)": (
                Path(old_pkg),
                [
                    *common,
                    "--steps",
                    str(args.old_steps),
                    "--seqs-per-step",
                    "2",
                    "--max-chains-per-seq",
                    "64",
                    "--dtype",
                    "fp32",
                ],
            ),
            "new trainer (every chain, 4096/step, auto dtype, D=8192)": (
                REPO,
                [*common, *new_threads, "--steps", str(args.new_steps), "--chains-per-step", "4096"],
            ),
            "new trainer, D=16384": (
                REPO,
                [*common, *new_threads, "--steps", str(args.new_steps), "--chains-per-step", "4096",
                 "--draft-vocab-size", "16384"],
            ),
            "new trainer, full vocabulary": (
                REPO,
                [*common, *new_threads, "--steps", str(args.new_steps), "--chains-per-step", "4096",
                 "--draft-vocab-size", "0"],
            ),
            "new trainer, fp32": (
                REPO,
                [*common, *new_threads, "--steps", str(args.new_steps), "--chains-per-step", "4096",
                 "--dtype", "fp32"],
            ),
        }
        rates: dict[str, list[float]] = {k: [] for k in arms}
        t0 = time.time()
        for r in range(args.repeats):
            print(f"repeat {r + 1}/{args.repeats}", flush=True)
            for name, (path, arm_args) in arms.items():
                rates[name].append(run_arm(name, path, arm_args, args.threads))
    medians = {k: statistics.median(v) for k, v in rates.items()}
    old = medians[next(iter(arms))]
    result = {
        "command": " ".join(shlex.quote(a) for a in ["python", "benchmarks/bench_trainer.py", *(argv or sys.argv[1:])]),
        "old_commit": OLD_COMMIT,
        "machine": machine,
        "threads": args.threads,
        "repeats": args.repeats,
        "wall_seconds": round(time.time() - t0, 1),
        "chain_positions_per_second": rates,
        "median": medians,
        "speedup_vs_old": {k: round(v / old, 2) for k, v in medians.items()},
    }
    write_results(args.out, result, markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
