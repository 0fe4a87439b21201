"""Sampling from the target with transformers, keeping its final hidden states on the way.

The CPU alternative to vLLM for ``bebop generate-data --engine hf``: sampling already runs the
target over every token, so the post-norm final hidden states the trainer needs come for free
(no second target pass to fill the hidden-state cache). Plain ancestral sampling at temperature
T from softmax(lm_head(h) / T): the same distribution vLLM samples with (no top-k/top-p).
"""

from __future__ import annotations

from typing import Any

import torch
from tqdm import tqdm


@torch.no_grad()
def sample_with_hidden(
    model: Any,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float,
    eos_ids: set[int],
    gen: torch.Generator,
) -> list[tuple[list[int], torch.Tensor]]:
    """For each prompt: (completion tokens, hidden states [len(prompt) + len(completion), H]).

    Prompts are left-padded into one batch with a KV cache. A completion stops after an EOS
    token; its last token is dropped if the target never ran on it (no hidden state)."""
    from transformers import DynamicCache

    b = len(prompts)
    width = max(len(p) for p in prompts)
    ids = torch.zeros(b, width, dtype=torch.long)
    mask = torch.zeros(b, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    cache = DynamicCache()
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    h = model.model(
        input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True
    ).last_hidden_state
    hidden = [[h[i, width - len(p) :]] for i, p in enumerate(prompts)]
    tokens: list[list[int]] = [[] for _ in prompts]
    last = h[:, -1]
    finished = torch.zeros(b, dtype=torch.bool)
    lm_head = model.lm_head.weight
    for step in tqdm(range(max_new_tokens), desc=f"sampling {b} prompts", unit="step", leave=False):
        probs = torch.softmax((last.float() @ lm_head.float().T) / temperature, dim=-1)
        nxt = torch.multinomial(probs, 1, generator=gen)[:, 0]
        active = ~finished
        for i in torch.nonzero(active)[:, 0].tolist():
            tokens[i].append(int(nxt[i]))
            if int(nxt[i]) in eos_ids:
                finished[i] = True
        if step == max_new_tokens - 1:  # no forward on the final tokens: they get dropped
            break
        mask = torch.cat([mask, torch.ones(b, 1, dtype=torch.long)], dim=1)
        out = model.model(
            input_ids=nxt[:, None],
            attention_mask=mask,
            position_ids=mask.sum(-1, keepdim=True) - 1,
            past_key_values=cache,
            use_cache=True,
        )
        last = out.last_hidden_state[:, -1]
        for i in torch.nonzero(active)[:, 0].tolist():
            hidden[i].append(last[i : i + 1])
        if finished.all():
            break
    results = []
    for i, p in enumerate(prompts):
        hs = torch.cat(hidden[i], dim=0)
        completion = tokens[i][: hs.shape[0] - len(p)]
        results.append((completion, hs[: len(p) + len(completion)]))
    return results
