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
- ``aux``: the same head plus ``AuxFeatureHead``'s input path: the residual stream after each
  layer of ``--layers``, RMS-normed per layer, concatenated and projected by a linear layer
  that starts at zero, added to h_t at depth 1 (deeper depths read the head's own residual, as
  in EAGLE-3). At step 0 it computes exactly what ``final`` computes.

Both arms run through this script's loop (``vocab_chains``, ``loss_of``, ``lr_at``, gradient
clipping and AdamW as in ``bebop train``); the layer features come from a transformers pass over
the chosen sequences, cached per sequence under ``$BEBOP_HOME/aux_features_pilot``.

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
from torch import nn
from tqdm import tqdm

from bebop_vllm.hardware import describe_machine, machine_info
from bebop_vllm.heads.module import BebopMTPHead, RMSNorm
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
    p.add_argument("--work", type=Path, default=None,
                   help="feature cache folder (default: $BEBOP_HOME/aux_features_pilot)")
    p.add_argument("--out", type=Path, default=RESULTS, help=f"results path without suffix (default: {RESULTS})")
    return p.parse_args(argv)


class AuxFeatureHead(BebopMTPHead):
    """A head whose depth-1 input adds EAGLE-3-style features to the target's final hidden state.

    ``unroll``'s ``target_hidden`` is [B, L, (1 + n) H]: h_t, then the residual stream after each
    of the n aux layers. Each aux block is RMS-normed (their scales differ by ~100x across
    layers), the blocks are concatenated and ``aux_fc`` [H, n H] (zero at the start) maps them to
    H; the sum with h_t is what the plain head's depth 1 reads. Deeper depths read the head's own
    residual (``BebopMTPHead.unroll``), as EAGLE-3's do.
    """

    def __init__(self, base: BebopMTPHead, num_aux: int) -> None:
        super().__init__(base.shape)
        self.load_state_dict(base.state_dict())
        h = base.shape.hidden_size
        self.aux_norms = nn.ModuleList(RMSNorm(h, base.shape.rms_norm_eps) for _ in range(num_aux))
        self.aux_fc = nn.Linear(num_aux * h, h, bias=False)
        nn.init.zeros_(self.aux_fc.weight)
        self.attach_target(base.embed_weight, base.lm_head_weight)

    def unroll(
        self, next_token_ids: torch.Tensor, target_hidden: torch.Tensor, num_depths: int, first_chain: int = 0
    ) -> list[torch.Tensor]:
        h = self.shape.hidden_size
        blocks = target_hidden[..., h:].unflatten(-1, (len(self.aux_norms), h))
        feats = torch.cat([norm(blocks[..., k, :]) for k, norm in enumerate(self.aux_norms)], dim=-1)
        return super().unroll(next_token_ids, target_hidden[..., :h] + self.aux_fc(feats), num_depths, first_chain)


class AuxFeatures:
    """The target's residual stream after ``layers`` for chosen sequences of a split: one fp16
    ``[L_i, n H]`` file per sequence (written atomically, so an interrupted pass resumes)."""

    def __init__(self, folder: Path, seqs: SequenceSet, layers: tuple[int, ...]) -> None:
        self.folder, self.seqs, self.layers = folder, seqs, layers
        folder.mkdir(parents=True, exist_ok=True)

    def path(self, i: int) -> Path:
        return self.folder / f"{i}.npy"

    @torch.no_grad()
    def fill(self, indices: list[int], model_dir: Path, desc: str, max_batch_tokens: int = 8192) -> None:
        from bebop_vllm.heads.target import load_target_model
        from bebop_vllm.train.target_cache import cache_dtype

        todo = sorted((i for i in indices if not self.path(i).exists()), key=lambda i: len(self.seqs.sequence(i)))
        if not todo:
            return
        model = load_target_model(model_dir, cache_dtype())
        batches, cur = [], []
        for i in todo:
            if cur and (len(cur) + 1) * len(self.seqs.sequence(i)) > max_batch_tokens:
                batches.append(cur)
                cur = []
            cur.append(i)
        batches.append(cur)
        with tqdm(total=sum(len(self.seqs.sequence(i)) for i in todo), desc=desc, unit="tok") as bar:
            for batch in batches:
                lens = [len(self.seqs.sequence(i)) for i in batch]
                ids = torch.zeros(len(batch), max(lens), dtype=torch.long)
                mask = torch.zeros_like(ids)
                for r, i in enumerate(batch):
                    ids[r, : lens[r]] = torch.from_numpy(self.seqs.sequence(i).astype(np.int64))
                    mask[r, : lens[r]] = 1
                # right padding: causal attention keeps real positions exact; hidden_states[i] is the
                # output of layer i - 1 (index 0: the embeddings), vLLM's aux-hidden-state id i
                states = model.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
                feats = torch.cat([states[k] for k in self.layers], dim=-1)
                for r, i in enumerate(batch):
                    tmp = self.folder / f"{i}.tmp.npy"
                    np.save(tmp, feats[r, : lens[r]].to(torch.float16).numpy())
                    tmp.replace(self.path(i))
                bar.update(sum(lens))

    def get(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.load(self.path(i)).astype(np.float32))


