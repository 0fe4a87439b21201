"""Slow, obviously-correct drafting that mirrors vLLM's EAGLE/MTP proposer step by step.

Used as ground truth: the trainer's teacher-forced ``unroll`` must agree with it, and the vLLM
integration must agree with it (parity tests).
"""

from __future__ import annotations

from pathlib import Path

import torch

from bebop_vllm.heads.checkpoint import load_heads
from bebop_vllm.heads.module import BebopMTPHead
from bebop_vllm.heads.target import head_features, load_target_model, target_states


@torch.no_grad()
def draft_chain_probs(
    head: BebopMTPHead,
    target_hidden: torch.Tensor,
    token_ids: list[int],
    draft_token_ids: list[int],
    temperature: float = 1.0,
) -> torch.Tensor:
    """Draft distributions of one chain, sequentially with a KV cache.

    ``token_ids`` = x_0..x_n: the committed tokens, where x_n is the token the target just
    sampled (its hidden state is not needed). ``target_hidden`` [>= n, H]: the target's final
    (post-norm) hidden states h_0..h_{n-1} (an aux head: its target features [>= n, (m + 1) H],
    ``BebopMTPHead.combine``). ``draft_token_ids`` = d_1..d_k, the drafted tokens
    fed back at depths 2..k+1. Returns q_1..q_{k+1} as [k + 1, V] float32 probabilities,
    softmax(logits / temperature) as vLLM's probabilistic drafter computes them.

    As in vLLM: one pass writes the entries (x_{p+1}, h_p) at positions p = 0..n-1 (the
    query at n-1 gives depth 1); depth j + 1 then runs (d_j, head.next_hidden(r_j)) at position n - 1 + j,
    attending to every cached entry at a position <= its own.
    """
    n = len(token_ids) - 1
    if n < 1:
        raise ValueError("token_ids needs at least two tokens (a prefix and the target's next token)")
    dtype = head.fc.weight.dtype
    cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    ids = torch.tensor(token_ids)
    r = head.step(ids[1 : n + 1], head.combine(target_hidden[:n].to(dtype)), torch.arange(n), cache)[-1:]
    probs = [torch.softmax(head.logits(r).float() / temperature, dim=-1)[0]]
    for j, d in enumerate(draft_token_ids, start=1):
        r = head.step(torch.tensor([d]), head.next_hidden(r), torch.tensor([n - 1 + j]), cache)
        probs.append(torch.softmax(head.logits(r).float() / temperature, dim=-1)[0])
    return torch.stack(probs)


@torch.no_grad()
def draft_reference(
    target_model_dir: str | Path,
    heads_dir: str | Path,
    token_ids: list[int],
    draft_token_ids: list[int],
    temperature: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Depth-1..k+1 draft probability rows [k + 1, V] for the chain after ``token_ids``.

    ``token_ids``: prompt (+ generated) tokens followed by the token the target sampled next
    (x_n); ``draft_token_ids``: the drafted tokens d_1..d_k. Loads target and head (slow);
    runs the target in ``dtype`` to get its post-norm final hidden states (and, for an aux
    head, the residual stream after its aux layers).
    """
    head = load_heads(heads_dir, target_model_dir, dtype=dtype)
    target = load_target_model(target_model_dir, dtype=dtype)
    hidden, aux = target_states(target, torch.tensor([token_ids[:-1]]), head.shape.aux_layer_ids)
    return draft_chain_probs(head, head_features(hidden, aux)[0], token_ids, draft_token_ids, temperature)
