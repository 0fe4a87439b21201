"""Runner side of the entropy metric: the target entropy at each decided draft position.

Which positions: in one verify step of a request with k drafts of which a were accepted, the
verifier decided positions 0..min(a, k-1) — the accepted drafts plus the first rejected one
(where it resampled). Those are the positions whose acceptance the entropy explains; later
drafts were never looked at and the bonus token (all k accepted) is plain sampling, not
verification.

Source of the entropies (float32, nats, one per draft token in vLLM's flattened draft
order — request after request, ``num_draft_tokens[i]`` each):
1. ``rejection_sampler.last_target_entropy`` set by bebop's verifier after each call
   (bebop_vllm/plugin/verifier.py): the distribution it verified against;
2. otherwise (vLLM's own ``RejectionSampler``, used for comparison runs) we rebuild the
   verifier's distribution from the raw target logits with the operators vLLM's verifier
   applies (temperature, then top-k/top-p jointly via ``apply_top_k_top_p``); penalties,
   min-p and custom logits processors are not replayed in this fallback.
Greedy requests follow bebop's verifier convention: their sampling distribution is a point
mass, so we report the entropy of the temperature-1 distribution instead (what their
acceptance depends on).
"""

from __future__ import annotations

from typing import Any

import torch

from bebop_vllm.kernels.prob_math import entropy
from bebop_vllm.kernels.sampling_operator import effective_temperature

# vllm/v1/sample/rejection_sampler.py PLACEHOLDER_TOKEN_ID: padding of the verifier output.
PLACEHOLDER_TOKEN_ID = -1


def fallback_draft_entropy(logits: torch.Tensor, metadata: Any, sampling_metadata: Any) -> torch.Tensor:
    """``[num_draft_tokens]`` entropies of vLLM's verifier distribution, rebuilt from raw logits."""
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p

    target = logits[metadata.target_logits_indices].float()
    num_draft = metadata.num_draft_tokens
    if sampling_metadata.temperature is None or sampling_metadata.all_greedy:
        return entropy(torch.softmax(target, dim=-1))
    reps = torch.tensor(num_draft, dtype=torch.long, device=target.device)

    def per_token(values: torch.Tensor | None) -> torch.Tensor | None:
        # repeat_interleave, not vLLM's expand_batch_to_tokens (broken on CPU: docs/design.md#the-cpu-temperature-bug)
        return None if values is None else values[: len(num_draft)].repeat_interleave(reps, dim=0)

    temperature = effective_temperature(per_token(sampling_metadata.temperature))
    scaled = apply_top_k_top_p(target / temperature[:, None], per_token(sampling_metadata.top_k),
                               per_token(sampling_metadata.top_p))
    return entropy(torch.softmax(scaled, dim=-1))


def draft_entropy(rejection_sampler: Any, logits: torch.Tensor, metadata: Any,
                  sampling_metadata: Any) -> torch.Tensor:
    """Entropies ``[num_draft_tokens]`` of this step: the verifier's own, else the fallback."""
    num_tokens = int(metadata.target_logits_indices.shape[0])
    ours = getattr(rejection_sampler, "last_target_entropy", None)
    if isinstance(ours, torch.Tensor) and ours.shape == (num_tokens,):
        return ours
    return fallback_draft_entropy(logits, metadata, sampling_metadata)


def decided_position_entropies(entropies: torch.Tensor, num_draft_tokens: list[int],
                               sampled_token_ids: torch.Tensor,
                               req_ids: list[str]) -> dict[str, list[float]]:
    """Per request with drafts: the entropies of its decided draft positions this step.

    ``sampled_token_ids`` is the verifier output ``[B, max_spec_len + 1]`` padded with -1; a
    request that emitted e tokens accepted e - 1 drafts and decided min(e, k) positions.
    """
    emitted = (sampled_token_ids != PLACEHOLDER_TOKEN_ID).sum(dim=1).tolist()
    values = entropies.float().cpu().tolist()
    out: dict[str, list[float]] = {}
    start = 0
    for i, k in enumerate(num_draft_tokens):
        if k > 0 and i < len(req_ids):
            out[req_ids[i]] = values[start: start + min(emitted[i], k)]
        start += k
    return out


# At most this many sampled rows per step get an entropy for the draft-length policy (requests
# without drafts this step; the others have their decided draft positions). Chosen round-robin, so
# a crowded batch pays for at most this many [V] softmaxes per step.
POLICY_ENTROPY_ROWS = 16


def row_entropy(rows: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of softmax(rows) per row, as logsumexp - E_p[x] (no [N, V] log)."""
    x = rows.float()
    lse = torch.logsumexp(x, dim=-1)
    return lse - (torch.softmax(x, dim=-1) * x).sum(dim=-1)


def step_entropies(rejection_sampler: Any, logits: torch.Tensor, metadata: Any, sampling_metadata: Any,
                   sampled_token_ids: torch.Tensor, req_ids: list[str], want_metrics: bool, want_policy: bool,
                   cursor: int = 0) -> tuple[dict[str, list[float]], dict[str, float]]:
    """This step's entropies with ONE device-to-host transfer: (metrics, policy).

    metrics: :func:`decided_position_entropies` (requests with drafts). policy: per request, the
    mean entropy of its decided draft positions, or, for up to :data:`POLICY_ENTROPY_ROWS`
    requests without drafts (round-robin from ``cursor``), the entropy of softmax(logits / T) at
    the position it sampled (T = 1 for greedy requests; top-k/top-p not replayed: a policy input).
    """
    num_reqs = len(req_ids)
    num_draft = [0] * num_reqs if metadata is None else list(metadata.num_draft_tokens)
    parts: list[torch.Tensor] = []
    if metadata is not None and (want_metrics or want_policy):
        parts.append(draft_entropy(rejection_sampler, logits, metadata, sampling_metadata).float())
        parts.append((sampled_token_ids != PLACEHOLDER_TOKEN_ID).sum(dim=1).float())
    no_draft = [i for i in range(num_reqs) if num_draft[i] == 0] if want_policy else []
    if len(no_draft) > POLICY_ENTROPY_ROWS:
        start = cursor % len(no_draft)
        no_draft = (no_draft[start:] + no_draft[:start])[:POLICY_ENTROPY_ROWS]
    if no_draft:
        index = torch.tensor(no_draft, dtype=torch.long, device=logits.device)
        row_index = index if metadata is None else metadata.bonus_logits_indices[index]
        rows = logits[row_index].float()
        temperature = sampling_metadata.temperature
        if temperature is not None and not sampling_metadata.all_greedy:
            rows = rows / effective_temperature(temperature[index])[:, None]
        parts.append(row_entropy(rows))
    if not parts:
        return {}, {}
    values = torch.cat(parts).cpu().tolist()  # the one sync
    metrics: dict[str, list[float]] = {}
    policy: dict[str, float] = {}
    pos = 0
    if metadata is not None and (want_metrics or want_policy):
        total = sum(num_draft)
        drafts, emitted = values[:total], values[total: total + num_reqs]
        pos = total + num_reqs
        start = 0
        for i, k in enumerate(num_draft):
            if k > 0 and i < num_reqs:
                decided = drafts[start: start + min(int(emitted[i]), k)]
                if want_metrics:
                    metrics[req_ids[i]] = decided
                if want_policy and decided:
                    policy[req_ids[i]] = sum(decided) / len(decided)
            start += k
    for i, h in zip(no_draft, values[pos:], strict=True):
        policy[req_ids[i]] = h
    return metrics, policy