def train_arm(
    head: BebopMTPHead,
    arm: str,
    train_idx: list[int],
    train_set: SequenceSet,
    train_cache: HiddenCache,
    feats: AuxFeatures | None,
    vocab_ids: torch.Tensor,
    lm_rows: torch.Tensor,
    args: argparse.Namespace,
) -> dict:
    """``args.steps`` optimizer steps of ``bebop train``'s recipe over whole sequences."""
    from bebop_vllm.train.chains import vocab_chains
    from bebop_vllm.train.trainer import TrainConfig, chain_count, first_chain, loss_of, lr_at

    cfg = TrainConfig(model_dir=Path(), data_dir=Path(), out_dir=Path(), loss=args.loss, steps=args.steps,
                      lr=args.lr, warmup_steps=args.warmup_steps)
    weights = torch.ones(cfg.num_depths)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
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
            group["lr"] = lr_at(step, cfg)
        total = 0.0
        for i in batch:
            tokens = torch.from_numpy(train_set.sequence(i).astype(np.int64))
            hidden = train_cache.hidden(i)
            reads = None if feats is None else torch.cat([hidden, feats.get(i)], dim=-1)
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
    feats: AuxFeatures | None,
    vocab_ids: torch.Tensor,
    lm_rows: torch.Tensor,
) -> dict:
    """Per-sequence teacher-forced metrics (the shape ``recipe_comparison.paired`` takes)."""
    reads = None if feats is None else (lambda k: torch.cat([held_cache.hidden(k), feats.get(k)], dim=-1))
    return per_sequence_metrics(head, held_set, held_cache, held_idx, 3, vocab_ids, lm_rows, reads)


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
    from bebop_vllm.paths import bebop_home, default_model_dir
    from bebop_vllm.train.dataset import default_data_dir, load_split
    from bebop_vllm.train.evaluate import ranked_vocab
    from bebop_vllm.train.trainer import chain_count, compute_dtype, select

    if compute_dtype("auto") != torch.float32:
        raise SystemExit("this pilot trains in float32 only (no autocast path); run it on a CPU without native bf16")
    layers = tuple(int(x) for x in args.layers.split(","))
    model, data = default_model_dir(), args.data or default_data_dir()
    work = args.work or bebop_home() / "aux_features_pilot"
    machine = machine_info()  # before the work: its load average is the one the run started under
    torch.manual_seed(args.seed)
    train_set, held_set = load_split(data, "train"), load_split(data, "heldout")
    train_idx = [i for i in select(train_set, None, args.train_sequences) if chain_count(train_set, i, False)]
    held_idx = select(held_set, (1.0,), args.heldout_sequences)
    train_cache = HiddenCache(data, "train", train_set, model)
    held_cache = HiddenCache(data, "heldout", held_set, model)
    train_cache.fill(train_idx, desc="target pass (train)")
    held_cache.fill(held_idx, desc="target pass (held-out)")
    tag = "layers-" + "_".join(map(str, layers))
    train_feats = AuxFeatures(work / tag / "train", train_set, layers)
    held_feats = AuxFeatures(work / tag / "heldout", held_set, layers)
    train_feats.fill(train_idx, model, "aux features (train)")
    held_feats.fill(held_idx, model, "aux features (held-out)")

    base = new_head(model, seed=args.seed, warm_start=True)
    size = args.draft_vocab_size
    vocab_ids = torch.from_numpy(ranked_vocab(train_cache.mass)[:size]).sort()[0]
    lm_rows = base.lm_head_weight[vocab_ids].contiguous()
    results, training = {}, {}
    for arm in ("final", "aux"):
        head = base if arm == "final" else AuxFeatureHead(new_head(model, seed=args.seed, warm_start=True), len(layers))
        feats = None if arm == "final" else train_feats
        training[arm] = train_arm(head, arm, train_idx, train_set, train_cache, feats, vocab_ids, lm_rows, args)
        with torch.no_grad():
            results[arm] = evaluate_arm(head, held_idx, held_set, held_cache, None if arm == "final" else held_feats,
                                        vocab_ids, lm_rows)
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
