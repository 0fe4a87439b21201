"""Does bf16 cost the heads acceptance? Teacher-forced, on the same held-out tokens.

The engine runs the target and the heads in bf16 where the CPU has avx512_bf16 (and on GPUs);
the shipped heads were trained on an AVX2 machine against an fp32 target. Engine-measured tokens
per verify step differ between dtypes, but each dtype samples its own trajectories, so that
comparison mixes precision with prompt-to-prompt noise. Here every arm scores the same held-out
sequences: the target pass (hidden states and distributions) in fp32 or bf16, crossed with the
head's matmuls in fp32 or bf16 (autocast, as the trainer's evaluation does on bf16 CPUs); every
completion chain, per-sequence paired differences against the all-fp32 arm with the verdict
rule of the other head comparisons (beyond +-2 standard errors). The cache stores the target's
hidden states in fp16 in every arm (as the trainer does); the target's distributions are
recomputed from them with an fp32 lm_head.

    python benchmarks/dtype_acceptance.py --out benchmarks/results/dtype_acceptance_v6

Needs the held-out split (``bebop generate-data --split heldout ...``, see docs/training.md).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bebop_vllm.hardware import describe_machine, machine_info

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_results  # noqa: E402
from recipe_comparison import load_scored_heads, paired, per_sequence_metrics  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    import torch

    from bebop_vllm.paths import SHIPPED_HEADS_DIR, default_model_dir
    from bebop_vllm.train.dataset import default_data_dir, load_split
    from bebop_vllm.train.target_cache import HiddenCache
    from bebop_vllm.train.trainer import select

    p = argparse.ArgumentParser(description="Teacher-forced acceptance with the target and the heads in fp32 / bf16.")
    p.add_argument("--heads", type=Path, default=SHIPPED_HEADS_DIR, help="heads folder (default: the shipped heads)")
    p.add_argument("--data", type=Path, default=None, help="dataset folder with a heldout split (default: $BEBOP_HOME)")
    p.add_argument("--temperature", type=float, default=1.0, help="held-out sequences sampled at this T (default 1.0)")
    p.add_argument("--out", type=Path, required=True, help="results path without suffix (.json and .md)")
    args = p.parse_args(argv)

    model_dir = default_model_dir()
    data = args.data or default_data_dir()
    held = load_split(data, "heldout")
    idx = select(held, (args.temperature,), None)
    head, vocab, rows = load_scored_heads(args.heads, model_dir)
    arms: dict[str, dict] = {}
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for target_name, target_dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            folder = Path(tmp) / target_name
            caches = shutil.ignore_patterns("hidden-*", "lse-*", "mass-*", "aux-*")  # the split's arrays only
            shutil.copytree(data / "heldout", folder / "heldout", ignore=caches)
            cache = HiddenCache(folder, "heldout", load_split(folder, "heldout"), model_dir, head.shape.aux_layer_ids)
            cache.fill(idx, desc=f"target pass ({target_name})", dtype=target_dtype)
            for head_name, bf16 in (("fp32", False), ("bf16", True)):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    arms[f"target {target_name}, head {head_name}"] = per_sequence_metrics(
                        head, held, cache, idx, head.metadata.num_depths, vocab, rows)
                print(f"target {target_name}, head {head_name}: "
                      f"{arms[f'target {target_name}, head {head_name}']['expected_tokens_per_step']:.3f}", flush=True)
    base = "target fp32, head fp32"
    out = {"command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
           "machine": machine_info(), "heads": str(args.heads), "temperature": args.temperature,
           "seconds": round(time.time() - start, 1),
           "arms": {a: {k: v for k, v in r.items() if k != "per_sequence"} for a, r in arms.items()},
           "vs_all_fp32": {a: paired(r, arms[base]) for a, r in arms.items() if a != base}}
    lines = ["# Teacher-forced acceptance: target and heads in fp32 / bf16, same held-out tokens", "",
             f"`{out['command']}` — heads {args.heads}, held-out sequences sampled at T = {args.temperature}, "
             f"every completion chain. Machine: {describe_machine(out['machine'])}. {out['seconds']:.0f} s.", "",
             "| arm | expected tokens per verify step | alpha per depth | vs all-fp32 (mean paired diff +- SE) |",
             "| --- | --- | --- | --- |"]
    for a, r in out["arms"].items():
        d = out["vs_all_fp32"].get(a)
        diff = "—" if d is None else f"{d['mean_diff']:+.3f} +- {d['se']:.3f} ({d['verdict']})"
        alphas = " / ".join(f"{x:.3f}" for x in r["alphas"])
        lines.append(f"| {a} | {r['expected_tokens_per_step']:.3f} | {alphas} | {diff} |")
    write_results(args.out, out, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
