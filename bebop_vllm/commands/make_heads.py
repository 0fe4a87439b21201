"""``bebop make-heads``: reproduce the shipped default heads end to end, resumably.

Stages (each one resumable on its own, so a rerun continues where the last run stopped):

1. held-out data: vLLM samples the held-out prompts (evaluation only, never trained on);
2. train data: vLLM samples the train prompts of the three domains (``RECIPE.train_data``);
3. target pass: the target's hidden states, log-normalisers and per-token mass, cached once;
4. KL training from the identity start, over the probability-ranked draft vocabulary, on the
   first 2,600 train sequences (``kl``), then continued on all of them (``kl-all``) and once
   more (``kl-more``): the order the shipped heads were made in, one work session each;
5. e2e-TV fine-tune of the KL heads (the paper's loss as a fine-tuning objective);
6. ``aux-tv``: the e2e-TV heads gain EAGLE-3-style features of the target's layers 2, 15 and 27
   (added function-preservingly, the target pass caches those layers for the first 1,792 train
   sequences) and are fine-tuned with e2e-TV once more;
7. the heads folder (weights, ``draft_vocab.json``, metadata with held-out alpha per depth,
   ``train_log.json``, ``learning_curve.png``).

Stages 1-2 run ``bebop generate-data`` and 3-6 ``bebop train`` in subprocesses (each frees its
memory: a vLLM engine and a trainer do not share the 2 cores well). The recipe below is the one
that made the shipped heads; docs/training.md says how long each stage took on 2 cores.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Recipe:
    """The shipped default heads' recipe (docs/training.md)."""

    heldout_data: tuple[str, ...] = (
        "--split", "heldout", "--heldout-per-domain", "16", "--max-prompt-tokens", "512",
        "--max-new-tokens", "512", "--temperature", "1.0", "--temperature", "0.7",
        "--max-num-seqs", "96", "--chunk", "96",
    )  # fmt: skip
    train_data: tuple[str, ...] = (
        "--split", "train", "--train-per-domain", "100000", "--max-prompt-tokens", "512",
        "--max-new-tokens", "512", "--temperature", "1.0", "--temperature", "1.0", "--temperature", "1.0",
        "--temperature", "0.7", "--samples-per-prompt", "2", "--samples-per-prompt", "math=8",
        "--samples-per-prompt", "code=8", "--max-num-seqs", "256", "--chunk", "512",
    )  # fmt: skip
    kl: tuple[str, ...] = (
        "--loss", "kl", "--steps", "900", "--end-at-step", "801", "--chains-per-step", "1024",
        "--draft-vocab-size", "8192", "--lr", "2e-3", "--warmup-steps", "30", "--eval-every", "100",
        "--eval-sequences", "24", "--max-train-sequences", "2600",
    )  # fmt: skip
    kl_all: tuple[str, ...] = (
        "--loss", "kl", "--steps", "2200", "--chains-per-step", "1024", "--draft-vocab-size", "8192",
        "--lr", "1e-3", "--warmup-steps", "20", "--eval-every", "200", "--eval-sequences", "24", "--seed", "2",
    )  # fmt: skip
    kl_more: tuple[str, ...] = (
        "--loss", "kl", "--steps", "3000", "--chains-per-step", "1024", "--draft-vocab-size", "8192",
        "--lr", "7e-4", "--warmup-steps", "20", "--eval-every", "250", "--eval-sequences", "24", "--seed", "3",
    )  # fmt: skip
    e2e_tv: tuple[str, ...] = (
        "--loss", "e2e-tv", "--steps", "250", "--chains-per-step", "1024", "--draft-vocab-size", "8192",
        "--lr", "5e-4", "--warmup-steps", "10", "--eval-every", "125", "--eval-sequences", "24", "--seed", "1",
    )  # fmt: skip
    aux_tv: tuple[str, ...] = (
        "--aux-layers", "2,15,27", "--loss", "e2e-tv", "--steps", "600", "--chains-per-step", "1024",
        "--draft-vocab-size", "8192", "--lr", "3e-4", "--warmup-steps", "20", "--eval-every", "150",
        "--eval-sequences", "24", "--seed", "4", "--max-train-sequences", "1792",
    )  # fmt: skip
    env: dict[str, str] = field(
        default_factory=lambda: {"VLLM_CPU_KVCACHE_SPACE": "6", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    )


RECIPE = Recipe()


def add_parser(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name,
        help="reproduce the shipped default heads end to end (data, target pass, KL, e2e-TV and aux-layer fine-tunes)",
        description="Reproduce the shipped default heads end to end: held-out and train data (vLLM), the target "
        "pass, KL training from the identity start, an e2e-TV fine-tune, then aux target layers and a second e2e-TV "
        "fine-tune. Every stage is resumable: rerun the "
        "same command after an interruption. Data and caches go to --data (default "
        "$BEBOP_HOME/data/smollm2-135m-selfdistill); the KL heads to OUT-kl, OUT-kl-all and OUT-kl-more, the "
        "e2e-TV heads to OUT-e2e-tv, the final heads to OUT.",
    )
    p.add_argument("--out", type=Path, required=True,
                   help="final heads folder (earlier stages write OUT-kl, OUT-kl-all, OUT-kl-more and OUT-e2e-tv)")
    p.add_argument("--data", type=Path, default=None, help="dataset folder (default: $BEBOP_HOME/data/...)")
    p.add_argument("--model", type=Path, default=None, help="target model folder (default: the fetched default)")
    p.add_argument(
        "--stages",
        default="heldout,train-data,kl,kl-all,kl-more,e2e-tv,aux-tv",
        help="comma-separated stages to run, in order (default: heldout,train-data,kl,kl-all,kl-more,e2e-tv,aux-tv)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the commands without running them")
    return p


def commands(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    common = [*(["--model", str(args.model)] if args.model else []), *(["--data", str(args.data)] if args.data else [])]
    gen = [*(["--model", str(args.model)] if args.model else []), *(["--out", str(args.data)] if args.data else [])]
    kl_dir, kl_all_dir, kl_more_dir, e2e_dir = (Path(f"{args.out}-{s}") for s in ("kl", "kl-all", "kl-more", "e2e-tv"))

    def train(out: Path, init_from: Path | None, recipe: tuple[str, ...]) -> list[str]:
        init = ["--init-from", str(init_from)] if init_from is not None else []
        return ["train", *common, "--out", str(out), "--resume", *init, *recipe]

    plan = {
        "heldout": ["generate-data", *gen, *RECIPE.heldout_data],
        "train-data": ["generate-data", *gen, *RECIPE.train_data],
        "kl": train(kl_dir, None, RECIPE.kl),
        "kl-all": train(kl_all_dir, kl_dir, RECIPE.kl_all),
        "kl-more": train(kl_more_dir, kl_all_dir, RECIPE.kl_more),
        "e2e-tv": train(e2e_dir, kl_more_dir, RECIPE.e2e_tv),
        "aux-tv": train(args.out, e2e_dir, RECIPE.aux_tv),
    }
    wanted = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in plan]
    if unknown:
        from bebop_vllm.errors import BebopError

        raise BebopError(f"unknown stage(s) {unknown}; choose from {', '.join(plan)}")
    return [(s, plan[s]) for s in wanted]


def run(args: argparse.Namespace) -> int:
    import os

    from tqdm import tqdm

    from bebop_vllm.errors import BebopError

    todo = commands(args)
    env = dict(os.environ)
    for k, v in RECIPE.env.items():
        env.setdefault(k, v)
    for stage, argv in tqdm(todo, desc="make-heads", unit="stage", disable=args.dry_run):
        line = " ".join(["bebop", *argv])
        out = Path(argv[argv.index("--out") + 1]) if argv[0] == "train" else None
        if out is not None and (out / "bebop.json").is_file() and not (out / "train_state.pt").exists():
            tqdm.write(f"[{stage}] {out} is already trained; skipping (delete it to retrain)")
            continue
        if args.dry_run:
            print(f"[{stage}] {line}")
            continue
        tqdm.write(f"[{stage}] {line}")
        if subprocess.run([sys.executable, "-m", "bebop_vllm.cli", *argv], env=env).returncode != 0:
            raise BebopError(f"stage {stage} failed (command: {line}); fix the cause and rerun to resume")
    return 0
