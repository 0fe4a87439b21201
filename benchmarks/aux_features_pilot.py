"""Would EAGLE-3-style multi-layer target features make the heads accept more? A from-scratch pilot.

The heads read one target feature: the final post-norm hidden state h_t, which the target has
already shaped into its prediction of x_{t+1}. EAGLE-3 feeds its draft head the residual stream
after a low, a middle and a high layer (vLLM's default for a 30-layer target: ids 2, 15, 27,
``get_eagle3_default_aux_hidden_state_layers``), which keeps more of what the context says about
later tokens. Before building the serving side (vLLM's aux-hidden-state path for method
"eagle3"), this pilot measures whether such features help our heads at all.

Arms, trained here from the same identity start (``new_head(..., warm_start=True)``, same seed)
on the same train sequences in the same order, same loss, steps, learning-rate schedule and
draft vocabulary:

- ``final``: the head as it is (reads h_t);
- ``aux``: the same head with aux layers (``new_head(..., aux_layer_ids=--layers)``, the
  production format since 2026-12-06): the residual stream after each layer of ``--layers``,
  RMS-normed per layer, concatenated and projected by a linear layer that starts at zero, added
  to h_t at depth 1 (deeper depths read the head's own residual, as in EAGLE-3). At step 0 it
  computes exactly what ``final`` computes.

Both arms run through this script's loop (``vocab_chains``, ``loss_of``, ``lr_at``, gradient
clipping and AdamW as in ``bebop train``); the layer features come from the target pass's aux
option (``HiddenCache(..., aux_layer_ids)``, cached in the dataset folder). (The committed
results of 2026-12-06 were made with this script's earlier copy of the aux head and a
per-sequence feature cache; same math, features laid out [h_t, aux] instead of [aux, h_t].)

Held-out: every completion chain of the held-out split's T = 1 sequences (teacher-forced, over
the draft vocabulary). Verdict rule (written before the run): ``aux`` beats ``final`` when its
expected tokens per verify step exceeds final's by more than 2 standard errors of the paired
per-sequence difference (worse: below -2 SE).

    .venv/bin/python benchmarks/aux_features_pilot.py --train-sequences 384 --steps 250
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from bebop_vllm.hardware import describe_machine, machine_info
from bebop_vllm.heads.module import BebopMTPHead
from bebop_vllm.train.dataset import SequenceSet
from bebop_vllm.train.target_cache import HiddenCache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_results  # noqa: E402
from recipe_comparison import paired, per_sequence_metrics  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "aux_features_pilot"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="From-scratch A/B of the heads with and without EAGLE-3-style multi-layer target features "
        "(teacher-forced held-out acceptance, paired verdict)."
    )
    p.add_argument("--layers", default="2,15,27",
                   help="target layer ids whose output residual stream the aux arm reads (vLLM's aux-hidden-state "
                   "ids: id i = the output of layer i - 1; default: 2,15,27, EAGLE-3's choice for 30 layers)")
    p.add_argument("--train-sequences", type=int, default=384, help="first N train sequences (default: 384)")
    p.add_argument("--steps", type=int, default=250, help="optimizer steps per arm (default: 250)")
    p.add_argument("--chains-per-step", type=int, default=1024, help="chain positions per step (default: 1024)")
    p.add_argument("--loss", default="kl", help="training loss, as `bebop train --loss` (default: kl)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default: 2e-3, make-heads' kl stage)")
    p.add_argument("--warmup-steps", type=int, default=30, help="linear warmup steps (default: 30)")
    p.add_argument("--draft-vocab-size", type=int, default=8192, help="draft vocabulary size (default: 8192)")
    p.add_argument("--heldout-sequences", type=int, default=None,
                   help="first N held-out T = 1 sequences (default: all)")
    p.add_argument("--seed", type=int, default=0, help="init and data-order seed (default: 0)")
    p.add_argument("--data", type=Path, default=None, help="dataset folder (default: $BEBOP_HOME/data/...)")
    p.add_argument("--out", type=Path, default=RESULTS, help=f"results path without suffix (default: {RESULTS})")
    return p.parse_args(argv)


def train_arm(
    head: BebopMTPHead,
    arm: str,
    train_idx: list[int],
    train_set: SequenceSet,
    train_cache: HiddenCache,
    vocab_ids: torch.Tensor,
    lm_rows: torch.Tensor,
    args: argparse.Namespace,
) -> dict:
    """``args.steps`` optimizer steps of ``bebop train``'s recipe over whole sequences."""
    from bebop_vllm.train.chains import vocab_chains
    from bebop_vllm.train.trainer import TrainConfig, chain_count, first_chain, loss_of, lr_at, param_groups

    cfg = TrainConfig(model_dir=Path(), data_dir=Path(), out_dir=Path(), loss=args.loss, steps=args.steps,
                      lr=args.lr, warmup_steps=args.warmup_steps)
    weights = torch.ones(cfg.num_depths)
    opt = torch.optim.AdamW(param_groups(head, cfg), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    cursor, seen, t0 = 0, 0, time.time()
    order: tuple[int, list[int]] = (-1, [])
    bar = tqdm(range(args.steps), desc=f"train {arm}")
    for step in bar:
        batch, n = [], 0
        while n < args.chains_per_step:  # whole sequences from a per-epoch shuffle, as the trainer does
            epoch, pos = divmod(cursor, len(train_idx))
            if order[0] != epoch:
                perm = torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(args.seed * 7919 + epoch))
                order = (epoch, perm.tolist())
            i = train_idx[order[1][pos]]
            batch.append(i)
            n += chain_count(train_set, i, False)
            cursor += 1
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg) * group["lr_scale"]
        total = 0.0
        for i in batch:
            tokens = torch.from_numpy(train_set.sequence(i).astype(np.int64))
            hidden = train_cache.hidden(i)
            reads = train_cache.features(i) if head.shape.aux_layer_ids else None
            b = vocab_chains(head, tokens, hidden, train_cache.log_normaliser(i), first_chain(train_set, i, False),
                             cfg.num_depths, float(train_set.temperatures[i]), vocab_ids, lm_rows, reads)
            share = chain_count(train_set, i, False) / n
            loss = loss_of(args.loss, b, weights)
            (loss * share).backward()
            total += loss.item() * share
        torch.nn.utils.clip_grad_norm_(head.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        seen += n
        bar.set_postfix(loss=f"{total:.4f}", cps=f"{seen / (time.time() - t0):.0f}")
    return {"train_seconds": round(time.time() - t0), "chain_positions": seen,
            "chain_positions_per_s": round(seen / (time.time() - t0), 1)}


def evaluate_arm(
    head: BebopMTPHead,
    held_idx: list[int],
    held_set: SequenceSet,
    held_cache: HiddenCache,
    vocab_ids: torch.Tensor,
    lm_rows: torch.Tensor,
) -> dict:
    """Per-sequence teacher-forced metrics (the shape ``recipe_comparison.paired`` takes; an aux
    head reads ``held_cache.features``)."""
    return per_sequence_metrics(head, held_set, held_cache, held_idx, 3, vocab_ids, lm_rows)


def markdown(out: dict) -> str:
    lines = [
        "# EAGLE-3-style multi-layer features: from-scratch pilot",
        "",
        f"`{out['command']}`",
        "",
        f"Machine: {out['machine_line']}. Both arms from the identity start (seed {out['seed']}), "
        f"{out['steps']} steps x {out['chains_per_step']} chain positions of `{out['loss']}` (lr {out['lr']}, "
        f"warmup {out['warmup_steps']}), first {out['train_sequences']} train sequences, draft vocabulary "
        f"{out['draft_vocab_size']}; aux layers {out['layers']}. Held-out: T = 1, every completion chain.",
        "",
        "| arm | alpha_1 | alpha_2 | alpha_3 | E[tokens/step] | chain positions/s |",
        "|---|---|---|---|---|---|",
    ]
    for arm, r in out["results"].items():
        a = r["alphas"]
        lines.append(f"| {arm} | {a[0]:.3f} | {a[1]:.3f} | {a[2]:.3f} | {r['expected_tokens_per_step']:.3f} | "
                     f"{out['training'][arm]['chain_positions_per_s']:.0f} |")
    v = out["verdict"]
    lines += ["", f"aux - final: {v['mean_diff']:+.3f} ± {v['se']:.3f} (paired over {v['sequences']} sequences): "
              f"**{v['verdict']}** (rule: beyond ±2 SE).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from bebop_vllm.heads.checkpoint import new_head
    from bebop_vllm.paths import default_model_dir
    from bebop_vllm.train.dataset import default_data_dir, load_split
    from bebop_vllm.train.evaluate import ranked_vocab
    from bebop_vllm.train.trainer import chain_count, compute_dtype, select

    if compute_dtype("auto") != torch.float32:
        raise SystemExit("this pilot trains in float32 only (no autocast path); run it on a CPU without native bf16")
    layers = tuple(int(x) for x in args.layers.split(","))
    model, data = default_model_dir(), args.data or default_data_dir()
    machine = machine_info()  # before the work: its load average is the one the run started under
    torch.manual_seed(args.seed)
    train_set, held_set = load_split(data, "train"), load_split(data, "heldout")
    train_idx = [i for i in select(train_set, None, args.train_sequences) if chain_count(train_set, i, False)]
    held_idx = select(held_set, (1.0,), args.heldout_sequences)
    train_cache = HiddenCache(data, "train", train_set, model, layers)
    held_cache = HiddenCache(data, "heldout", held_set, model, layers)
    train_cache.fill(train_idx, desc="target pass with aux layers (train)")
    held_cache.fill(held_idx, desc="target pass with aux layers (held-out)")

    base = new_head(model, seed=args.seed, warm_start=True)
    size = args.draft_vocab_size
    vocab_ids = torch.from_numpy(ranked_vocab(train_cache.mass)[:size]).sort()[0]
    lm_rows = base.lm_head_weight[vocab_ids].contiguous()
    results, training = {}, {}
    for arm in ("final", "aux"):
        head = base if arm == "final" else new_head(model, seed=args.seed, warm_start=True, aux_layer_ids=layers)
        training[arm] = train_arm(head, arm, train_idx, train_set, train_cache, vocab_ids, lm_rows, args)
        with torch.no_grad():
            results[arm] = evaluate_arm(head, held_idx, held_set, held_cache, vocab_ids, lm_rows)
        print(f"{arm}: E[tokens/step] {results[arm]['expected_tokens_per_step']:.3f}  alphas {results[arm]['alphas']}")
    out = {
        "command": "python benchmarks/aux_features_pilot.py " + " ".join(argv or sys.argv[1:]),
        "machine": machine,
        "machine_line": describe_machine(machine),
        "layers": list(layers),
        "train_sequences": len(train_idx),
        "steps": args.steps,
        "chains_per_step": args.chains_per_step,
        "loss": args.loss,
        "lr": args.lr,
        "warmup_steps": args.warmup_steps,
        "draft_vocab_size": size,
        "seed": args.seed,
        "threads": torch.get_num_threads() or os.cpu_count(),
        "training": training,
        "verdict": paired(results["aux"], results["final"]),
        "results": {a: {k: v for k, v in r.items() if k != "per_sequence"} for a, r in results.items()},
        "per_sequence": {a: r["per_sequence"] for a, r in results.items()},
    }
    write_results(args.out, out, markdown(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
