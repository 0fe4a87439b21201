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
) -> SequenceSet:
    """Sample one continuation per prompt and temperature, ``chunk`` prompts per vLLM call; the
    split folder is rewritten after every chunk, so an interrupted run keeps what it finished
    and a rerun continues where it stopped. ``llm`` is a vLLM ``LLM`` (engine "vllm") or a
    transformers causal LM (engine "hf", which also fills the trainer's hidden-state cache)."""

    prompts = select_prompts(tokenizer, split, domains, limit_per_domain, max_prompt_tokens)
    if not prompts:
        raise BebopError(f"no {split} prompts left for domains {domains} with --max-prompt-tokens {max_prompt_tokens}")
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
            meta = old.meta
            sequences = [old.sequence(i).tolist() for i in range(len(old))]
            prompt_lens, temps = old.prompt_lens.tolist(), old.temperatures.tolist()
    done = {(it["id"], it.get("temperature", meta["temperatures"][0])) for it in meta["items"]}
    for temp in temperatures:
        todo = [(i, p) for i, p in enumerate(prompts) if (p[1], temp) not in done]
        for start in range(0, len(todo), chunk):
            part = todo[start : start + chunk]
            t0 = time.time()
            results = _sample_chunk(llm, engine, [p[2] for _, p in part], temp, max_new_tokens, seed + len(sequences))
            first_new = len(sequences)
            for (_, (domain, pid, ids)), (completion, finish) in zip(part, results, strict=True):
                sequences.append(ids + completion)
                prompt_lens.append(len(ids))
                temps.append(temp)
                meta["items"].append({"domain": domain, "id": pid, "temperature": temp, "finish_reason": finish})
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
                for k, (_, (_, hs)) in enumerate(zip(part, _LAST_HIDDEN, strict=True)):
                    cache.put(first_new + k, hs)
                cache.save()
            print(
                f"{split}: {len(seqs)}/{len(prompts) * len(temperatures)} sequences saved "
                f"({seqs.num_completion_tokens} completion tokens, {meta['generation_seconds']} s)",
                flush=True,
            )
    return load_split(out_dir, split)


_LAST_HIDDEN: list[Any] = []  # hidden states of the last hf chunk (engine "hf")


def _sample_chunk(
    llm: Any, engine: str, prompts: list[list[int]], temperature: float, max_new_tokens: int, seed: int
) -> list[tuple[list[int], str]]:
    """(completion tokens, finish reason) per prompt, with one vLLM call or one hf batch."""
    if engine == "vllm":
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        # one SamplingParams for the chunk: per-request seeds crash vLLM 0.32 on CPU
        # ("CPU Generator does not use offset", gpu_model_runner.py:3502); the engine seed
        # (LLM(seed=...)) makes a rerun with the same chunks reproducible instead.
        params = SamplingParams(temperature=temperature, max_tokens=max_new_tokens)
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
    res = sample_with_hidden(llm, prompts, max_new_tokens, temperature, eos, gen)
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
) -> dict[str, SequenceSet]:
    """Generate the held-out and train splits into ``out_dir`` (one vLLM engine for both)."""
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
        from vllm import LLM

        # a small token budget per step keeps vLLM's start-up profiling run short on CPU
        # (with the default budget it took ~400 s on 2 busy cores)
        llm = LLM(
            model=str(model_dir),
            dtype=dtype,
            max_model_len=max_len,
            seed=seed,
            enable_prefix_caching=False,
            max_num_batched_tokens=max(max_len, 1024),
            max_num_seqs=128,
        )
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
        )
    return out
