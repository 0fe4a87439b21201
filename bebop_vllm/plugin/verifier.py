"""Bebop's verifier: vLLM's ``RejectionSampler`` with the accept/reject step done by our kernels.

Everything that defines the *target distribution* stays vLLM's own code, so the distribution we
verify against is, op for op, the one vLLM would sample from: the bonus token comes from vLLM's
``Sampler`` (all its logits processors), draft positions get vLLM's
``apply_logits_processors`` (penalties, bad words, allowed ids, min-tokens) and
``apply_sampling_constraints`` (temperature, top-k, top-p; its CPU expand bug is fixed by the
``cpu_expand_fix`` patch). Only the chain rejection sampling is ours: the fused
``bebop_vllm.kernels.rejection_sample_from_logits`` (what ``benchmarks/bench_rejection.py``
times), fed exactly what vLLM's module-level ``rejection_sample`` is fed:

- the constrained target logits of the draft rows, ``[num_draft_tokens, V]`` (already divided
  by temperature, so the kernel is told T = 1 for random requests);
- greedy requests as a ``[B]`` mask (vLLM's rule: temperature exactly 0): they accept while
  draft == argmax, else emit the argmax;
- the bonus tokens vLLM's ``Sampler`` chose, as ``[B]`` ids, emitted when every draft is
  accepted (no bonus rows are built);
- draft ids < 0 (vLLM pads grammar-rejected drafts with -1) are rejected at their position.

The logits layout is whatever ``metadata`` says: rows are only ever picked with
``target_logits_indices`` / ``bonus_logits_indices``, as vLLM does. Inputs vLLM's contract does
not allow (a bonus-token count that is not the batch size, target rows that do not match the
drafts) raise a ``ValueError`` naming the mismatch instead of producing a token.

Random numbers: one draw for the batch; seeded requests redraw theirs from their own
``torch.Generator`` (``draw_uniforms_for_requests``), so a seeded request is reproducible
whatever else is in the batch.

After each call ``last_target_entropy`` holds float32 ``[num_draft_tokens]`` entropies (nats) of
the target distribution at every verified draft position, in vLLM's flattened draft order. For
random requests it is the distribution sampled from; for greedy requests (whose sampling
distribution is a point mass) it is the temperature-1 distribution after vLLM's processors.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from vllm.v1.outputs import SamplerOutput
from vllm.v1.sample import rejection_sampler as vllm_rs
from vllm.v1.sample.rejection_sampler import RejectionSampler


class BebopRejectionSampler(RejectionSampler):
    """Drop-in for vLLM's RejectionSampler (same constructor, same forward contract)."""

    def __init__(self, sampler: Any, spec_config: Any = None, device: torch.device | None = None) -> None:
        super().__init__(sampler, spec_config, device)
        if self.synthetic_mode:
            raise ValueError("bebop's verifier does not implement rejection_sample_method='synthetic'")
        self.last_target_entropy: torch.Tensor | None = None

    def forward(
        self,
        metadata: Any,
        draft_probs: torch.Tensor | None,
        logits: torch.Tensor,
        sampling_metadata: Any,
    ) -> SamplerOutput:
        # Mirrors RejectionSampler.forward (vllm/v1/sample/rejection_sampler.py:104, vLLM 0.32.0)
        # up to the call of its module-level rejection_sample, which _verify replaces.
        if metadata.max_spec_len > vllm_rs.MAX_SPEC_LEN:
            raise ValueError(f"max_spec_len {metadata.max_spec_len} exceeds vLLM's MAX_SPEC_LEN {vllm_rs.MAX_SPEC_LEN}")
        if metadata.max_spec_len == 0 and logits.shape[0] == len(metadata.num_draft_tokens):
            return self._sample_without_drafts(logits, sampling_metadata)
        bonus_logits = logits[metadata.bonus_logits_indices]
        bonus_sampler_output = self.sampler(
            logits=bonus_logits,
            sampling_metadata=replace(sampling_metadata, max_num_logprobs=-1),
            predict_bonus_token=True,
            logprobs_mode_override="processed_logits" if self.is_processed_logprobs_mode else "raw_logits",
        )
        bonus_token_ids = bonus_sampler_output.sampled_token_ids

        raw_target_logits = logits[metadata.target_logits_indices].to(torch.float32)
        target_logits = raw_target_logits
        want_logprobs = sampling_metadata.max_num_logprobs is not None
        if want_logprobs and not self.is_processed_logprobs_mode:
            # The processors below work in place; keep the raw rows for the logprobs. (vLLM
            # always clones; without logprobs the raw rows are never read again.)
            target_logits = target_logits.clone()
        target_logits = self.apply_logits_processors(target_logits, sampling_metadata, metadata)
        target_logits = vllm_rs.apply_sampling_constraints(
            target_logits, metadata.cu_num_draft_tokens, sampling_metadata
        )

        output_token_ids = self._verify(metadata, draft_probs, target_logits, bonus_token_ids, sampling_metadata)

        logprobs_tensors = None
        if want_logprobs:
            logprobs_tensors = self._get_logprobs_tensors(
                sampling_metadata.max_num_logprobs,
                metadata,
                logits,
                target_logits if self.is_processed_logprobs_mode else raw_target_logits,
                bonus_sampler_output.logprobs_tensors.logprobs,
                output_token_ids,
            )
        return SamplerOutput(sampled_token_ids=output_token_ids, logprobs_tensors=logprobs_tensors)

    def _sample_without_drafts(self, logits: torch.Tensor, sampling_metadata: Any) -> SamplerOutput:
        """A step in which no request has drafts (``draft_length="auto"`` in a crowded batch).

        ``logits [B, V]`` are then exactly the bonus rows, in request order (vLLM's layout:
        ``bonus_logits_indices = cu_num_draft_tokens + arange(B)``, here ``arange(B)``), and the
        step is plain decoding: vLLM's ``Sampler`` on them, as ``GPUModelRunner._sample`` calls it
        without speculation (its own logprobs), so the step costs what a plain step costs. The
        general path would copy the rows (``logits[bonus_logits_indices]``) and have the sampler
        keep a full-vocabulary float32 copy for logprobs of draft positions that do not exist.
        ``predict_bonus_token=True`` as in the general path (it only matters for penalties and
        bad words, which then see the request's spec tokens: none).
        """
        self.last_target_entropy = logits.new_empty(0, dtype=torch.float32)
        return self.sampler(logits=logits, sampling_metadata=sampling_metadata, predict_bonus_token=True)

    def _verify(
        self,
        metadata: Any,
        draft_probs: torch.Tensor | None,
        target_logits: torch.Tensor,
        bonus_token_ids: torch.Tensor,
        sampling_metadata: Any,
    ) -> torch.Tensor:
        """Accepted drafts + recovered / bonus token: int32 ``[B, max_spec_len + 1]``, -1 padded.

        ``target_logits [num_draft_tokens, V]`` float32 after vLLM's processors and sampling
        constraints; ``bonus_token_ids [B, 1]`` from vLLM's sampler; ``draft_probs
        [num_draft_tokens, V]`` or None (one-hot drafts).
        """
        from bebop_vllm.kernels import draw_uniforms_for_requests, rejection_sample_from_logits

        num_draft = list(metadata.num_draft_tokens)
        batch = len(num_draft)
        draft_ids = metadata.draft_token_ids
        check_contract(num_draft, draft_ids, draft_probs, target_logits, bonus_token_ids)
        device = target_logits.device

        greedy = greedy_temperature(sampling_metadata, batch, device)
        generators: dict[int, torch.Generator] = sampling_metadata.generators
        uniforms = None
        if generators and not sampling_metadata.all_greedy:
            # One draw for the batch, then each seeded request's own (vLLM's
            # generate_uniform_probs: k_i = 0 requests leave their generator alone).
            uniforms = draw_uniforms_for_requests(num_draft, device, generators, skip_requests_without_drafts=True)
        if draft_probs is not None:
            draft_probs = draft_probs.to(torch.float32).contiguous()
        result = rejection_sample_from_logits(
            target_logits,
            draft_ids.contiguous(),
            num_draft,
            greedy,
            draft_probs,
            max_num_draft_tokens=metadata.max_spec_len,
            all_random=bool(sampling_metadata.all_random),
            return_entropy=True,
            uniforms=uniforms,
            validate=False,
            bonus_token_ids=bonus_token_ids,
        )
        self.last_target_entropy = result.entropy
        return result.output_token_ids


