"""Does a wider head accept more? The same heads continued on the same data, narrow and widened.

Arms (each one ``bebop train`` run into ``$BEBOP_HOME/head_width_comparison/<arm>``), all from the
heads folder ``--init-from`` (default: the shipped heads):

- ``init``: the starting heads, evaluated as they are (no training);
- ``narrow``: ``--loss`` for STEPS steps, the MLP as it is;
- ``wide``: the same, after widening the MLP to ``--width`` units (``widen_mlp``: the new units
  start with zero output weights, so the wide head starts computing exactly what ``init`` does).

Same data order, seed, learning-rate schedule and draft vocabulary in both trained arms, so the
only difference is the MLP's width. Why this lever: the shipped heads fit their own train data
little better than held-out data (alpha_1 0.563 vs 0.529 after ~4 epochs), which points at the
head's capacity (one decoder layer of a 135M model) rather than at the data.

Held-out: every completion chain of the held-out split's T = 1 and T = 0.7 sequences
(teacher-forced, each at its own temperature, over the draft vocabulary). Verdict rule (written
before the run): ``wide`` beats ``narrow`` when its expected tokens per verify step exceeds
narrow's by more than 2 standard errors of the paired per-sequence difference (worse: below -2).

    .venv/bin/python benchmarks/head_width_comparison.py --steps 300 --width 3072
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from bebop_vllm.hardware import describe_machine, machine_info

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/, for _results
from _results import write_results  # noqa: E402
from recipe_comparison import evaluate, paired, without_per_sequence  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "head_width_comparison"
SHIPPED = REPO / "heads" / "smollm2-135m-v5"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--init-from", type=Path, default=SHIPPED, help=f"heads both arms start from (default {SHIPPED})")
    p.add_argument("--width", type=int, default=3072, help="the wide arm's MLP units (default 3072, 2x SmolLM2's)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per trained arm (default 300)")
    p.add_argument("--loss", default="kl", help="training loss of both arms (default kl)")
    p.add_argument("--chains-per-step", type=int, default=1024, help="chain positions per step (default 1024)")
    p.add_argument("--draft-vocab-size", type=int, default=8192, help="draft vocabulary (default 8192)")
    p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (default 5e-4)")
    p.add_argument("--max-train-sequences", type=int, default=None, help="first N train sequences (default all)")
    p.add_argument("--data", type=Path, default=None, help="dataset folder (default: $BEBOP_HOME/data/...)")
    p.add_argument("--work", type=Path, default=None, help="heads folders (default: $BEBOP_HOME/head_width_comparison)")
    p.add_argument("--arms", default="narrow,wide", help="trained arms to run (default: narrow,wide)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (default: every core)")
    p.add_argument("--out", type=Path, default=RESULTS, help="results prefix (.json/.md)")
    return p.parse_args(argv)


def train(out: Path, args: argparse.Namespace, extra: list[str]) -> None:
    if (out / "bebop.json").is_file() and not (out / "train_state.pt").exists():
        print(f"{out} exists; reusing it", flush=True)
        return
    cmd = [
        sys.executable, "-m", "bebop_vllm.cli", "train",
        "--out", str(out), "--resume", "--init-from", str(args.init_from),
        "--loss", args.loss, "--steps", str(args.steps),
        "--chains-per-step", str(args.chains_per_step), "--draft-vocab-size", str(args.draft_vocab_size),
        "--lr", str(args.lr), "--warmup-steps", str(max(args.steps // 15, 1)),
        "--eval-every", str(max(args.steps // 3, 1)), "--eval-sequences", "12", "--seed", "4",
        *extra,
    ]  # fmt: skip
    if args.max_train_sequences:
        cmd += ["--max-train-sequences", str(args.max_train_sequences)]
    if args.data:
        cmd += ["--data", str(args.data)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    print("+ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    subprocess.run(cmd, check=True)


def markdown(out: dict) -> str:
    lines = [
        "# Head width: the same heads continued on the same data, narrow and widened",
        "",
        f"`{out['command']}` — from `{out['init_from']}`, {out['steps']} steps x {out['chains_per_step']} chain "
        f"positions of `{out['loss']}` per trained arm, lr {out['lr']}, draft vocabulary "
        f"{out['draft_vocab_size']}; wide = MLP widened {out['narrow_width']} -> {out['width']} units. "
        f"Machine: {describe_machine(out['machine'])}.",
        "",
        "| arm | T | alpha_1 | alpha_2 | alpha_3 | E[tokens/step] | sequences / chains | train s | chain pos/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, rs in out["results"].items():
        info = out["training"].get(arm, {})
        for t, r in rs.items():
            al = " | ".join(f"{x:.3f}" for x in r["alphas"])
            lines.append(
                f"| {arm} | {t} | {al} | {r['expected_tokens_per_step']:.3f} | {r['sequences']} / {r['chains']} | "
                f"{info.get('train_seconds', '-')} | {info.get('chain_positions_per_s', '-')} |"
            )
    lines += [
        "",
        "Verdict rule (fixed before the run): an arm is better (worse) than another when the paired "
        "per-sequence E[tokens/step] difference exceeds +2 (is below -2) standard errors.",
        "",
    ]
    lines += [
        f"- {k}: {v['mean_diff']:+.3f} ± {v['se']:.3f} over {v['sequences']} sequences → **{v['verdict']}**"
        for k, v in out["verdicts"].items()
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from bebop_vllm.heads.checkpoint import load_heads
    from bebop_vllm.paths import bebop_home, default_model_dir

    work = args.work or bebop_home() / "head_width_comparison"
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = set(arms) - {"narrow", "wide"}
    if unknown:
        raise SystemExit(f"unknown arm(s) {sorted(unknown)}; choose narrow and/or wide")
    narrow_width = load_heads(args.init_from, default_model_dir()).shape.intermediate_size
    if args.width <= narrow_width:
        raise SystemExit(f"--width {args.width} must exceed the heads' MLP width {narrow_width}")
    machine = machine_info()  # before training: its load average is the one the runs started under
    training = {}
    for arm in arms:
        t0 = time.time()
        train(work / arm, args, ["--head-intermediate-size", str(args.width)] if arm == "wide" else [])
        log = json.loads((work / arm / "train_log.json").read_text())
        training[arm] = {
            "train_seconds": round(float(log["train_seconds"])),  # the trainer's loop (not the evals)
            "chain_positions_per_s": round(float(log["chain_positions_per_second"]), 1),
            "wall_s": round(time.time() - t0),
        }
    dirs = {"init": args.init_from, **{a: work / a for a in arms}}
    results = {a: {str(t): evaluate(d, args.data, t) for t in (1.0, 0.7)} for a, d in dirs.items()}
    verdicts = {}
    for t in ("1.0", "0.7"):
        for a, b in (("wide", "narrow"), ("narrow", "init"), ("wide", "init")):
            if a in results and b in results:
                verdicts[f"{a} vs {b} @T={t}"] = paired(results[a][t], results[b][t])
    out = {
        "command": "python benchmarks/head_width_comparison.py " + " ".join(argv or sys.argv[1:]),
        "init_from": str(args.init_from),
        "width": args.width,
        "narrow_width": narrow_width,
        "steps": args.steps,
        "loss": args.loss,
        "chains_per_step": args.chains_per_step,
        "draft_vocab_size": args.draft_vocab_size,
        "lr": args.lr,
        "threads": args.threads or os.cpu_count(),
        "machine": machine,
        "training": training,
        "results": without_per_sequence(results),
        "verdicts": verdicts,
    }
    write_results(args.out, out, markdown(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
