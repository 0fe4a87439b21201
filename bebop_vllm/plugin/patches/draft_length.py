"""Entropy-aware draft length (``draft_length="entropy"``): trim each request's next drafts.

Two hooks on the V1 runner (vLLM 0.32.0), both no-ops unless the engine's bebop options ask
for the entropy policy (``model_runner.install`` then sets :data:`POLICY_ATTR` on the runner):

1. ``GPUModelRunner._sample`` (gpu_model_runner.py:3437): after sampling, remember for every
   request the mean target entropy of this step — its decided draft positions (from the metrics
   hook, :mod:`.metrics`) and the position it just sampled from (its bonus row: the request's
   tempered distribution, softmax(logits / T), T = 1 for greedy requests; top-k/top-p are not
   replayed, this is a policy input, not a metric). Every step yields a value, also for a
   request that drafted nothing, so a request never gets stuck at zero drafts.
2. ``GPUModelRunner.take_draft_token_ids`` (gpu_model_runner.py:4627): cut each request's
   drafts to :func:`bebop_vllm.draft_length.choose_draft_length` of its last entropy. The
   scheduler then schedules (and the verifier checks) only those; vLLM handles ragged draft
   counts. This path exists only with synchronous scheduling (``EngineCore.post_step``), which
   the ``speculative_config`` patch selects for this policy.
"""

from __future__ import annotations

import functools
from typing import Any

from bebop_vllm.plugin.patches.base import Patch

# Runner attribute: (acceptance_fit, draft_token_cost, max_k) when the policy is on.
POLICY_ATTR = "_bebop_draft_policy"
# Runner attribute: {req_id: mean entropy (nats) of its last step}.
LAST_ENTROPY_ATTR = "_bebop_last_entropy"


def sampled_row_entropies(logits: Any, spec_decode_metadata: Any, sampling_metadata: Any) -> list[float]:
    """Entropy (nats) of softmax(logits / T) at each request's sampled position, request order."""
    import torch

    from bebop_vllm.kernels.prob_math import entropy
    from bebop_vllm.kernels.sampling_operator import effective_temperature

    rows = logits if spec_decode_metadata is None else logits[spec_decode_metadata.bonus_logits_indices]
    rows = rows.float()
    temperature = sampling_metadata.temperature
    if temperature is not None and not sampling_metadata.all_greedy:
        rows = rows / effective_temperature(temperature[: rows.shape[0]])[:, None]
    return entropy(torch.softmax(rows, dim=-1)).tolist()


def _wrap_sample(original: Any) -> Any:
    @functools.wraps(original)
    def _sample(self: Any, logits: Any, spec_decode_metadata: Any) -> Any:
        output = original(self, logits, spec_decode_metadata)
        if getattr(self, POLICY_ATTR, None) is None or logits is None:
            return output
        from bebop_vllm.plugin.patches.metrics import _STEP_ATTR

        decided = getattr(self, _STEP_ATTR, None) or {}
        sampled = sampled_row_entropies(logits, spec_decode_metadata, self.input_batch.sampling_metadata)
        last = self.__dict__.setdefault(LAST_ENTROPY_ATTR, {})
        for rid, h in zip(list(self.input_batch.req_ids), sampled, strict=False):  # one row per request
            values = [*decided.get(rid, []), h]
            last[rid] = sum(values) / len(values)
        return output

    return _sample


def _wrap_take(original: Any) -> Any:
    @functools.wraps(original)
    def take_draft_token_ids(self: Any) -> Any:
        result = original(self)
        policy = getattr(self, POLICY_ATTR, None)
        if policy is None or result is None:
            return result
        from bebop_vllm.draft_length import choose_draft_length

        fit, cost, max_k = policy
        last = self.__dict__.setdefault(LAST_ENTROPY_ATTR, {})
        trimmed = []
        for rid, drafts in zip(result.req_ids, result.draft_token_ids, strict=True):
            k = choose_draft_length(last.get(rid), fit, max_k, cost)
            trimmed.append(list(drafts)[:k])
        # forget finished requests (ids not in this batch)
        for rid in set(last) - set(result.req_ids):
            del last[rid]
        result.draft_token_ids = trimmed
        return result

    return take_draft_token_ids


SAMPLE = Patch(
    name="draft_length_sample",
    upstream="vllm/v1/worker/gpu_model_runner.py:3437 GPUModelRunner._sample (vLLM 0.32.0)",
    module="vllm.v1.worker.gpu_model_runner",
    owner="GPUModelRunner",
    attr="_sample",
    expected_params=("self", "logits", "spec_decode_metadata"),
    make_replacement=_wrap_sample,
)

TAKE = Patch(
    name="draft_length_take",
    upstream="vllm/v1/worker/gpu_model_runner.py:4627 GPUModelRunner.take_draft_token_ids (vLLM 0.32.0)",
    module="vllm.v1.worker.gpu_model_runner",
    owner="GPUModelRunner",
    attr="take_draft_token_ids",
    expected_params=("self",),
    make_replacement=_wrap_take,
)

DRAFT_LENGTH_PATCHES = [SAMPLE, TAKE]
