"""Teacher-forced acceptance of the heads on sampled sequences, in PyTorch (no vLLM).

For one sequence (prompt + a continuation the target sampled at temperature T) the frozen
target runs once (fp32: the post-norm hidden states h, and the residual stream after the
target layers that heads with aux layers read, whose depth-1 input is [aux, h] instead of h);
each head then drafts every chain of the continuation through the heads colleague's
training/reference path (:func:`bebop_vllm.train.chains.sequence_chains`, i.e.
``BebopMTPHead.unroll``, which the head tests prove equal to sequential KV-cached drafting).
Per chain and depth j:

- target p_j = softmax(lm_head(h) / T), the distribution the verifier samples from;
- probabilistic drafting, q_j = softmax(draft_logits / T): alpha_j = sum_v min(p_j, q_j);
- greedy drafting, draft = argmax q_j: alpha_j = p_j(argmax q_j) (<= max_v p_j);
- expected tokens per verify step E[tau] = 1 + sum_j prod_{i<=j} alpha_i (full chains);
- draft acceptance rate (vLLM's definition: accepted / drafted) = (E[tau] - 1) / g.

Teacher forcing feeds the sampled tokens to depth j > 1 (docs/design.md#the-math): exact when the draft
matches the target, an approximation otherwise; the engine runs cross-check it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from bebop_vllm.kernels import acceptance_rate, entropy, expected_accepted_length

from bebop_vllm.errors import BebopError
from bebop_vllm.heads.module import BebopMTPHead
from bebop_vllm.heads.target import head_features, target_states
from bebop_vllm.train.chains import sequence_chains

# Per-token entropy bins (nats) for the binned acceptance-vs-entropy curves.
ENTROPY_BIN_EDGES = np.round(np.arange(0.0, 8.01, 0.25), 2)


@dataclass
class SequenceInput:
    tokens: list[int]
    prompt_len: int
    temperature: float


def _bin_sums(h: torch.Tensor, values: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """Per entropy bin: count and sums of each value (tokens above the last edge go to the last bin)."""
    idx = np.clip(np.digitize(h.numpy(), ENTROPY_BIN_EDGES) - 1, 0, len(ENTROPY_BIN_EDGES) - 2)
    nb = len(ENTROPY_BIN_EDGES) - 1
    out = {"count": np.bincount(idx, minlength=nb).astype(float).tolist()}
    for k, v in values.items():
        out[k] = np.bincount(idx, weights=v.double().numpy(), minlength=nb).tolist()
    return out


def _mode_stats(alpha: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
    """Sums and counts (so requests can be pooled exactly) plus per-request means."""
    g = alpha.shape[1]
    a = torch.where(mask, alpha, 0.0).double()
    full = mask.all(1)
    tau = expected_accepted_length(alpha[full].double())
    # E[tau] had only the first k drafts been verified (k = 1..g): for draft-length choices
    tau_by_k = [float(expected_accepted_length(alpha[full, :k].double()).mean()) if full.any() else float("nan")
                for k in range(1, g + 1)]
    alpha_sum, alpha_cnt = a.sum(0), mask.sum(0).double()
    tau_mean = float(tau.mean()) if len(tau) else float("nan")
    return {
        "alpha_sum": alpha_sum.tolist(),
        "alpha_count": alpha_cnt.tolist(),
        "tau_sum": float(tau.sum()),
        "tau_count": int(full.sum()),
        "alpha": (alpha_sum / alpha_cnt.clamp_min(1)).tolist(),
        "tau": tau_mean,
        "acceptance": (tau_mean - 1) / g,
        "tau_by_k": tau_by_k,
    }


@torch.no_grad()
def head_stats(
    head: BebopMTPHead, seq: SequenceInput, hidden: torch.Tensor, num_depths: int,
    head_input: torch.Tensor | None = None,
) -> dict[str, Any] | None:
    """Teacher-forced statistics of one head on one sequence (None when it has no full chain).
    ``head_input``: what the head reads at depth 1 instead of ``hidden`` (an aux head's
    :func:`head_input_of`); the target's distributions come from ``hidden``."""
    tokens = torch.tensor(seq.tokens, dtype=torch.int64)
    if len(tokens) - seq.prompt_len < num_depths + 1:
        return None
    b = sequence_chains(head, tokens, hidden, seq.prompt_len, num_depths, seq.temperature, head_input=head_input)
    p = b.target_probs  # [N, g, V] fp32, tempered
    q = torch.softmax(b.draft_logits.float(), dim=-1)  # logits already divided by T
    alpha_prob = acceptance_rate(p, q)
    alpha_greedy = p.gather(-1, b.draft_logits.argmax(-1, keepdim=True)).squeeze(-1)
    h1 = entropy(p[:, 0])  # entropy of the distribution each chain's first draft is verified against
    pmax1 = p[:, 0].max(-1).values
    mask = b.mask
    return {
        "num_chains": int(mask.shape[0]),
        "entropy": float(h1.mean()),
        "entropy_by_depth": [float(entropy(p[:, j])[mask[:, j]].mean()) for j in range(num_depths)],
        "pmax": float(pmax1.mean()),
        "probabilistic": _mode_stats(alpha_prob, mask),
        "greedy": _mode_stats(alpha_greedy, mask),
        "bins": _bin_sums(h1, {"alpha_prob": alpha_prob[:, 0], "alpha_greedy": alpha_greedy[:, 0], "pmax": pmax1}),
    }


