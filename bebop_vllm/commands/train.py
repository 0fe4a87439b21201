"""``bebop train``: train MTP draft heads on self-distillation data."""

from __future__ import annotations

import argparse
from pathlib import Path


def _layer_ids(text: str) -> tuple[int, ...]:
    try:
        ids = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer ids such as 2,15,27, got {text!r}") from None
    if list(ids) != sorted(set(ids)) or any(i < 1 for i in ids):
        raise argparse.ArgumentTypeError(f"layer ids must be positive, distinct and ascending, got {text!r}")
    return ids


def add_parser(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name,
        help="train MTP draft heads (ce, kl, tv, e2e-tv, hybrid losses)",
        description="Train a Bebop MTP head on the target's self-distillation data (`bebop generate-data`). "
        "The frozen target supplies hidden states (cached once per dataset) and tempered distributions; "
        "held-out prompts are used for evaluation only. Writes a head folder (model.safetensors, config.json, "
        "bebop.json with held-out metrics, draft_vocab.json, train_log.json, learning_curve.png) to --out. Each step "
        "trains every completion chain of whole sequences, over the draft vocabulary (the tokens with most target "
        "probability), in bf16 where the CPU has native bf16. Targets: Llama-family models (heads served by "
        "method 'bebop'; identity start) and dense Qwen3.5 text models "
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
    p.add_argument(
        "--chains-per-step",
        type=int,
        default=4096,
        help="chain positions per optimizer step; whole sequences are added until reached (default: 4096)",
    )
    p.add_argument(
        "--draft-vocab-size",
        type=int,
        default=8192,
        help="train (and later serve, engine option draft_vocab_size) on the N tokens carrying the most target "
        "probability in the train data; 0 = the full vocabulary (default: 8192, ~0.95 of the target's mass "
        "on held-out SmolLM2 samples)",
    )
    p.add_argument(
        "--depth-decay", type=float, default=1.0, help="depth j weighs DECAY**(j-1) in the loss (default: 1.0)"
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
        action="append",
        help="train on sequences sampled at this temperature (repeatable; default: all). Every sequence is "
        "trained at its own sampling temperature (p and q tempered alike)",
    )
    p.add_argument(
        "--eval-temperature",
        type=float,
        default=1.0,
        help="held-out evaluation on sequences sampled at this temperature (default: 1.0)",
    )
    p.add_argument(
        "--dtype",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="head compute dtype: auto = bf16 where the CPU has avx512_bf16/AMX (or CUDA), else fp32 (default: auto)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    p.add_argument("--save-dtype", choices=["bf16", "fp32"], default="bf16", help="checkpoint dtype (default: bf16)")
    p.add_argument("--eval-every", type=int, default=50, help="held-out eval every N steps (default: 50)")
    p.add_argument("--eval-sequences", type=int, default=16, help="held-out sequences in periodic evals (default: 16)")
    p.add_argument("--save-every", type=int, default=25, help="save the resume state every N steps (default: 25)")
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
        "--end-at-step",
        type=int,
        default=None,
        help="end training at this step (then the final eval and save) while the learning-rate schedule is "
        "planned for --steps: replays a run that a time budget ended early (default: --steps)",
    )
    p.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="start from the weights of this heads folder (e.g. CE heads, then fine-tune with --loss e2e-tv) "
        "instead of the identity start (default: identity start)",
    )
    p.add_argument(
        "--head-intermediate-size",
        type=int,
        default=None,
        help="the head's MLP width (default: the target's, or that of --init-from). With --init-from, a larger "
        "width widens the loaded head without changing what it computes (new units start with zero output "
        "weights); vLLM serves the width from the head's config.json. Llama targets only",
    )
    p.add_argument(
        "--aux-layers",
        type=_layer_ids,
        default=(),
        help="comma-separated target layer ids whose residual stream the head also reads (EAGLE-3-style "
        "features; vLLM's numbering: id i = the output of layer i - 1), e.g. 2,15,27 for a 30-layer target. "
        "With --init-from a head without them, they are added without changing what it computes (their "
        "projection starts at zero). The target pass then also caches these layers (+2 bytes x H per layer "
        "and token). Default: none, or those of --init-from",
    )
    p.add_argument(
        "--aux-lr-scale",
        type=float,
        default=1.0,
        help="learning rate of the aux input path (its projection and norms) as a multiple of --lr, e.g. 10 "
        "when aux layers are added to trained heads fine-tuned at a small --lr (default: 1)",
    )
    p.add_argument(
        "--feature-loss-weight",
        type=float,
        default=0.0,
        help="add w x SmoothL1(norm(r_j), h_{t+j}) to the loss: each depth's features regressed on the target's "
        "next hidden state, EAGLE-style (default: 0, off)",
    )
    p.add_argument(
        "--feedback",
        choices=["residual", "normed"],
        default=None,
        help="what a depth hands the next in place of the target's hidden state: the layer's pre-norm output r "
        "(residual) or norm(r) (normed, the target's space; pairs with --feature-loss-weight). Saved in the "
        "heads' config.json and followed by the engine. Default: that of --init-from, else residual",
    )
    p.add_argument("--resume", action="store_true", help="continue from --out/train_state.pt if present")
    p.add_argument(
        "--no-target-pass",
        action="store_true",
        help="do not run the target over uncached train sequences: train on those already cached (a target "
        "pass stopped early caches a prefix of the data)",
    )
    p.add_argument("--stop-after", type=int, default=None, help="stop after N steps of this run (resume later)")
    return p


