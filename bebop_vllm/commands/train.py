"""``bebop train``: train MTP draft heads on self-distillation data."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name,
        help="train MTP draft heads (ce, kl, tv, e2e-tv, hybrid losses)",
        description="Train a Bebop MTP head on the target's self-distillation data (`bebop generate-data`). "
        "The frozen target supplies hidden states (cached once per dataset) and tempered distributions; "
        "held-out prompts are used for evaluation only. Writes a head folder (model.safetensors, config.json, "
        "bebop.json with held-out metrics) to --out. Targets: Llama-family models (heads served by "
        "method 'bebop'; warm start from the target's last layer) and dense Qwen3.5 text models "
        "(heads of Qwen3.5's own MTP layer kind, warm-started from the target's native mtp.* weights; "
        "put them in place with `bebop export-mtp` and serve with method 'mtp').",
    )
    p.add_argument(
        "--loss",
        choices=["ce", "kl", "tv", "e2e-tv", "hybrid"],
        default="e2e-tv",
        help="training objective (default: e2e-tv, the end-to-end TV loss)",
    )
    p.add_argument(
        "--depth", type=int, default=3, help="number of draft depths g the head is unrolled for (default: 3)"
    )
    p.add_argument("--out", type=Path, required=True, help="output head folder (also holds the resume state)")
    p.add_argument(
        "--model", type=Path, default=None, help="target model folder (default: the fetched SmolLM2-135M-Instruct)"
    )
    p.add_argument(
        "--data", type=Path, default=None, help="dataset folder (default: $BEBOP_HOME/data/smollm2-135m-selfdistill)"
    )
    p.add_argument("--steps", type=int, default=200, help="optimizer steps (default: 200)")
    p.add_argument("--seqs-per-step", type=int, default=4, help="sequences per optimizer step (default: 4)")
    p.add_argument(
        "--max-chains-per-seq",
        type=int,
        default=128,
        help="random subset of draft chains per sequence and step (default: 128)",
    )
    p.add_argument(
        "--max-train-sequences",
        type=int,
        default=None,
        help="use the first N train sequences (domains are interleaved; default: all)",
    )
    p.add_argument(
        "--heldout-sequences",
        type=int,
        default=None,
        help="evaluate on the first N held-out sequences (default: all)",
    )
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate, AdamW (default: 1e-3)")
    p.add_argument("--warmup-steps", type=int, default=10, help="linear warmup steps (default: 10)")
    p.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="training temperature: selects data sampled at T and tempers p and q (default: 1.0)",
    )
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="head compute dtype (default: fp32)")
    p.add_argument("--save-dtype", choices=["bf16", "fp32"], default="bf16", help="checkpoint dtype (default: bf16)")
    p.add_argument("--eval-every", type=int, default=50, help="held-out eval every N steps (default: 50)")
    p.add_argument("--eval-sequences", type=int, default=16, help="held-out sequences in periodic evals (default: 16)")
    p.add_argument("--save-every", type=int, default=50, help="save the resume state every N steps (default: 50)")
    p.add_argument("--seed", type=int, default=0, help="seed for init, data order and chain subsets (default: 0)")
    p.add_argument(
        "--train-on-prompts",
        action="store_true",
        help="also train on draft chains inside the prompts (the target's distributions are exact there too; "
        "more chains per sampled sequence when sampling is the bottleneck). Evaluation stays on completions.",
    )
    p.add_argument(
        "--time-budget-min",
        type=float,
        default=None,
        help="stop training after this many minutes, then run the final eval and save (default: none)",
    )
    p.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="start from the weights of this heads folder (e.g. CE heads, then fine-tune with --loss e2e-tv) "
        "instead of the warm start from the target's last layer (default: warm start)",
    )
    p.add_argument("--resume", action="store_true", help="continue from --out/train_state.pt if present")
    p.add_argument("--stop-after", type=int, default=None, help="stop after N steps of this run (resume later)")
    return p


def run(args: argparse.Namespace) -> int:
    from bebop_vllm.errors import BebopError
    from bebop_vllm.paths import default_model_dir
    from bebop_vllm.train.dataset import default_data_dir
    from bebop_vllm.train.trainer import TrainConfig, train

    for name in ("depth", "steps", "seqs_per_step", "max_chains_per_seq", "eval_every", "eval_sequences", "save_every"):
        if getattr(args, name) < 1:
            raise BebopError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.lr <= 0 or args.temperature <= 0:
        raise BebopError(f"--lr and --temperature must be > 0, got {args.lr} and {args.temperature}")
    cfg = TrainConfig(
        model_dir=args.model or default_model_dir(),
        data_dir=args.data or default_data_dir(),
        out_dir=args.out,
        loss=args.loss,
        num_depths=args.depth,
        steps=args.steps,
        seqs_per_step=args.seqs_per_step,
        max_chains_per_seq=args.max_chains_per_seq,
        max_train_sequences=args.max_train_sequences,
        heldout_sequences=args.heldout_sequences,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        temperature=args.temperature,
        dtype=args.dtype,
        save_dtype=args.save_dtype,
        eval_every=args.eval_every,
        eval_sequences=args.eval_sequences,
        save_every=args.save_every,
        seed=args.seed,
        resume=args.resume,
        time_budget_min=args.time_budget_min,
        train_on_prompts=args.train_on_prompts,
        stop_after=args.stop_after,
        init_from=args.init_from,
    )
    meta = train(cfg)
    if meta is None:
        return 0
    h = meta.heldout
    print(f"wrote {args.out}: held-out alpha {h.alphas}, E[accepted length] {h.expected_accepted_length:.3f}")
    return 0
