"""Sampling self-distillation data from the target with vLLM (``bebop generate-data``)."""

from __future__ import annotations

import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from bebop_vllm.data import DOMAINS, load_prompts, render
from bebop_vllm.errors import BebopError
from bebop_vllm.train.dataset import SequenceSet, load_split


def select_prompts(
    tokenizer: Any, split: str, domains: list[str], limit_per_domain: int | None, max_prompt_tokens: int
) -> list[tuple[str, str, list[int]]]:
    """(domain, prompt id, prompt token ids) for a split, domains interleaved (so that any prefix
    keeps the domain mix); prompts longer than ``max_prompt_tokens`` are skipped (they dominate
    the target's cost at train time)."""
    per_domain = []
    for d in domains:
        kept = []
        for p in load_prompts([d], split):
            if limit_per_domain is not None and len(kept) >= limit_per_domain:
                break
            ids = tokenizer(render(p, tokenizer), add_special_tokens=False).input_ids
            if len(ids) <= max_prompt_tokens:
                kept.append((d, p.id, ids))
        per_domain.append(kept)
    out = []
    for k in range(max((len(x) for x in per_domain), default=0)):
        out.extend(x[k] for x in per_domain if k < len(x))
    return out


def sample_plan(
    prompts: list[tuple[str, str, list[int]]], samples_per_prompt: dict[str, int], temperatures: list[float]
) -> list[tuple[int, int, float]]:
    """(prompt index, sample index, temperature) of every continuation to sample.

    Prompt i gets ``samples_per_prompt[domain]`` samples; sample s uses
    ``temperatures[(i + s) % len(temperatures)]``, so the list is a cycle that sets the mix
    (``[1.0, 1.0, 1.0, 0.7]`` = 75 % T = 1, 25 % T = 0.7, and one sample per listed temperature
    when a prompt has as many samples as the list has entries). Sample-major order: every
    prompt's first sample comes before any second sample, so a stopped run keeps the prompt
    and domain mix."""
    most = max((samples_per_prompt.get(d, 1) for d, _, _ in prompts), default=0)
    plan = []
    for s in range(most):
        for i, (domain, _, _) in enumerate(prompts):
            if s < samples_per_prompt.get(domain, 1):
                plan.append((i, s, temperatures[(i + s) % len(temperatures)]))
    return plan


