"""The head trainer (``bebop train``), nanoGPT style: one function, read top to bottom.

The target is frozen: its post-norm final hidden states are cached once per dataset
(``target_cache``), its tempered distributions are recomputed per batch from them without
grad. The head starts from the target's LAST decoder layer and final norm (``new_head(...,
warm_start=True)``): the head is then "one more layer" over the target's features, which
trains much faster than a random layer; the fc (2H -> H) starts random. A Qwen3.5 target
ships a trained MTP module (``mtp.*``): the head starts as that module instead.
"""

from __future__ import annotations

import json
import math
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from bebop_vllm.errors import BebopError
from bebop_vllm.heads.checkpoint import load_heads, new_head, save_heads
from bebop_vllm.heads.metadata import DataProvenance, HeadMetadata, HeldoutMetrics, tokenizer_fingerprint
from bebop_vllm.heads.target import read_target_config
from bebop_vllm.train import losses
from bebop_vllm.train.chains import ChainBatch, sequence_chains
from bebop_vllm.train.dataset import SequenceSet, load_split
from bebop_vllm.train.evaluate import evaluate
from bebop_vllm.train.target_cache import HiddenCache


@dataclass
class TrainConfig:
    model_dir: Path
    data_dir: Path
    out_dir: Path
    loss: str = "e2e-tv"
    num_depths: int = 3
    steps: int = 200
    seqs_per_step: int = 4
    max_chains_per_seq: int = 128  # random subset of chain starts per sequence and step
    max_train_sequences: int | None = None  # first N of the train split
    heldout_sequences: int | None = None  # first N of the held-out split (final eval)
    lr: float = 1e-3
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    temperature: float = 1.0
    dtype: str = "fp32"  # compute dtype of the head: fp32, or bf16 autocast
    save_dtype: str = "bf16"
    eval_every: int = 50
    eval_sequences: int = 16  # held-out sequences for the periodic eval (final eval: all)
    save_every: int = 50
    seed: int = 0
    resume: bool = False
    train_on_prompts: bool = False  # also train chains inside the prompt (target p is exact there too)
    time_budget_min: float | None = None  # end training (then final eval + save) after this many minutes
    stop_after: int | None = None  # stop (saving the resume state) after this many steps of this run
    init_from: Path | None = None  # heads folder to start from instead of the warm start
    progress: bool = True
    extra: dict = field(default_factory=dict)


def loss_of(name: str, b: ChainBatch) -> torch.Tensor:
    if name == "e2e-tv":
        return losses.e2e_tv_loss(b.draft_logits, b.target_probs, b.mask)
    if name == "tv":
        return losses.tv_loss(b.draft_logits, b.target_probs, b.mask)
    if name == "kl":
        return losses.kl_loss(b.draft_logits, b.target_probs, b.mask)
    if name == "hybrid":
        return losses.hybrid_loss(b.draft_logits, b.target_probs, b.mask)
    if name == "ce":
        return losses.ce_loss(b.draft_logits, b.target_ids, b.ce_mask)
    raise BebopError(f"unknown loss {name!r}; choose from {', '.join(losses.LOSSES)}")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio * lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def _with_temperature(seqs: SequenceSet, temperature: float, limit: int | None) -> list[int]:
    """Indices of sequences sampled at ``temperature``, the first ``limit`` of them (generate-data
    interleaves the domains, so a prefix keeps the domain mix)."""
    idx = [i for i in range(len(seqs)) if abs(float(seqs.temperatures[i]) - temperature) < 1e-6]
    return idx if limit is None else idx[:limit]


