"""Sampling self-distillation data from the target with vLLM (``bebop generate-data``)."""

from __future__ import annotations

import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bebop_vllm.data import DOMAINS, load_prompts, render
from bebop_vllm.errors import BebopError
from bebop_vllm.train.dataset import SequenceSet


def select_prompts(
    tokenizer: Any, split: str, domains: list[str], limit_per_domain: int | None, max_prompt_tokens: int
) -> list[tuple[str, str, list[int]]]:
    """(domain, prompt id, prompt token ids) for a split; prompts longer than
    ``max_prompt_tokens`` are skipped (they dominate the target's cost at train time)."""
    out = []
    for d in domains:
        kept = 0
        for p in load_prompts([d], split):
            if limit_per_domain is not None and kept >= limit_per_domain:
                break
            ids = tokenizer(render(p, tokenizer), add_special_tokens=False).input_ids
            if len(ids) <= max_prompt_tokens:
                out.append((d, p.id, ids))
                kept += 1
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
) -> SequenceSet:
    """Sample one continuation per prompt and temperature; vLLM shows a progress bar."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = select_prompts(tokenizer, split, domains, limit_per_domain, max_prompt_tokens)
    if not prompts:
        raise BebopError(f"no {split} prompts left for domains {domains} with --max-prompt-tokens {max_prompt_tokens}")
    sequences, prompt_lens, temps, items = [], [], [], []
    t0 = time.time()
    for temp in temperatures:
        # a per-prompt seed makes each sample reproducible whatever the batch composition
        params = [
            SamplingParams(temperature=temp, max_tokens=max_new_tokens, seed=seed * 1_000_003 + i)
            for i in range(len(prompts))
        ]
        outs = llm.generate([TokensPrompt(prompt_token_ids=ids) for _, _, ids in prompts], params, use_tqdm=True)
        for (domain, pid, ids), o in zip(prompts, outs, strict=True):
            completion = list(o.outputs[0].token_ids)
            sequences.append(ids + completion)
            prompt_lens.append(len(ids))
            temps.append(temp)
            items.append({"domain": domain, "id": pid, "finish_reason": o.outputs[0].finish_reason})
    meta = {
        "split": split,
        "model": str(model_dir),
        "generator": "vllm",
        "domains": domains,
        "limit_per_domain": limit_per_domain,
        "max_prompt_tokens": max_prompt_tokens,
        "max_new_tokens": max_new_tokens,
        "temperatures": temperatures,
        "seed": seed,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "generation_seconds": round(time.time() - t0, 1),
        "items": items,
    }
    seqs = SequenceSet.from_lists(sequences, prompt_lens, temps, meta)
    meta["num_sequences"] = len(seqs)
    meta["num_prompt_tokens"] = seqs.num_prompt_tokens
    meta["num_completion_tokens"] = seqs.num_completion_tokens
    return seqs


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
) -> dict[str, SequenceSet]:
    """Generate the train and held-out splits into ``out_dir`` (one vLLM engine for both)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer
    from vllm import LLM

    if not (model_dir / "config.json").is_file():
        raise BebopError(f"target model folder {model_dir} has no config.json; run `bebop fetch-model` first")
    domains = list(domains or DOMAINS)
    temperatures = temperatures or [1.0]
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    llm = LLM(
        model=str(model_dir),
        dtype="bfloat16",
        max_model_len=max_prompt_tokens + max_new_tokens + 8,
        seed=seed,
        enable_prefix_caching=False,
    )
    out: dict[str, SequenceSet] = {}
    for split, limit in (("heldout", heldout_per_domain), ("train", train_per_domain)):
        seqs = generate_split(
            llm, tokenizer, split, domains, limit, max_prompt_tokens, max_new_tokens, temperatures, seed, model_dir
        )
        seqs.save(out_dir / split)
        print(
            f"{split}: {len(seqs)} sequences, {seqs.num_prompt_tokens} prompt + {seqs.num_completion_tokens} "
            f"completion tokens in {seqs.meta['generation_seconds']} s -> {out_dir / split}"
        )
        out[split] = seqs
    return out
