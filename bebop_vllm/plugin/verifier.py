"""Bebop's verifier: vLLM's ``RejectionSampler`` with the accept/reject step done by our kernels.

Everything that defines the *target distribution* stays vLLM's own code, so the distribution we
verify against is, op for op, the one vLLM would sample from: the bonus token comes from vLLM's
``Sampler`` (all its logits processors), draft positions get vLLM's
``apply_logits_processors`` (penalties, bad words, allowed ids, min-tokens) and
``apply_sampling_constraints`` (temperature, top-k, top-p; its CPU expand bug is fixed by the
``cpu_expand_fix`` patch). Only the chain rejection sampling is ours
(``bebop_vllm.kernels.rejection_sample``), fed in the kernels' ragged row layout:

- draft rows: p = softmax(constrained target logits); greedy requests get p = one-hot(argmax)
  and q = one-hot(draft), which makes rejection sampling reproduce greedy verification exactly
  (accept iff draft == argmax, else emit argmax) without a second code path;
- bonus rows: one-hot at vLLM's sampled bonus token, so the bonus is exactly vLLM's.

Seeded requests are verified with their own ``torch.Generator`` (one kernel call each) so a
seeded request is reproducible whatever else is in the batch.

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
from vllm.v1.sample.rejection_sampler import PLACEHOLDER_TOKEN_ID, RejectionSampler


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
        assert metadata.max_spec_len <= vllm_rs.MAX_SPEC_LEN
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
        if not self.is_processed_logprobs_mode:
            target_logits = target_logits.clone()
        target_logits = self.apply_logits_processors(target_logits, sampling_metadata, metadata)
        target_logits = vllm_rs.apply_sampling_constraints(
            target_logits, metadata.cu_num_draft_tokens, sampling_metadata
        )

        output_token_ids = self._verify(metadata, draft_probs, target_logits, bonus_token_ids, sampling_metadata)

        logprobs_tensors = None
        if sampling_metadata.max_num_logprobs is not None:
            logprobs_tensors = self._get_logprobs_tensors(
                sampling_metadata.max_num_logprobs,
                metadata,
                logits,
                target_logits if self.is_processed_logprobs_mode else raw_target_logits,
                bonus_sampler_output.logprobs_tensors.logprobs,
                output_token_ids,
            )
        return SamplerOutput(sampled_token_ids=output_token_ids, logprobs_tensors=logprobs_tensors)

    def _verify(
        self,
        metadata: Any,
        draft_probs: torch.Tensor | None,
        target_logits: torch.Tensor,
        bonus_token_ids: torch.Tensor,
        sampling_metadata: Any,
    ) -> torch.Tensor:
        from bebop_vllm.kernels import entropy, rejection_sample

        num_draft = list(metadata.num_draft_tokens)
        batch = len(num_draft)
        num_tokens, vocab = target_logits.shape
        device = target_logits.device
        draft_ids = metadata.draft_token_ids.to(torch.int64)

        target_probs = target_logits.softmax(dim=-1, dtype=torch.float32)
        self.last_target_entropy = entropy(target_probs).to(torch.float32)

        greedy_tokens = self._greedy_token_mask(sampling_metadata, num_draft, device)
        if greedy_tokens is not None:
            # Greedy rows: p = one-hot(argmax), q = one-hot(draft) -> accept iff equal, else argmax.
            argmax_rows = torch.zeros_like(target_probs).scatter_(1, target_logits.argmax(-1, keepdim=True), 1.0)
            target_probs = torch.where(greedy_tokens.unsqueeze(1), argmax_rows, target_probs)
            if draft_probs is not None:
                one_hot_draft = torch.zeros_like(draft_probs).scatter_(1, draft_ids.unsqueeze(1), 1.0)
                draft_probs = torch.where(greedy_tokens.unsqueeze(1), one_hot_draft, draft_probs.float())
        if draft_probs is not None:
            draft_probs = draft_probs.to(torch.float32).contiguous()

        # Kernel layout: per request, its draft rows then its bonus row (vLLM's logits layout).
        rows = torch.zeros(num_tokens + batch, vocab, dtype=torch.float32, device=device)
        rows[metadata.target_logits_indices] = target_probs
        rows[metadata.bonus_logits_indices] = 0.0
        rows[metadata.bonus_logits_indices, bonus_token_ids.view(-1).to(torch.int64)] = 1.0

        generators: dict[int, torch.Generator] = sampling_metadata.generators
        max_spec_len = metadata.max_spec_len
        if not generators:
            out, _ = rejection_sample(rows, draft_ids, num_draft, draft_probs, validate=False)
            return self._pad(out, batch, max_spec_len)

        # Seeded requests draw their uniforms from their own generator; the rest share one call.
        output = torch.full((batch, max_spec_len + 1), PLACEHOLDER_TOKEN_ID, dtype=torch.int32, device=device)
        cu = [0]
        for k in num_draft:
            cu.append(cu[-1] + k)
        groups: list[tuple[list[int], torch.Generator | None]] = [([i], g) for i, g in sorted(generators.items())]
        rest = [i for i in range(batch) if i not in generators]
        if rest:
            groups.append((rest, None))
        for reqs, gen in groups:
            draft_idx = [t for i in reqs for t in range(cu[i], cu[i + 1])]
            row_idx = [r for i in reqs for r in range(cu[i] + i, cu[i + 1] + i + 1)]
            sub_draft_idx = torch.tensor(draft_idx, dtype=torch.int64, device=device)
            sub, _ = rejection_sample(
                rows[torch.tensor(row_idx, dtype=torch.int64, device=device)],
                draft_ids[sub_draft_idx],
                [num_draft[i] for i in reqs],
                None if draft_probs is None else draft_probs[sub_draft_idx],
                generator=gen,
                validate=False,
            )
            width = min(sub.shape[1], max_spec_len + 1)
            output[torch.tensor(reqs, device=device), :width] = sub[:, :width].to(torch.int32)
        return output

    @staticmethod
    def _greedy_token_mask(sampling_metadata: Any, num_draft: list[int], device: torch.device) -> torch.Tensor | None:
        """[num_tokens] bool: draft positions of greedy requests (None when there are none)."""
        if sampling_metadata.all_random:
            return None
        counts = torch.tensor(num_draft, dtype=torch.int64, device=device)
        total = int(sum(num_draft))
        if sampling_metadata.all_greedy:
            return torch.ones(total, dtype=torch.bool, device=device)
        is_greedy = sampling_metadata.temperature == vllm_rs.GREEDY_TEMPERATURE
        return is_greedy.repeat_interleave(counts, output_size=total)

    @staticmethod
    def _pad(out: torch.Tensor, batch: int, max_spec_len: int) -> torch.Tensor:
        """The kernel's [B, max k + 1] as vLLM's int32 [B, max_spec_len + 1], padded with -1."""
        out = out.to(torch.int32)
        if out.shape == (batch, max_spec_len + 1):
            return out
        full = torch.full((batch, max_spec_len + 1), PLACEHOLDER_TOKEN_ID, dtype=torch.int32, device=out.device)
        width = min(out.shape[1], max_spec_len + 1)
        full[:, :width] = out[:, :width]
        return full
