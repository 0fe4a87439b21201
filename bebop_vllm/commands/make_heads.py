"""``bebop make-heads``: reproduce the shipped default heads end to end, resumably.

A recipe is an ordered list of stages, each one resumable on its own, so a rerun continues where
the last run stopped. Three recipes (``--recipe``):

``more-data`` (default: what made the shipped ``smollm2-135m-v8``): the features recipe's data and
KL stage, then ``train-data-2x`` (twice the continuations per prompt, appended to the same folder),
``kl-2x`` (the KL heads continued on all of it, a fresh 2,500-step warmup + cosine) and ``e2e-tv``
into OUT. The features recipe caps its train stages at v7's 4,494 sequences, so it still
reproduces v7 in a folder that this recipe grew.

``features`` (what made ``smollm2-135m-v7``):

1. ``heldout``: vLLM samples the held-out prompts (evaluation only, never trained on);
2. ``train-data``: vLLM samples the train prompts of the three domains (``--seed 7``);
3. ``kl-features``: KL training from the identity start over the probability-ranked draft
   vocabulary, with EAGLE-3-style features of the target's layers 2, 15 and 27, normed feedback
   and the EAGLE-style feature loss from the first step, one 6,000-step cosine over all train
   sequences (its first run is the target pass: the target's hidden states, those layers,
   log-normalisers and per-token mass, cached once);
4. ``e2e-tv``: e2e-TV fine-tune of those heads (the paper's loss as a fine-tuning objective) into OUT.

``v6`` (what made the previous heads, ``smollm2-135m-v6``): the same held-out data, the train
data without ``--seed``, then ``kl`` (KL from the identity start on the first 2,600 train
sequences), ``kl-all`` and ``kl-more`` (continued on all of them: the order those heads were made
in, one work session each), ``e2e-tv`` (an e2e-TV fine-tune) and ``aux-tv`` (the aux layers added
function-preservingly and a second e2e-TV fine-tune on the first 1,792 train sequences).

Every train stage writes a heads folder (weights, ``draft_vocab.json``, metadata with held-out
alpha per depth, ``train_log.json``, ``learning_curve.png``). Data stages run ``bebop
generate-data`` and train stages ``bebop train``, each in a subprocess (each frees its memory: a
vLLM engine and a trainer do not share the 2 cores well). docs/training.md says how long each
stage took on 2 cores.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ENV = {"VLLM_CPU_KVCACHE_SPACE": "6", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


@dataclass(frozen=True)
class Stage:
    """One step of a recipe: a ``bebop generate-data`` or ``bebop train`` command line."""

    command: str  # "generate-data" | "train"
    args: tuple[str, ...]
    out_suffix: str = ""  # train stages: heads go to OUT + suffix ("" = OUT itself)
    init_from: str | None = None  # train stages: the stage whose heads this one starts from


def _argv(text: str) -> tuple[str, ...]:
    """A stage's arguments, written as one whitespace-separated line."""
    return tuple(text.split())


HELDOUT_DATA = Stage(
    "generate-data",
    _argv(
        "--split heldout --heldout-per-domain 16 --max-prompt-tokens 512 --max-new-tokens 512 "
        "--temperature 1.0 --temperature 0.7 --max-num-seqs 96 --chunk 96"
    ),
)
TRAIN_DATA = (
    "--split train --train-per-domain 100000 --max-prompt-tokens 512 --max-new-tokens 512 --temperature 1.0 "
    "--temperature 1.0 --temperature 1.0 --temperature 0.7 --samples-per-prompt 2 --samples-per-prompt math=8 "
    "--samples-per-prompt code=8 --max-num-seqs 256 --chunk 512"
)
STEP_SHAPE = "--chains-per-step 1024 --draft-vocab-size 8192 --eval-sequences 24"  # every train stage
# The train sample v7 was made from: the first 4,494 sequences of TRAIN_DATA (seed 7). Later samples
# are appended to the same folder (generate-data keeps what it has), so the features recipe caps its
# train stages at these and reproduces v7 in a grown folder too.
V7_TRAIN_SEQUENCES = "--max-train-sequences 4494"
# The larger sample of recipe more-data: twice the continuations per prompt, appended.
TRAIN_DATA_2X = TRAIN_DATA.replace("--samples-per-prompt 2 --samples-per-prompt math=8 --samples-per-prompt code=8",
                                   "--samples-per-prompt 4 --samples-per-prompt math=16 --samples-per-prompt code=16")
FEATURES_KL = Stage(
    "train",
    _argv(
        "--aux-layers 2,15,27 --feedback normed --feature-loss-weight 1 "
        f"--loss kl --steps 6000 {STEP_SHAPE} --lr 2e-3 --warmup-steps 30 --eval-every 500 --seed 0 "
        f"{V7_TRAIN_SEQUENCES}"
    ),
    out_suffix="-kl-features",
)

