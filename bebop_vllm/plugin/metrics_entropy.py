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
