"""The loss recipe, tested fairly: same identity start, data, draft vocabulary and budget.

Arms (each one ``bebop train`` run into ``$BEBOP_HOME/recipe_comparison/<arm>``):

- ``ce``, ``kl``, ``e2e-tv``: STEPS steps each from the identity start;
- ``kl-then-e2e-tv``: KL for STEPS - FT steps, then the e2e-TV loss for FT steps from those heads
  (the paper's setting: TV-type loss as a fine-tune), so the total budget is the same.

Held-out: every completion chain of the held-out split's T = 1 and T = 0.7 sequences
(teacher-forced, each at its own temperature, over the draft vocabulary the heads are served
on). The verdict rule (written before the run): e2e-TV "wins" a comparison when its expected
tokens per verify step exceeds the other arm's by more than 2 standard errors of the paired
per-sequence difference.

    .venv/bin/python benchmarks/recipe_comparison.py                     # committed results
    .venv/bin/python benchmarks/recipe_comparison.py --steps 20 --ft 5   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bebop_vllm.hardware import describe_machine, machine_info

if TYPE_CHECKING:  # the heavy imports stay inside the functions (``--help`` without torch)
    import torch

    from bebop_vllm.heads.module import BebopMTPHead
    from bebop_vllm.train.dataset import SequenceSet
    from bebop_vllm.train.target_cache import HiddenCache

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/, for _results
from _results import write_results  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "heads_comparison"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per arm (default 60)")
    p.add_argument("--ft", type=int, default=15, help="e2e-TV fine-tune steps of kl-then-e2e-tv (default 15)")
    p.add_argument("--chains-per-step", type=int, default=4096, help="chain positions per step (default 4096)")
    p.add_argument("--draft-vocab-size", type=int, default=8192, help="draft vocabulary (default 8192)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    p.add_argument(
        "--ft-lr",
        type=float,
        default=5e-4,
        help="peak learning rate of the e2e-TV fine-tune (default 5e-4, as make-heads; at 2e-3 the "
        "fine-tune collapsed the KL heads' alpha from ~0.2 to 0.02 in 8 steps)",
    )
    p.add_argument("--data", type=Path, default=None, help="dataset folder (default: $BEBOP_HOME/data/...)")
    p.add_argument("--work", type=Path, default=None, help="heads folders (default: $BEBOP_HOME/recipe_comparison)")
    p.add_argument("--arms", default="ce,kl,e2e-tv,kl-then-e2e-tv", help="arms to run (default: all four)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (default: every core)")
    p.add_argument("--out", type=Path, default=RESULTS, help="results prefix (.json/.md/.png)")
    return p.parse_args(argv)


def train(out: Path, loss: str, steps: int, args: argparse.Namespace, extra: list[str]) -> None:
    if (out / "bebop.json").is_file() and not (out / "train_state.pt").exists():
        print(f"{out} exists; reusing it", flush=True)
        return
    cmd = [
        sys.executable,
        "-m",
        "bebop_vllm.cli",
        "train",
        "--out",
        str(out),
        "--loss",
        loss,
        "--resume",
        "--steps",
        str(steps),
        "--chains-per-step",
        str(args.chains_per_step),
        "--draft-vocab-size",
        str(args.draft_vocab_size),
        "--lr",
        str(args.lr),
        "--warmup-steps",
        str(max(steps // 10, 1)),
        "--eval-every",
        str(max(steps // 4, 1)),
        "--eval-sequences",
        "12",
        "--seed",
        "0",
        "--no-target-pass",
        *extra,
    ]
    if args.data:
        cmd += ["--data", str(args.data)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    print("+ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    subprocess.run(cmd, check=True)


def evaluate(head_dir: Path, data: Path | None, temperature: float) -> dict:
    """Per-sequence teacher-forced metrics on the held-out sequences sampled at ``temperature``."""
    import torch

    from bebop_vllm.paths import default_model_dir
    from bebop_vllm.train.dataset import default_data_dir, load_split
    from bebop_vllm.train.target_cache import HiddenCache
    from bebop_vllm.train.trainer import compute_dtype, select

    model = default_model_dir()
    data = data or default_data_dir()
    held = load_split(data, "heldout")
    head, vocab, rows = load_scored_heads(head_dir, model)
    cache = HiddenCache(data, "heldout", held, model, head.shape.aux_layer_ids)
    idx = select(held, (temperature,), None)
    cache.fill(idx, progress=False)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=compute_dtype("auto") == torch.bfloat16):
        metrics = per_sequence_metrics(head, held, cache, idx, head.metadata.num_depths, vocab, rows)
    return {"temperature": temperature, **metrics}


def load_scored_heads(head_dir: Path, model_dir: Path) -> tuple:
    """A heads folder as the evaluations score it: (fp32 head, its trained draft vocabulary as
    sorted token ids or None, the lm_head rows of that vocabulary or None)."""
    import torch

    from bebop_vllm.draft_vocab import trained_draft_vocab_size
    from bebop_vllm.heads.checkpoint import load_heads

    head = load_heads(head_dir, model_dir).float()
    ids = json.loads((head_dir / "draft_vocab.json").read_text())["ids"]
    size = trained_draft_vocab_size(head_dir)
    vocab = torch.tensor(sorted(ids[:size])) if size else None
    rows = None if vocab is None else head.lm_head_weight[vocab].contiguous()
    return head, vocab, rows


def per_sequence_metrics(
    head: BebopMTPHead,
    held: SequenceSet,
    cache: HiddenCache,
    indices: list[int],
    num_depths: int,
    vocab: torch.Tensor | None,
    rows: torch.Tensor | None,
    head_inputs: Callable[[int], torch.Tensor] | None = None,
) -> dict:
    """Teacher-forced metrics of ``head`` per held-out sequence (``evaluate_vocab`` on each alone,
    for the paired verdicts) and their chain-weighted means; ``head_inputs`` as in
    ``evaluate_vocab``."""
    from bebop_vllm.train.evaluate import evaluate_vocab

    per_seq = []
    for i in indices:
        m = evaluate_vocab(head, held, cache, [i], num_depths, vocab, rows, progress=False, head_inputs=head_inputs)
        if m.num_chains:
            per_seq.append({"seq": i, "tau": m.expected_accepted_length, "alphas": m.alphas, "chains": m.num_chains})
    w = np.array([s["chains"] for s in per_seq], dtype=float)
    tau = np.array([s["tau"] for s in per_seq])
    alphas = np.array([s["alphas"] for s in per_seq])
    return {
        "sequences": len(per_seq),
        "chains": int(w.sum()),
        "expected_tokens_per_step": float((tau * w).sum() / w.sum()),
        "alphas": [float(x) for x in (alphas * w[:, None]).sum(0) / w.sum()],
        "per_sequence": per_seq,
    }


def paired(a: dict, b: dict) -> dict:
    """Mean per-sequence E[tokens/step] difference a - b (two ``evaluate`` results), its standard
    error and the verdict of the rule fixed before the runs: "better" (worse) beyond +2 (-2) SE."""
    x = {s["seq"]: s["tau"] for s in a["per_sequence"]}
    y = {s["seq"]: s["tau"] for s in b["per_sequence"]}
    d = np.array([x[s] - y[s] for s in sorted(set(x) & set(y))])
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
    verdict = "better" if d.mean() > 2 * se else ("worse" if d.mean() < -2 * se else "tie")
    return {"mean_diff": float(d.mean()), "se": se, "verdict": verdict, "sequences": int(len(d))}


def without_per_sequence(results: dict) -> dict:
    """``{arm: {T: evaluate result}}`` without the per-sequence lists (the results files' summary)."""
    return {
        a: {t: {k: v for k, v in r.items() if k != "per_sequence"} for t, r in rs.items()} for a, rs in results.items()
    }


def markdown(out: dict) -> str:
    """The results' markdown from the results dict (also renders results written before ``machine``)."""
    machine = f" Machine: {describe_machine(out['machine'])}." if out.get("machine") else ""
    lines = [
        "# Loss recipes: same identity start, data, draft vocabulary and budget",
        "",
        f"`{out['command']}` — {out['steps']} steps x {out['chains_per_step']} chain positions per arm "
        f"(kl-then-e2e-tv: {out['steps'] - out['ft']} KL + {out['ft']} e2e-TV), draft vocabulary "
        f"{out['draft_vocab_size']}, lr {out['lr']} (fine-tune {out['ft_lr']}); training took "
        f"{out['train_seconds']:.0f} s in all ({out['threads']} threads). Held-out, "
        "teacher-forced, every completion chain, each sequence at its own temperature." + machine,
        "",
        "| arm | T | alpha_1 | alpha_2 | alpha_3 | E[tokens/step] | sequences / chains |",
        "|---|---|---|---|---|---|---|",
    ]
    for a, rs in out["results"].items():
        for t, r in rs.items():
            al = " | ".join(f"{x:.3f}" for x in r["alphas"])
            lines.append(
                f"| {a} | {t} | {al} | {r['expected_tokens_per_step']:.3f} | {r['sequences']} / {r['chains']} |"
            )
    lines += [
        "",
        "Verdict rule (fixed before the run): e2e-TV wins when its paired per-sequence E[tokens/step] "
        "difference exceeds 2 standard errors.",
        "",
    ]
    lines += [f"- {k}: {v['mean_diff']:+.3f} ± {v['se']:.3f} → **{v['verdict']}**" for k, v in out["verdicts"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from bebop_vllm.paths import bebop_home

    work = args.work or bebop_home() / "recipe_comparison"
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    machine = machine_info()  # before training: its load average is the one the runs started under
    t0 = time.time()
    for arm in arms:
        if arm == "kl-then-e2e-tv":
            train(work / "kl-short", "kl", args.steps - args.ft, args, [])
            train(work / arm, "e2e-tv", args.ft, args, ["--init-from", str(work / "kl-short"), "--lr", str(args.ft_lr)])
        else:
            train(work / arm, arm, args.steps, args, [])
    train_seconds = time.time() - t0
    results = {arm: {str(t): evaluate(work / arm, args.data, t) for t in (1.0, 0.7)} for arm in arms}
    verdicts = {}
    for t in ("1.0", "0.7"):
        for arm in arms:
            if arm == "e2e-tv" or not results.get("e2e-tv", {}).get(t, {}).get("per_sequence"):
                continue
            v = paired(results["e2e-tv"][t], results[arm][t])
            verdict = v["verdict"] if v["verdict"] == "tie" else f"e2e-tv {v['verdict']}"
            verdicts[f"e2e-tv vs {arm} @T={t}"] = {"mean_diff": v["mean_diff"], "se": v["se"], "verdict": verdict}
    out = {
        "command": "python benchmarks/recipe_comparison.py " + " ".join(argv or sys.argv[1:]),
        "steps": args.steps,
        "ft": args.ft,
        "chains_per_step": args.chains_per_step,
        "draft_vocab_size": args.draft_vocab_size,
        "lr": args.lr,
        "ft_lr": args.ft_lr,
        "train_seconds": round(train_seconds, 1),
        "threads": args.threads or os.cpu_count(),
        "machine": machine,
        "results": without_per_sequence(results),
        "verdicts": verdicts,
    }
    write_results(args.out, out, markdown(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