def train(cfg: TrainConfig) -> HeadMetadata | None:
    """Train a head per ``cfg`` and write its folder; returns its metadata (None if stopped
    early by ``stop_after``, leaving ``train_state.pt`` to resume from)."""
    if cfg.loss not in losses.LOSSES:
        raise BebopError(f"unknown loss {cfg.loss!r}; choose from {', '.join(losses.LOSSES)}")
    if cfg.dtype not in ("fp32", "bf16"):
        raise BebopError(f"--dtype must be fp32 or bf16, got {cfg.dtype!r}")
    torch.manual_seed(cfg.seed)
    train_set, held_set = load_split(cfg.data_dir, "train"), load_split(cfg.data_dir, "heldout")
    train_idx = _with_temperature(train_set, cfg.temperature, cfg.max_train_sequences)
    held_idx = _with_temperature(held_set, cfg.temperature, cfg.heldout_sequences)
    if not train_idx or not held_idx:
        raise BebopError(f"{cfg.data_dir} has no train or held-out sequences sampled at T={cfg.temperature}")
    # target hidden states, computed once per dataset (the expensive part on CPU)
    held_cache = HiddenCache(cfg.data_dir, "heldout", held_set, cfg.model_dir)
    held_cache.fill(held_idx, desc="target hidden states (held-out)", progress=cfg.progress)
    train_cache = HiddenCache(cfg.data_dir, "train", train_set, cfg.model_dir)
    train_cache.fill(train_idx, desc="target hidden states (train)", progress=cfg.progress)
    eval_idx = [
        held_idx[int(k)] for k in np.linspace(0, len(held_idx) - 1, min(cfg.eval_sequences, len(held_idx))).round()
    ]

    if cfg.init_from is not None:  # e.g. CE heads fine-tuned with the e2e-TV loss
        head = load_heads(cfg.init_from, cfg.model_dir)
        init_note = f"initialised from {cfg.init_from} (loss {head.metadata.loss}, {head.metadata.train_steps} steps); "
    else:
        head = new_head(cfg.model_dir, seed=cfg.seed, warm_start=True)
        init_note = ""
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    state_path = cfg.out_dir / "train_state.pt"
    step, tokens_seen, history = 0, 0, []
    if cfg.resume and state_path.exists():
        st = torch.load(state_path, weights_only=False)
        head.load_state_dict(st["head"])
        opt.load_state_dict(st["opt"])
        step, tokens_seen, history = st["step"], st["tokens_seen"], st["history"]
        print(f"resumed from {state_path} at step {step}")

    def save_state() -> None:
        cfg.out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "head": head.state_dict(),
                "opt": opt.state_dict(),
                "step": step,
                "tokens_seen": tokens_seen,
                "history": history,
                "config": {k: str(v) for k, v in asdict(cfg).items()},
            },
            state_path,
        )

    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.dtype == "bf16")
    running = torch.zeros(cfg.num_depths)
    t_start, tokens_at_start = time.time(), tokens_seen
    first_step = step
    bar = tqdm(total=cfg.steps, initial=step, desc=f"train {cfg.loss}", dynamic_ncols=True, disable=not cfg.progress)
    while step < cfg.steps:
        if cfg.time_budget_min is not None and time.time() - t_start > 60 * cfg.time_budget_min:
            tqdm.write(f"time budget of {cfg.time_budget_min} min reached at step {step}/{cfg.steps}")
            break
        # data order and chain subsets derive from (seed, step): a resumed run sees the same batches
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        epoch, pos = divmod(step * cfg.seqs_per_step, len(train_idx))
        order = torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(cfg.seed + epoch)).tolist()
        batch = [train_idx[order[(pos + k) % len(train_idx)]] for k in range(cfg.seqs_per_step)]
        for g_ in opt.param_groups:
            g_["lr"] = lr_at(step, cfg)
        total_loss, alpha_sum, alpha_cnt = 0.0, torch.zeros(cfg.num_depths), torch.zeros(cfg.num_depths)
        for i in batch:  # gradient accumulation: one sequence at a time bounds memory
            tokens = torch.from_numpy(train_set.sequence(i).astype(np.int64))
            plen = int(train_set.prompt_lens[i])
            first = 0 if cfg.train_on_prompts else max(plen - 1, 0)
            starts = torch.arange(first, len(tokens) - 1)
            if len(starts) > cfg.max_chains_per_seq:
                starts = starts[torch.randperm(len(starts), generator=gen)[: cfg.max_chains_per_seq]].sort().values
            if len(starts) == 0:
                continue
            with autocast:
                b = sequence_chains(head, tokens, train_cache.hidden(i), plen, cfg.num_depths, cfg.temperature, starts)
                loss = loss_of(cfg.loss, b)
            (loss / len(batch)).backward()
            total_loss += loss.item() / len(batch)
            with torch.no_grad():
                a = losses.acceptance_rates(b.draft_logits.detach().float(), b.target_probs)
                alpha_sum += torch.where(b.mask, a, 0.0).sum(0)
                alpha_cnt += b.mask.sum(0)
            tokens_seen += int(b.mask[:, 0].sum())
        torch.nn.utils.clip_grad_norm_(head.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        alpha = alpha_sum / alpha_cnt.clamp_min(1)
        running = alpha if step == 1 else 0.9 * running + 0.1 * alpha
        history.append({"step": step, "loss": round(total_loss, 5), "alpha": [round(x, 4) for x in alpha.tolist()]})
        bar.set_postfix(loss=f"{total_loss:.4f}", alpha="/".join(f"{x:.3f}" for x in running.tolist()))
        bar.update(1)
        if step % cfg.eval_every == 0 and step < cfg.steps:
            m = evaluate(head, held_set, held_cache, eval_idx, cfg.num_depths, cfg.temperature, progress=False)
            history[-1]["heldout"] = m.model_dump()
            tqdm.write(f"step {step}: held-out alpha {m.alphas}  E[accepted length] {m.expected_accepted_length:.3f}")
        if step % cfg.save_every == 0 or step == cfg.steps:
            save_state()
        if cfg.stop_after is not None and step - first_step >= cfg.stop_after and step < cfg.steps:
            save_state()
            bar.close()
            print(f"stopped after step {step}; resume with --resume")
            return None
    bar.close()
    train_seconds = time.time() - t_start
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    final = evaluate(head, held_set, held_cache, held_idx, cfg.num_depths, cfg.temperature, cfg.progress)
    print(
        f"final held-out ({len(held_idx)} sequences): alpha {final.alphas}  "
        f"E[accepted length] {final.expected_accepted_length:.3f}"
    )
    meta = _metadata(cfg, train_set, train_idx, step, tokens_seen, final)
    meta.notes = init_note + (
        f"trained by `bebop train` in {train_seconds:.0f} s; {(tokens_seen - tokens_at_start) / train_seconds:.1f} "
        f"chain positions/s; peak RSS {peak_rss_mb:.0f} MB; train_on_prompts={cfg.train_on_prompts}; "
        f"lr {cfg.lr}, {cfg.seqs_per_step} sequences x <= {cfg.max_chains_per_seq} chains per step"
    )
    tcfg = read_target_config(cfg.model_dir)
    save_heads(head, cfg.out_dir, tcfg, meta, dtype=cfg.save_dtype)
    (cfg.out_dir / "train_log.json").write_text(
        json.dumps(
            {
                "config": {k: str(v) for k, v in asdict(cfg).items()},
                "train_seconds": round(train_seconds, 1),
                "chain_positions_per_second": round((tokens_seen - tokens_at_start) / train_seconds, 2),
                "peak_rss_mb": round(peak_rss_mb),
                "history": history,
            },
            indent=1,
        )
        + "\n"
    )
    state_path.unlink(missing_ok=True)  # finished: the head folder replaces the resume state
    return meta


def _metadata(
    cfg: TrainConfig,
    train_set: SequenceSet,
    train_idx: list[int],
    steps: int,
    tokens_seen: int,
    heldout: HeldoutMetrics,
) -> HeadMetadata:
    tcfg = read_target_config(cfg.model_dir)
    lens = np.diff(train_set.offsets)[train_idx]
    plens = train_set.prompt_lens[train_idx]
    return HeadMetadata(
        target_architecture=(tcfg.get("architectures") or ["?"])[0],
        target_model=cfg.model_dir.name,
        hidden_size=int(tcfg["hidden_size"]),
        vocab_size=int(tcfg["vocab_size"]),
        tokenizer_fingerprint=tokenizer_fingerprint(cfg.model_dir),
        num_depths=cfg.num_depths,
        loss=cfg.loss,
        train_temperature=cfg.temperature,
        data=DataProvenance(
            source=str(cfg.data_dir.name),
            domains=list(train_set.meta.get("domains", [])),
            num_sequences=len(train_idx),
            num_prompt_tokens=int(plens.sum()),
            num_completion_tokens=int((lens - plens).sum()),
            temperatures=sorted({float(t) for t in train_set.temperatures[train_idx]}),
            generator=train_set.meta.get("generator"),
            seed=train_set.meta.get("seed"),
            max_new_tokens=train_set.meta.get("max_new_tokens"),
        ),
        train_steps=steps,
        train_tokens=tokens_seen,
        heldout=heldout,
        seed=cfg.seed,
    )