RECIPES: dict[str, dict[str, Stage]] = {
    "v6": {
        "heldout": HELDOUT_DATA,
        "train-data": Stage("generate-data", _argv(TRAIN_DATA)),
        "kl": Stage(
            "train",
            _argv(
                f"--loss kl --steps 900 --end-at-step 801 {STEP_SHAPE} --lr 2e-3 --warmup-steps 30 --eval-every 100 "
                "--max-train-sequences 2600"
            ),
            out_suffix="-kl",
        ),
        "kl-all": Stage(
            "train",
            _argv(f"--loss kl --steps 2200 {STEP_SHAPE} --lr 1e-3 --warmup-steps 20 --eval-every 200 --seed 2"),
            out_suffix="-kl-all",
            init_from="kl",
        ),
        "kl-more": Stage(
            "train",
            _argv(f"--loss kl --steps 3000 {STEP_SHAPE} --lr 7e-4 --warmup-steps 20 --eval-every 250 --seed 3"),
            out_suffix="-kl-more",
            init_from="kl-all",
        ),
        "e2e-tv": Stage(
            "train",
            _argv(f"--loss e2e-tv --steps 250 {STEP_SHAPE} --lr 5e-4 --warmup-steps 10 --eval-every 125 --seed 1"),
            out_suffix="-e2e-tv",
            init_from="kl-more",
        ),
        "aux-tv": Stage(
            "train",
            _argv(
                f"--aux-layers 2,15,27 --loss e2e-tv --steps 600 {STEP_SHAPE} --lr 3e-4 --warmup-steps 20 "
                "--eval-every 150 --seed 4 --max-train-sequences 1792"
            ),
            init_from="e2e-tv",
        ),
    },
    "features": {
        "heldout": HELDOUT_DATA,
        "train-data": Stage("generate-data", _argv(TRAIN_DATA + " --seed 7")),
        "kl-features": FEATURES_KL,
        "e2e-tv": Stage(
            "train",
            _argv(
                f"--loss e2e-tv --steps 400 {STEP_SHAPE} --lr 5e-4 --warmup-steps 20 --eval-every 100 --seed 5 "
                f"{V7_TRAIN_SEQUENCES}"
            ),
            init_from="kl-features",
        ),
    },
    # The shipped v8 (docs/training.md): the features recipe's KL heads continued on twice the data
    # (the v7 heads' held-out/train gap said data, not steps, limited them), then e2e-TV.
    "more-data": {
        "heldout": HELDOUT_DATA,
        "train-data": Stage("generate-data", _argv(TRAIN_DATA + " --seed 7")),
        "kl-features": FEATURES_KL,
        "train-data-2x": Stage("generate-data", _argv(TRAIN_DATA_2X + " --seed 7")),
        "kl-2x": Stage(
            "train",
            _argv(
                f"--feature-loss-weight 1 --loss kl --steps 2500 {STEP_SHAPE} --lr 1e-3 --warmup-steps 30 "
                "--eval-every 500 --seed 8"
            ),
            out_suffix="-kl-2x",
            init_from="kl-features",
        ),
        "e2e-tv": Stage(
            "train",
            _argv(f"--loss e2e-tv --steps 400 {STEP_SHAPE} --lr 5e-4 --warmup-steps 20 --eval-every 100 --seed 9"),
            init_from="kl-2x",
        ),
    },
}
DEFAULT_RECIPE = "more-data"


def add_parser(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name,
        help="reproduce the shipped default heads end to end (data, target pass, KL with aux layers, e2e-TV)",
        description="Reproduce the shipped default heads end to end: held-out and train data (vLLM), the target "
        "pass, KL training from the identity start with the target's layers 2, 15 and 27 as extra features, normed "
        "feedback and a feature loss, continued on twice the data, then an e2e-TV fine-tune (recipe more-data; "
        "--recipe features makes v7, --recipe v6 the heads before). Every stage is resumable: rerun the same "
        "command after an interruption. Data and caches go to "
        "--data (default $BEBOP_HOME/data/smollm2-135m-selfdistill); each train stage's heads to OUT plus the "
        "stage's suffix (--dry-run lists them), the last stage's to OUT.",
    )
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        help="final heads folder (earlier train stages write OUT-kl-features, ...: see --dry-run)",
    )
    p.add_argument("--data", type=Path, default=None, help="dataset folder (default: $BEBOP_HOME/data/...)")
    p.add_argument("--model", type=Path, default=None, help="target model folder (default: the fetched default)")
    p.add_argument(
        "--recipe",
        choices=sorted(RECIPES),
        default=DEFAULT_RECIPE,
        help=f"more-data: the shipped heads' (v8) stages ({', '.join(RECIPES['more-data'])}); features: v7's "
        f"stages ({', '.join(RECIPES['features'])}); v6: v6's stages ({', '.join(RECIPES['v6'])}) "
        f"(default: {DEFAULT_RECIPE})",
    )
    p.add_argument(
        "--stages",
        default=None,
        help="comma-separated stages of the recipe to run, in order (default: all of them; --dry-run lists them)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the commands without running them")
    return p


def commands(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """(stage name, ``bebop`` argv) for each wanted stage of ``args.recipe``, in order."""
    from bebop_vllm.errors import BebopError

    recipe_name = getattr(args, "recipe", None) or DEFAULT_RECIPE
    recipe = RECIPES[recipe_name]
    common = [*(["--model", str(args.model)] if args.model else []), *(["--data", str(args.data)] if args.data else [])]
    gen = [*(["--model", str(args.model)] if args.model else []), *(["--out", str(args.data)] if args.data else [])]

    def heads_dir(name: str) -> Path:
        return Path(f"{args.out}{recipe[name].out_suffix}")

    plan: dict[str, list[str]] = {}
    for name, stage in recipe.items():
        if stage.command == "generate-data":
            plan[name] = ["generate-data", *gen, *stage.args]
            continue
        init = ["--init-from", str(heads_dir(stage.init_from))] if stage.init_from else []
        plan[name] = ["train", *common, "--out", str(heads_dir(name)), "--resume", *init, *stage.args]
    wanted = [s.strip() for s in (args.stages or ",".join(plan)).split(",") if s.strip()]
    unknown = [s for s in wanted if s not in plan]
    if unknown:
        raise BebopError(f"unknown stage(s) {unknown} for recipe {recipe_name!r}; choose from {', '.join(plan)}")
    return [(s, plan[s]) for s in wanted]


def run(args: argparse.Namespace) -> int:
    import os

    from tqdm import tqdm

    from bebop_vllm.errors import BebopError

    todo = commands(args)
    env = dict(os.environ)
    for k, v in ENV.items():
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
