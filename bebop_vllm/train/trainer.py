"""The head trainer (``bebop train``), nanoGPT style: one function, read top to bottom.

What a step does: take whole train sequences (shuffled per epoch) until ``chains_per_step``
chain positions are gathered; for each, unroll the head over EVERY chain of the completion
(``vocab_chains``: one pass over the sequence computes all chains at all depths, so nothing
is computed for positions that carry no loss); score draft logits over the draft vocabulary
D against the target's exact probabilities on D (from the cached hidden state and full-vocab
log-normaliser); accumulate gradients weighted by chain count; clip; AdamW; warmup + cosine.

Why it is fast on a CPU: the vocabulary is ~85 % of a chain's FLOPs at V = 49,152, so
restricting it to D (8-16k tokens holding ~0.9-0.96 of the target's mass) cuts most of the
work; bf16 matmuls (autocast) where the CPU has avx512_bf16/AMX, fp32 elsewhere; all threads.
Training on D is also what serving does (``draft_vocab_size``): q = 0 outside D, so the
acceptance rate alpha = sum_{v in D} min(p_v, q_v) needs p on D only.

The target is frozen: its hidden states, log-normalisers and per-token probability mass are
cached once per dataset (``target_cache``); the mass ranks D (``draft_vocab.json``, written
into the heads folder together with the weights). Sequences sampled at several temperatures
train each at its own temperature (p and q tempered alike: the acceptance the engine sees).

Init: the identity start (``new_head(..., warm_start=True)``, see its docstring), or
``init_from`` an existing heads folder (e.g. KL heads fine-tuned with the e2e-TV loss).
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from bebop_vllm.draft_vocab import write_probability_ranked_vocab
from bebop_vllm.errors import BebopError
from bebop_vllm.hardware import cpu_has_bf16
from bebop_vllm.heads.checkpoint import add_aux_layers, load_heads, new_head, save_heads, widen_mlp
from bebop_vllm.heads.metadata import DataProvenance, HeadMetadata, HeldoutMetrics, tokenizer_fingerprint
from bebop_vllm.heads.module import BebopMTPHead
from bebop_vllm.heads.target import read_target_config
from bebop_vllm.train import losses
from bebop_vllm.train.chains import ChainBatch
from bebop_vllm.train.dataset import SequenceSet, load_split
from bebop_vllm.train.evaluate import evaluate_vocab, ranked_vocab
from bebop_vllm.train.target_cache import HiddenCache


@dataclass
class TrainConfig:
    model_dir: Path
    data_dir: Path
    out_dir: Path
    loss: str = "e2e-tv"
    num_depths: int = 3
    steps: int = 200
    chains_per_step: int = 4096  # chain positions per optimizer step (whole sequences)
    draft_vocab_size: int | None = 8192  # train on the N tokens with most target mass (None: full V)
    depth_decay: float = 1.0  # depth j weighs depth_decay ** (j - 1)
    max_train_sequences: int | None = None  # first N of the train split
    heldout_sequences: int | None = None  # first N of the held-out split (final eval)
    temperatures: tuple[float, ...] | None = None  # train on sequences sampled at these T (None: all)
    eval_temperature: float = 1.0  # held-out evaluation uses sequences sampled at this T
    lr: float = 1e-3
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    dtype: str = "auto"  # auto (bf16 where the CPU has native bf16, else fp32), fp32, bf16
    threads: int | None = None  # torch threads (default: every core)
    save_dtype: str = "bf16"
    eval_every: int = 50
    eval_sequences: int = 16  # held-out sequences for the periodic eval (final eval: all)
    save_every: int = 25
    seed: int = 0
    resume: bool = False
    train_on_prompts: bool = False  # also train chains inside the prompt (target p is exact there too)
    time_budget_min: float | None = None  # end training (then final eval + save) after this many minutes
    end_at_step: int | None = None  # end training (then final eval + save) at this step; schedule still ``steps``
    stop_after: int | None = None  # stop (saving the resume state) after this many steps of this run
    init_from: Path | None = None  # heads folder to start from instead of the identity start
    head_intermediate_size: int | None = None  # the head's MLP width (None: the target's, or init_from's)
    aux_layer_ids: tuple[int, ...] = ()  # EAGLE-3-style target layers the head also reads (() : init_from's)
    aux_lr_scale: float = 1.0  # learning rate of the aux input path (aux_fc, aux_norms) relative to --lr
    feature_weight: float = 0.0  # weight of the EAGLE-style feature loss SmoothL1(norm(r_j), h_{t+j}) (0: off)
    feedback: str | None = None  # what a depth hands the next, "residual" / "normed" (None: init_from's or residual)
    target_pass: bool = True  # False: train only on train sequences whose target pass is cached
    progress: bool = True
    extra: dict = field(default_factory=dict)


def loss_of(name: str, b: ChainBatch, depth_weights: torch.Tensor) -> torch.Tensor:
    if name == "e2e-tv":
        return losses.e2e_tv_loss(b.draft_logits, b.target_probs, b.mask, depth_weights)
    if name == "tv":
        return losses.tv_loss(b.draft_logits, b.target_probs, b.mask, depth_weights)
    if name == "kl":
        return losses.kl_loss(b.draft_logits, b.target_probs, b.mask, depth_weights)
    if name == "hybrid":
        return losses.hybrid_loss(b.draft_logits, b.target_probs, b.mask, depth_weights)
    if name == "ce":
        return losses.ce_loss(b.draft_logits, b.target_ids, b.ce_mask, depth_weights)
    raise BebopError(f"unknown loss {name!r}; choose from {', '.join(losses.LOSSES)}")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio * lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def compute_dtype(name: str) -> torch.dtype:
    """``auto``: bf16 on CUDA or CPUs with avx512_bf16/AMX (2x fp32 matmul throughput there),
    fp32 elsewhere (emulated bf16 is slower than fp32 on AVX2-only CPUs)."""
    if name == "auto":
        return torch.bfloat16 if (torch.cuda.is_available() or cpu_has_bf16()) else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def select(seqs: SequenceSet, temperatures: tuple[float, ...] | None, limit: int | None) -> list[int]:
    """Indices of sequences sampled at one of ``temperatures`` (None: any), the first ``limit``
    (generate-data interleaves domains and samples, so a prefix keeps the mix)."""
    idx = [
        i
        for i in range(len(seqs))
        if temperatures is None or any(abs(float(seqs.temperatures[i]) - t) < 1e-6 for t in temperatures)
    ]
    return idx if limit is None else idx[:limit]


def first_chain(seqs: SequenceSet, i: int, on_prompts: bool) -> int:
    return 0 if on_prompts else max(int(seqs.prompt_lens[i]) - 1, 0)


def chain_count(seqs: SequenceSet, i: int, on_prompts: bool) -> int:
    return max(int(seqs.offsets[i + 1] - seqs.offsets[i]) - 1 - first_chain(seqs, i, on_prompts), 0)


def train(cfg: TrainConfig) -> HeadMetadata | None:
    """Train a head per ``cfg`` and write its folder; returns its metadata (None if stopped
    early by ``stop_after``, leaving ``train_state.pt`` to resume from)."""
    if cfg.loss not in losses.LOSSES:
        raise BebopError(f"unknown loss {cfg.loss!r}; choose from {', '.join(losses.LOSSES)}")
    if cfg.dtype not in ("auto", "fp32", "bf16"):
        raise BebopError(f"--dtype must be auto, fp32 or bf16, got {cfg.dtype!r}")
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    dtype = compute_dtype(cfg.dtype)
    train_set, held_set = load_split(cfg.data_dir, "train"), load_split(cfg.data_dir, "heldout")
    train_idx = [
        i for i in select(train_set, cfg.temperatures, cfg.max_train_sequences) if chain_count(train_set, i, False)
    ]
    held_idx = select(held_set, (cfg.eval_temperature,), cfg.heldout_sequences)
    if not train_idx or not held_idx:
        raise BebopError(
            f"{cfg.data_dir} has no train sequences at T in {cfg.temperatures or 'any'} or no held-out sequences "
            f"sampled at T={cfg.eval_temperature}"
        )
    head, init_note = _initial_head(cfg)
    aux_ids = head.shape.aux_layer_ids
    if cfg.aux_lr_scale != 1.0 and not aux_ids:
        raise BebopError("--aux-lr-scale applies to heads with aux layers: give --aux-layers or --init-from aux heads")
    # what the frozen target says, computed once per dataset (the expensive part on CPU)
    held_cache = HiddenCache(cfg.data_dir, "heldout", held_set, cfg.model_dir, aux_ids)
    held_cache.fill(held_idx, desc="target pass (held-out)", progress=cfg.progress)
    train_cache = HiddenCache(cfg.data_dir, "train", train_set, cfg.model_dir, aux_ids)
    if cfg.target_pass:
        train_cache.fill(train_idx, desc="target pass (train)", progress=cfg.progress)
    else:  # e.g. a target pass stopped early: it cached a prefix of the data
        train_idx = [i for i in train_idx if not train_cache.is_missing(i)]
        if not train_idx:
            raise BebopError(f"no train sequence of {cfg.data_dir} has a cached target pass; drop --no-target-pass")
    eval_idx = [
        held_idx[int(k)] for k in np.linspace(0, len(held_idx) - 1, min(cfg.eval_sequences, len(held_idx))).round()
    ]

    # the draft vocabulary D: the tokens carrying the most target probability in the train data
    ranking = ranked_vocab(train_cache.mass)
    size = cfg.draft_vocab_size
    if head.shape.is_qwen3_5 and size is not None:
        # exported into the target's native MTP slots, these heads are served by vLLM's method
        # "mtp", which drafts over the full vocabulary: train on it
        tqdm.write(f"Qwen3.5 heads train on the full vocabulary (method 'mtp' has no draft vocabulary), not {size}")
        size = None
    if size is not None and not 1 <= size <= head.shape.vocab_size:
        raise BebopError(f"--draft-vocab-size must be in 1..{head.shape.vocab_size}, got {size}")
    vocab_ids = None if size is None or size >= head.shape.vocab_size else torch.from_numpy(ranking[:size]).sort()[0]
    lm_rows = None if vocab_ids is None else head.lm_head_weight[vocab_ids].contiguous()
    mass_in_vocab = float(train_cache.mass[ranking[:size]].sum() / max(train_cache.mass.sum(), 1e-12)) if size else 1.0
    depth_weights = cfg.depth_decay ** torch.arange(cfg.num_depths, dtype=torch.float32)

    opt = torch.optim.AdamW(param_groups(head, cfg), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    state_path = cfg.out_dir / "train_state.pt"
    step, chains_seen, cursor, history = 0, 0, 0, []
    if cfg.resume and state_path.exists():
        st = torch.load(state_path, weights_only=False)
        head.load_state_dict(st["head"])
        opt.load_state_dict(st["opt"])
        step, chains_seen, cursor, history = st["step"], st["chains_seen"], st["cursor"], st["history"]
        print(f"resumed from {state_path} at step {step} ({chains_seen} chain positions seen)")

    def save_state() -> None:
        cfg.out_dir.mkdir(parents=True, exist_ok=True)
        tmp = state_path.with_suffix(".tmp")
        torch.save(
            {
                "head": head.state_dict(),
                "opt": opt.state_dict(),
                "step": step,
                "chains_seen": chains_seen,
                "cursor": cursor,
                "history": history,
                "config": {k: str(v) for k, v in asdict(cfg).items()},
            },
            tmp,
        )
        tmp.replace(state_path)  # atomic: an interrupted save never corrupts the resume state

    def heldout_eval(indices: list[int], progress: bool) -> HeldoutMetrics:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            return evaluate_vocab(
                head, held_set, held_cache, indices, cfg.num_depths, vocab_ids, lm_rows, progress=progress
            )

    def order_of(epoch: int) -> list[int]:
        perm = torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch))
        return [train_idx[k] for k in perm.tolist()]

    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    running = torch.zeros(cfg.num_depths)
    t_start, chains_at_start, first_step = time.time(), chains_seen, step
    if step == 0 and not history:  # the learning curve starts at the init
        m0 = heldout_eval(eval_idx, progress=False)
        history.append({"step": 0, "chains_seen": 0, "heldout": m0.model_dump()})
        tqdm.write(f"step 0: held-out alpha {m0.alphas}  E[tokens/step] {m0.expected_accepted_length:.3f}")
    bar = tqdm(total=cfg.steps, initial=step, desc=f"train {cfg.loss}", dynamic_ncols=True, disable=not cfg.progress)
    epoch_order: tuple[int, list[int]] = (-1, [])
    while step < cfg.steps:
        if cfg.time_budget_min is not None and time.time() - t_start > 60 * cfg.time_budget_min:
            tqdm.write(f"time budget of {cfg.time_budget_min} min reached at step {step}/{cfg.steps}")
            break
        if cfg.end_at_step is not None and step >= cfg.end_at_step:
            tqdm.write(f"ending at step {step}/{cfg.steps} (--end-at-step)")
            break
        # whole sequences from a per-epoch shuffle until the step holds chains_per_step chains;
        # ``cursor`` counts sequences consumed, so a resumed run continues with the same batches
        batch, n_chains = [], 0
        while n_chains < cfg.chains_per_step:
            epoch, pos = divmod(cursor, len(train_idx))
            if epoch_order[0] != epoch:
                epoch_order = (epoch, order_of(epoch))
            i = epoch_order[1][pos]
            batch.append(i)
            n_chains += chain_count(train_set, i, cfg.train_on_prompts)
            cursor += 1
        for g_ in opt.param_groups:
            g_["lr"] = lr_at(step, cfg) * g_.get("lr_scale", 1.0)
        total_loss, alpha_sum, alpha_cnt = 0.0, torch.zeros(cfg.num_depths), torch.zeros(cfg.num_depths)
        feature_sum = 0.0
        for i in batch:  # gradient accumulation, one sequence at a time, weighted by its chains
            tokens = torch.from_numpy(train_set.sequence(i).astype(np.int64))
            share = chain_count(train_set, i, cfg.train_on_prompts) / n_chains
            with autocast:
                b = _chains(head, train_set, train_cache, i, tokens, cfg, vocab_ids, lm_rows)
                loss = loss_of(cfg.loss, b, depth_weights)
                if cfg.feature_weight:
                    assert b.draft_features is not None and b.target_features is not None
                    feat = losses.feature_loss(b.draft_features, b.target_features, b.mask, depth_weights)
                    feature_sum += feat.item() * share
                    loss = loss + cfg.feature_weight * feat
            (loss * share).backward()
            total_loss += loss.item() * share
            with torch.no_grad():
                a = losses.acceptance_rates(b.draft_logits.detach(), b.target_probs)
                alpha_sum += torch.where(b.mask, a, 0.0).sum(0)
                alpha_cnt += b.mask.sum(0)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(head.parameters(), cfg.grad_clip))
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        chains_seen += n_chains
        alpha = alpha_sum / alpha_cnt.clamp_min(1)
        running = alpha if step == 1 else 0.9 * running + 0.1 * alpha
        history.append(
            {
                "step": step,
                "chains_seen": chains_seen,
                "loss": round(total_loss, 5),
                "grad_norm": round(grad_norm, 4),
                "alpha": [round(x, 4) for x in alpha.tolist()],
            }
        )
        if cfg.feature_weight:
            history[-1]["feature_loss"] = round(feature_sum, 5)
        rate = (chains_seen - chains_at_start) / max(time.time() - t_start, 1e-9)
        bar.set_postfix(
            loss=f"{total_loss:.4f}", alpha="/".join(f"{x:.3f}" for x in running.tolist()), cps=f"{rate:.0f}"
        )
        bar.update(1)
        if step % cfg.eval_every == 0 and step < cfg.steps:
            m = heldout_eval(eval_idx, progress=False)
            history[-1]["heldout"] = m.model_dump()
            tqdm.write(f"step {step}: held-out alpha {m.alphas}  E[tokens/step] {m.expected_accepted_length:.3f}")
            _plot_learning_curve(history, cfg.out_dir / "learning_curve.png", cfg.loss)
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
    rate = (chains_seen - chains_at_start) / max(train_seconds, 1e-9)

    final = heldout_eval(held_idx, progress=cfg.progress)
    history.append({"step": step, "chains_seen": chains_seen, "heldout": final.model_dump(), "final": True})
    print(
        f"final held-out ({len(held_idx)} sequences, T={cfg.eval_temperature}): alpha {final.alphas}  "
        f"E[tokens/step] {final.expected_accepted_length:.3f}"
    )
    meta = _metadata(cfg, train_set, train_idx, step, chains_seen, final)
    meta.notes = init_note + (
        f"trained by `bebop train` in {train_seconds:.0f} s ({rate:.0f} chain positions/s, {str(dtype)[6:]}, "
        f"{torch.get_num_threads()} threads); peak RSS {peak_rss_mb:.0f} MB; "
        f"draft vocabulary {size or head.shape.vocab_size} tokens ({mass_in_vocab:.3f} of the train data's target "
        f"mass); {cfg.chains_per_step} chain positions per step, lr {cfg.lr}, depth decay {cfg.depth_decay}, "
        f"train_on_prompts={cfg.train_on_prompts}"
    )
    head.to(torch.float32)
    save_heads(head, cfg.out_dir, read_target_config(cfg.model_dir), meta, dtype=cfg.save_dtype)
    write_probability_ranked_vocab(
        cfg.out_dir,
        ranking,
        train_cache.mass,
        trained_size=size,
        source={"data": str(cfg.data_dir), "split": "train", "sequences": len(train_idx)},
    )
    (cfg.out_dir / "train_log.json").write_text(
        json.dumps(
            {
                "config": {k: str(v) for k, v in asdict(cfg).items()},
                "train_seconds": round(train_seconds, 1),
                "chain_positions_per_second": round(rate, 2),
                "compute_dtype": str(dtype),
                "threads": torch.get_num_threads(),
                "draft_vocab_size": size,
                "draft_vocab_mass": round(mass_in_vocab, 5),
                "peak_rss_mb": round(peak_rss_mb),
                "history": history,
            },
            indent=1,
        )
        + "\n"
    )
    _plot_learning_curve(history, cfg.out_dir / "learning_curve.png", cfg.loss)
    state_path.unlink(missing_ok=True)  # finished: the head folder replaces the resume state
    return meta


def _chains(
    head: torch.nn.Module,
    seqs: SequenceSet,
    cache: HiddenCache,
    i: int,
    tokens: torch.Tensor,
    cfg: TrainConfig,
    vocab_ids: torch.Tensor | None,
    lm_rows: torch.Tensor | None,
) -> ChainBatch:
    from bebop_vllm.train.chains import vocab_chains

    return vocab_chains(
        head,
        tokens,
        cache.hidden(i),
        cache.log_normaliser(i),
        first_chain(seqs, i, cfg.train_on_prompts),
        cfg.num_depths,
        float(seqs.temperatures[i]),
        vocab_ids,
        lm_rows,
        head_input=cache.features(i) if cache.aux_layer_ids else None,
        with_features=cfg.feature_weight > 0,
    )


def param_groups(head: BebopMTPHead, cfg: TrainConfig) -> list[dict]:
    """The optimizer's parameter groups: every trainable tensor (an aux head's ``target_norm`` is
    the target's, frozen), the aux input path in a group of its own when ``aux_lr_scale`` != 1 (a
    zero-initialised projection added to trained heads learns from nothing while the rest only
    needs a small step)."""
    named = [(n, p) for n, p in head.named_parameters() if p.requires_grad]
    is_aux = [n.startswith(("aux_fc.", "aux_norms.")) for n, _ in named]
    if not any(is_aux) or cfg.aux_lr_scale == 1.0:
        return [{"params": [p for _, p in named], "lr_scale": 1.0}]
    rest = [p for (_, p), a in zip(named, is_aux, strict=True) if not a]
    aux = [p for (_, p), a in zip(named, is_aux, strict=True) if a]
    return [{"params": rest, "lr_scale": 1.0}, {"params": aux, "lr_scale": float(cfg.aux_lr_scale)}]


def _initial_head(cfg: TrainConfig) -> tuple[BebopMTPHead, str]:
    """The head training starts from (``_start_head``, then ``feedback`` if asked), and a note
    saying how it was made."""
    head, note = _start_head(cfg)
    if cfg.feedback is not None and cfg.feedback != head.shape.feedback:
        # not function-preserving at depths >= 2 (they read norm(r) instead of r, or back)
        note += f"feedback {head.shape.feedback} -> {cfg.feedback}; "
        head.shape = head.shape.with_feedback(cfg.feedback)
    if cfg.feature_weight:
        note += f"feature loss weight {cfg.feature_weight}; "
    return head, note


def _start_head(cfg: TrainConfig) -> tuple[BebopMTPHead, str]:
    """``init_from`` (widened and/or given aux layers, both function-preserving, when asked) or
    the identity start."""
    if cfg.init_from is None:
        head = new_head(cfg.model_dir, seed=cfg.seed, warm_start=True, intermediate_size=cfg.head_intermediate_size,
                        aux_layer_ids=cfg.aux_layer_ids)
        note = "identity start; "
        if cfg.head_intermediate_size is not None:
            note += f"MLP of {head.shape.intermediate_size} units; "
        if cfg.aux_layer_ids:
            note += f"aux features of target layers {list(cfg.aux_layer_ids)}; "
        return head, note
    head = load_heads(cfg.init_from, cfg.model_dir)  # e.g. KL heads fine-tuned with the e2e-TV loss
    head.float()
    note = f"initialised from {cfg.init_from} (loss {head.metadata.loss}, {head.metadata.train_steps} steps); "
    width = cfg.head_intermediate_size
    if width is not None and width != head.shape.intermediate_size:
        note += f"MLP widened {head.shape.intermediate_size} -> {width} units (function-preserving); "
        head = widen_mlp(head, width, seed=cfg.seed)
    if cfg.aux_layer_ids and tuple(cfg.aux_layer_ids) != head.shape.aux_layer_ids:
        if head.shape.aux_layer_ids:
            raise BebopError(f"{cfg.init_from} reads aux layers {list(head.shape.aux_layer_ids)}; --aux-layers "
                             f"{list(cfg.aux_layer_ids)} cannot change them (only add them to a head without)")
        note += f"aux features of target layers {list(cfg.aux_layer_ids)} added (function-preserving); "
        head = add_aux_layers(head, cfg.aux_layer_ids, cfg.model_dir)
    return head, note


def _plot_learning_curve(history: list[dict], path: Path, loss: str) -> None:
    """Held-out alpha per depth and expected tokens per verify step vs chain positions seen."""
    points = [h for h in history if "heldout" in h]
    if len(points) < 2:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [p["chains_seen"] / 1e6 for p in points]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for j in range(len(points[0]["heldout"]["alphas"])):
        a1.plot(x, [p["heldout"]["alphas"][j] for p in points], marker="o", label=f"depth {j + 1}")
    a1.set(xlabel="chain positions seen (M)", ylabel="held-out alpha", title=f"acceptance per depth ({loss})")
    a1.legend()
    a2.plot(x, [p["heldout"]["expected_accepted_length"] for p in points], marker="o", color="k")
    a2.set(xlabel="chain positions seen (M)", ylabel="E[tokens per verify step]", title="teacher-forced, held-out")
    for ax in (a1, a2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _metadata(
    cfg: TrainConfig,
    train_set: SequenceSet,
    train_idx: list[int],
    steps: int,
    chains_seen: int,
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
        train_temperature=cfg.eval_temperature,
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
        train_tokens=chains_seen,
        heldout=heldout,
        seed=cfg.seed,
    )