def aux_layers_of(heads: Iterable[BebopMTPHead]) -> tuple[int, ...]:
    """The union of the aux layer ids of ``heads``, ascending."""
    return tuple(sorted({i for h in heads for i in h.shape.aux_layer_ids}))


@torch.no_grad()
def target_hidden_and_aux(
    target: Any, tokens: list[int], aux_layer_ids: tuple[int, ...] = ()
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """One target pass over one sequence (fp32): the post-norm final hidden states [L, H] and the
    residual stream [L, H] after each layer of ``aux_layer_ids`` (vLLM's aux numbering), by id."""
    hidden, aux = target_states(target, torch.tensor([tokens]), aux_layer_ids)
    blocks = () if aux is None else aux[0].float().split(hidden.shape[-1], dim=-1)
    return hidden[0].float(), dict(zip(aux_layer_ids, blocks, strict=True))


def head_input_of(head: BebopMTPHead, hidden: torch.Tensor, aux: dict[int, torch.Tensor]) -> torch.Tensor | None:
    """What ``head`` reads at depth 1: None (``hidden`` itself) for a plain head, else
    ``[aux of its layers, hidden]`` (:func:`bebop_vllm.heads.target.head_features`)."""
    ids = head.shape.aux_layer_ids
    if not ids:
        return None
    missing = [i for i in ids if i not in aux]
    if missing:
        raise BebopError(f"the head reads the target's aux layers {list(ids)}; no residual stream was given for "
                         f"{missing} (pass sequence_stats the aux features of those layers, or no hidden states)")
    return head_features(hidden, torch.cat([aux[i] for i in ids], dim=-1))


@torch.no_grad()
def sequence_stats(
    target: Any, heads: dict[str, BebopMTPHead], seq: SequenceInput, num_depths: int,
    hidden: torch.Tensor | None = None, aux: dict[int, torch.Tensor] | None = None,
) -> dict[str, dict[str, Any]]:
    """Run the target once on ``seq`` (unless its ``hidden`` states are given, with ``aux``: the
    residual streams by layer id that heads with aux layers read) and every head in ``heads`` on
    its chains."""
    if hidden is None:
        hidden, aux = target_hidden_and_aux(target, seq.tokens, aux_layers_of(heads.values()))
    out = {}
    for name, head in heads.items():
        s = head_stats(head, seq, hidden, num_depths, head_input_of(head, hidden, aux or {}))
        if s is not None:
            out[name] = s
    return out