def generate_split(
    llm: Any,
    tokenizer: Any,
    split: str,
    domains: list[str],
    limit_per_domain: int | None,
    max_prompt_tokens: int,
    max_new_tokens: int,
    temperatures: list[float],
    seed: int,
    model_dir: Path,
    out_dir: Path,
    chunk: int = 48,
    engine: str = "vllm",
    samples_per_prompt: dict[str, int] | None = None,
) -> SequenceSet:
    """Sample continuations per ``sample_plan``, ``chunk`` requests per vLLM call; the split
    folder is rewritten after every chunk, so an interrupted run keeps what it finished and a
    rerun continues where it stopped. ``llm`` is a vLLM ``LLM`` (engine "vllm") or a
    transformers causal LM (engine "hf", which also fills the trainer's hidden-state cache).
    ``samples_per_prompt``: per domain (default: one sample per listed temperature)."""

    prompts = select_prompts(tokenizer, split, domains, limit_per_domain, max_prompt_tokens)
    if not prompts:
        raise BebopError(f"no {split} prompts left for domains {domains} with --max-prompt-tokens {max_prompt_tokens}")
    samples = {d: len(temperatures) for d in domains} | dict(samples_per_prompt or {})
    folder = out_dir / split
    meta: dict[str, Any] = {
        "split": split,
        "model": str(model_dir),
        "generator": engine,
        "domains": domains,
        "limit_per_domain": limit_per_domain,
        "max_prompt_tokens": max_prompt_tokens,
        "max_new_tokens": max_new_tokens,
        "temperatures": temperatures,
        "samples_per_prompt": samples,
        "seed": seed,
        "generation_seconds": 0.0,
        "items": [],
    }
    sequences: list[list[int]] = []
    prompt_lens: list[int] = []
    temps: list[float] = []
    if (folder / "tokens.npy").is_file():  # continue an interrupted run with the same settings
        old = load_split(out_dir, split)
        same = {k: old.meta.get(k) for k in ("max_new_tokens", "seed", "model")}
        if same == {"max_new_tokens": max_new_tokens, "seed": seed, "model": str(model_dir)}:
            # the plan may have grown (more prompts or samples) or be a smaller rerun (an earlier
            # recipe's command in a grown folder): record what the split now holds, the larger of each
            def larger(a: int | None, b: int | None) -> int | None:
                return None if a is None or b is None else max(a, b)  # None: no limit

            old_samples = old.meta.get("samples_per_prompt") or {}
            meta = old.meta | {
                "samples_per_prompt": {d: max(samples.get(d, 0), old_samples.get(d, 0))
                                       for d in sorted(set(samples) | set(old_samples))},
                "temperatures": temperatures,
                "limit_per_domain": larger(limit_per_domain, old.meta.get("limit_per_domain")),
                "max_prompt_tokens": max(max_prompt_tokens, old.meta.get("max_prompt_tokens") or 0),
            }
            sequences = [old.sequence(i).tolist() for i in range(len(old))]
            prompt_lens, temps = old.prompt_lens.tolist(), old.temperatures.tolist()
    # what is done: (prompt id, sample index); items of older runs carry no sample index,
    # so their k-th item of a prompt counts as sample k
    done: set[tuple[str, int]] = set()
    seen: dict[str, int] = {}
    for it in meta["items"]:
        k = it.get("sample", seen.get(it["id"], 0))
        seen[it["id"]] = max(seen.get(it["id"], 0), k + 1)
        done.add((it["id"], k))
    todo = [(i, s, t) for i, s, t in sample_plan(prompts, samples, temperatures) if (prompts[i][1], s) not in done]
    total = len(done) + len(todo)
    for start in range(0, len(todo), chunk):
        part = todo[start : start + chunk]
        t0 = time.time()
        if callable(llm) and not hasattr(llm, "generate"):  # a factory: start the engine only when needed
            llm = llm()
        results = _sample_chunk(
            llm,
            engine,
            [prompts[i][2] for i, _, _ in part],
            [t for _, _, t in part],
            max_new_tokens,
            seed + len(sequences),
        )
        first_new = len(sequences)
        for (i, s, temp), (completion, finish) in zip(part, results, strict=True):
            domain, pid, ids = prompts[i]
            sequences.append(ids + completion)
            prompt_lens.append(len(ids))
            temps.append(temp)
            meta["items"].append(
                {"domain": domain, "id": pid, "sample": s, "temperature": temp, "finish_reason": finish}
            )
        meta["generation_seconds"] = round(meta["generation_seconds"] + time.time() - t0, 1)
        meta["created"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        seqs = SequenceSet.from_lists(sequences, prompt_lens, temps, meta)
        meta.update(
            num_sequences=len(seqs),
            num_prompt_tokens=seqs.num_prompt_tokens,
            num_completion_tokens=seqs.num_completion_tokens,
        )
        seqs.save(folder)
        if engine == "hf":  # the hidden states came with sampling: store them in the trainer's cache
            from bebop_vllm.train.target_cache import HiddenCache

            cache = HiddenCache(out_dir, split, seqs, model_dir)
            for k, hs in enumerate(_LAST_HIDDEN):
                cache.put(first_new + k, hs)
            cache.save()
        print(
            f"{split}: {len(seqs)}/{total} sequences saved ({seqs.num_completion_tokens} completion tokens, "
            f"{meta['generation_seconds']} s)",
            flush=True,
        )
    return load_split(out_dir, split)


_LAST_HIDDEN: list[Any] = []  # hidden states of the last hf chunk (engine "hf")


def _sample_chunk(
    llm: Any, engine: str, prompts: list[list[int]], temperatures: list[float], max_new_tokens: int, seed: int
) -> list[tuple[list[int], str]]:
    """(completion tokens, finish reason) per prompt (sampled at its own temperature), with one
    vLLM call or hf batches of one temperature each."""
    if engine == "vllm":
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        # no per-request seeds: they crash vLLM 0.32 on CPU ("CPU Generator does not use
        # offset", gpu_model_runner.py:3502); the engine seed (LLM(seed=...)) makes a rerun
        # with the same chunks reproducible instead.
        params = [SamplingParams(temperature=t, max_tokens=max_new_tokens) for t in temperatures]
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=True)
        return [(list(o.outputs[0].token_ids), str(o.outputs[0].finish_reason)) for o in outs]
    if engine == "prompts":  # no sampling: the prompt text itself, scored by the target at train time
        return [([], "prompt-only") for _ in prompts]
    from bebop_vllm.train.hf_sampler import sample_with_hidden

    eos = {
        int(x)
        for x in (
            [llm.config.eos_token_id] if isinstance(llm.config.eos_token_id, int) else (llm.config.eos_token_id or [])
        )
    }
    gen = torch.Generator().manual_seed(seed)
    res: list[Any] = [None] * len(prompts)
    for temp in sorted(set(temperatures)):
        idx = [k for k, t in enumerate(temperatures) if t == temp]
        got = sample_with_hidden(llm, [prompts[k] for k in idx], max_new_tokens, temp, eos, gen)
        for k, r in zip(idx, got, strict=True):
            res[k] = r
    _LAST_HIDDEN[:] = [hs for _, hs in res]
    return [(c, "stop" if c and c[-1] in eos else "length") for c, _ in res]