def run(args: argparse.Namespace) -> int:
    from bebop_vllm.errors import BebopError
    from bebop_vllm.paths import default_model_dir
    from bebop_vllm.train.dataset import default_data_dir
    from bebop_vllm.train.trainer import TrainConfig, train

    for name in ("depth", "steps", "chains_per_step", "eval_every", "eval_sequences", "save_every"):
        if getattr(args, name) < 1:
            raise BebopError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.feature_loss_weight < 0:
        raise BebopError(f"--feature-loss-weight must be >= 0, got {args.feature_loss_weight}")
    if args.aux_lr_scale <= 0:
        raise BebopError(f"--aux-lr-scale must be > 0, got {args.aux_lr_scale}")
    if args.end_at_step is not None and not 1 <= args.end_at_step <= args.steps:
        raise BebopError(f"--end-at-step must be in 1..--steps ({args.steps}), got {args.end_at_step}")
    temps = tuple(args.temperature) if args.temperature else None
    if args.lr <= 0 or args.eval_temperature <= 0 or any(t <= 0 for t in temps or ()):
        raise BebopError(
            f"--lr and --temperature/--eval-temperature must be > 0, got {args.lr}, {temps}, {args.eval_temperature}"
        )
    if args.draft_vocab_size < 0 or args.depth_decay <= 0:
        raise BebopError(
            f"--draft-vocab-size must be >= 0 and --depth-decay > 0, got {args.draft_vocab_size}, {args.depth_decay}"
        )
    cfg = TrainConfig(
        model_dir=args.model or default_model_dir(),
        data_dir=args.data or default_data_dir(),
        out_dir=args.out,
        loss=args.loss,
        num_depths=args.depth,
        steps=args.steps,
        chains_per_step=args.chains_per_step,
        draft_vocab_size=args.draft_vocab_size or None,
        depth_decay=args.depth_decay,
        threads=args.threads,
        max_train_sequences=args.max_train_sequences,
        heldout_sequences=args.heldout_sequences,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        temperatures=temps,
        eval_temperature=args.eval_temperature,
        dtype=args.dtype,
        save_dtype=args.save_dtype,
        eval_every=args.eval_every,
        eval_sequences=args.eval_sequences,
        save_every=args.save_every,
        seed=args.seed,
        resume=args.resume,
        time_budget_min=args.time_budget_min,
        end_at_step=args.end_at_step,
        train_on_prompts=args.train_on_prompts,
        stop_after=args.stop_after,
        init_from=args.init_from,
        head_intermediate_size=args.head_intermediate_size,
        aux_layer_ids=args.aux_layers,
        aux_lr_scale=args.aux_lr_scale,
        feature_weight=args.feature_loss_weight,
        feedback=args.feedback,
        target_pass=not args.no_target_pass,
    )
    meta = train(cfg)
    if meta is None:
        return 0
    h = meta.heldout
    print(f"wrote {args.out}: held-out alpha {h.alphas}, E[accepted length] {h.expected_accepted_length:.3f}")
    return 0