def greedy_temperature(sampling_metadata: Any, batch: int, device: torch.device) -> torch.Tensor:
    """float32 ``[B]``: 0 for greedy requests, 1 for random ones (the temperature still to apply).

    vLLM's ``apply_sampling_constraints`` has already divided random rows by their temperature,
    so the kernel must not divide again; greedy is vLLM's verifier rule, temperature exactly 0
    (``GREEDY_TEMPERATURE``). ``temperature`` may be None only when ``all_greedy``.
    """
    if sampling_metadata.all_greedy:
        return torch.zeros(batch, dtype=torch.float32, device=device)
    if sampling_metadata.all_random:
        return torch.ones(batch, dtype=torch.float32, device=device)
    temperature = sampling_metadata.temperature
    if temperature is None:
        raise ValueError("sampling_metadata.temperature is None but the batch is not all greedy")
    return (temperature != vllm_rs.GREEDY_TEMPERATURE).to(torch.float32)


def check_contract(
    num_draft: list[int],
    draft_ids: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_logits: torch.Tensor,
    bonus_token_ids: torch.Tensor,
) -> None:
    """Shape checks of vLLM's RejectionSampler contract (host metadata only: no device sync).

    vLLM asserts some of these and silently reads out of bounds on others; here each one is a
    ValueError saying what did not match, so a bad layout can never turn into a wrong token.
    """
    batch, total = len(num_draft), sum(num_draft)
    if draft_ids.ndim != 1 or draft_ids.shape[0] != total:
        raise ValueError(
            f"metadata.draft_token_ids has shape {tuple(draft_ids.shape)} but num_draft_tokens sums to {total}"
        )
    if target_logits.ndim != 2 or target_logits.shape[0] != total:
        raise ValueError(
            f"metadata.target_logits_indices selects {target_logits.shape[0]} logits rows for {total} draft "
            "tokens: there must be one target row per draft token"
        )
    if bonus_token_ids.numel() != batch:
        raise ValueError(
            f"the bonus sampler returned {bonus_token_ids.numel()} tokens for {batch} requests: "
            "metadata.bonus_logits_indices must select one row per request (or the sampler must "
            "return one bonus token per request)"
        )
    if draft_probs is not None and tuple(draft_probs.shape) != (total, target_logits.shape[1]):
        raise ValueError(
            f"draft_probs has shape {tuple(draft_probs.shape)}, expected ({total}, {target_logits.shape[1]})"
        )