def generate_data(
    model_dir: Path,
    out_dir: Path,
    domains: list[str] | None = None,
    train_per_domain: int | None = 150,
    heldout_per_domain: int | None = 16,
    max_prompt_tokens: int = 512,
    max_new_tokens: int = 256,
    temperatures: list[float] | None = None,
    seed: int = 0,
    splits: tuple[str, ...] = ("heldout", "train"),
    chunk: int = 48,
    engine: str = "vllm",
    dtype: str = "bfloat16",
    samples_per_prompt: dict[str, int] | None = None,
    max_num_seqs: int = 128,
) -> dict[str, SequenceSet]:
    """Generate the held-out and train splits into ``out_dir`` (one vLLM engine for both).
    ``max_num_seqs`` requests run concurrently; the KV cache must hold them
    (``VLLM_CPU_KVCACHE_SPACE`` GiB; SmolLM2-135M needs ~23 KB per token in bf16)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    if not (model_dir / "config.json").is_file():
        raise BebopError(f"target model folder {model_dir} has no config.json; run `bebop fetch-model` first")
    domains = list(domains or DOMAINS)
    temperatures = temperatures or [1.0]
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    max_len = max_prompt_tokens + max_new_tokens + 8
    if engine == "vllm":
        engine_box: list[Any] = []

        def llm() -> Any:  # started on first use: a finished split (a resumed run) costs no engine start
            if not engine_box:
                from vllm import LLM

                # a small token budget per step keeps vLLM's start-up profiling run short on CPU
                # (with the default budget it took ~400 s on 2 busy cores)
                engine_box.append(
                    LLM(
                        model=str(model_dir),
                        dtype=dtype,
                        max_model_len=max_len,
                        seed=seed,
                        # several samples per prompt share their prompt's KV cache
                        enable_prefix_caching=True,
                        max_num_batched_tokens=max(max_len, 2048),
                        max_num_seqs=max_num_seqs,
                    )
                )
            return engine_box[0]

    elif engine == "prompts":
        llm = None
    elif engine == "hf":
        from bebop_vllm.heads.target import load_target_model

        llm = load_target_model(model_dir, torch.float32)
    else:
        raise BebopError(f"unknown engine {engine!r}; choose vllm, hf or prompts")
    out: dict[str, SequenceSet] = {}
    limits = {"heldout": heldout_per_domain, "train": train_per_domain}
    for split in splits:
        out[split] = generate_split(
            llm,
            tokenizer,
            split,
            domains,
            limits[split],
            max_prompt_tokens,
            max_new_tokens,
            temperatures,
            seed,
            model_dir,
            out_dir,
            chunk,
            engine,
            samples_per_prompt,
        )
    return out
