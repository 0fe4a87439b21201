"""Drive vLLM 0.32's own ``RejectionSampler`` with our inputs (tests and benchmarks only).

Our inputs (logits ``[N, V]`` laid out per request as k_i draft rows then the bonus row,
draft ids ``[Nd]``, ``num_draft_tokens``, per-request temperature / top-k / top-p) map onto
vLLM's ``SpecDecodeMetadata`` + ``SamplingMetadata`` here. Importing vLLM is slow, so this
module imports it lazily and nothing on the production path imports this module.

vLLM 0.32 CPU bug (docs/design.md#the-cpu-temperature-bug): ``expand_batch_to_tokens`` returns uninitialised memory on
CPU, so vLLM's per-token temperature / top-k / top-p are garbage there.
``fixed_expand_batch_to_tokens`` is the ``repeat_interleave`` replacement; pass
``fix_cpu_expand=True`` to run vLLM's sampler with it (it affects vLLM's correctness, not
its speed).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

# The one repeat_interleave replacement, shared with the plugin's patch of the same bug.
from bebop_vllm.plugin.patches.cpu_expand_fix import expand_batch_to_tokens as fixed_expand_batch_to_tokens


@contextlib.contextmanager
def cpu_expand_fixed() -> Iterator[None]:
    """Temporarily replace vLLM's broken CPU ``expand_batch_to_tokens``."""
    from vllm.v1.sample import rejection_sampler

    original = rejection_sampler.expand_batch_to_tokens
    rejection_sampler.expand_batch_to_tokens = fixed_expand_batch_to_tokens
    try:
        yield
    finally:
        rejection_sampler.expand_batch_to_tokens = original


def make_spec_decode_metadata(
    draft_token_ids: torch.Tensor, num_draft_tokens: Sequence[int]
):
    """vLLM ``SpecDecodeMetadata`` for our row layout (draft rows, then bonus, per request)."""
    from vllm.v1.spec_decode.metadata import SpecDecodeMetadata

    device = draft_token_ids.device
    counts = torch.tensor(list(num_draft_tokens), dtype=torch.int32, device=device)
    cu_draft = torch.cumsum(counts, 0, dtype=torch.int32)
    cu_sampled = torch.cumsum(counts + 1, 0, dtype=torch.int32)
    total_rows = int(cu_sampled[-1]) if len(num_draft_tokens) else 0
    requests = torch.arange(len(num_draft_tokens), device=device)
    request_of_draft = requests.repeat_interleave(counts.long())
    draft_index = torch.arange(draft_token_ids.shape[0], device=device)
    return SpecDecodeMetadata(
        draft_token_ids=draft_token_ids.to(torch.int32).contiguous(),
        num_draft_tokens=list(num_draft_tokens),
        cu_num_draft_tokens=cu_draft,
        cu_num_sampled_tokens=cu_sampled,
        target_logits_indices=(draft_index + request_of_draft).to(torch.int32),
        bonus_logits_indices=(cu_sampled - 1).to(torch.int32),
        logits_indices=torch.arange(total_rows, dtype=torch.int32, device=device),
    )


def make_sampling_metadata(
    temperature: torch.Tensor,
    top_k: torch.Tensor | None = None,
    top_p: torch.Tensor | None = None,
    generators: dict[int, torch.Generator] | None = None,
):
    """vLLM ``SamplingMetadata`` with per-request temperature (0 = greedy), top-k, top-p only."""
    from vllm.v1.sample.logits_processor import LogitsProcessors
    from vllm.v1.sample.metadata import SamplingMetadata

    batch = temperature.shape[0]
    greedy = temperature < 1e-5
    empty = torch.zeros(batch, dtype=torch.float32, device=temperature.device)
    return SamplingMetadata(
        temperature=temperature.to(torch.float32),
        all_greedy=bool(greedy.all()),
        all_random=not bool(greedy.any()),
        top_p=top_p,
        top_k=top_k.to(torch.int32) if top_k is not None else None,
        generators=generators or {},
        max_num_logprobs=None,
        no_penalties=True,
        prompt_token_ids=None,
        frequency_penalties=empty,
        presence_penalties=empty,
        repetition_penalties=empty + 1,
        output_token_ids=[[] for _ in range(batch)],
        allowed_token_ids_mask=None,
        bad_words_token_ids={},
        logitsprocs=LogitsProcessors(),
    )


def make_vllm_rejection_sampler():
    """vLLM 0.32's ``RejectionSampler`` around a default ``Sampler`` (the runner's setup)."""
    from vllm.platforms import current_platform
    from vllm.v1.sample.rejection_sampler import RejectionSampler
    from vllm.v1.sample.sampler import Sampler

    if current_platform.is_cpu():
        # What vLLM's CPU worker does at start-up: load its C++ ops and route the sampler's
        # Triton kernels to their C++ fallbacks (Triton has no CPU backend).
        current_platform.import_kernels()
        current_platform.register_triton_kernel_overrides()
    return RejectionSampler(Sampler())


def vllm_rejection_sample(
    sampler,
    logits: torch.Tensor,
    draft_token_ids: torch.Tensor,
    num_draft_tokens: Sequence[int],
    temperature: torch.Tensor,
    draft_probs: torch.Tensor | None = None,
    top_k: torch.Tensor | None = None,
    top_p: torch.Tensor | None = None,
    spec_metadata=None,
    sampling_metadata=None,
) -> torch.Tensor:
    """Run ``sampler`` (from ``make_vllm_rejection_sampler``); returns int32 ``[B, max_k + 1]``.

    Pre-built metadata can be passed so benchmarks time only the sampler call.
    """
    if spec_metadata is None:
        spec_metadata = make_spec_decode_metadata(draft_token_ids, num_draft_tokens)
    if sampling_metadata is None:
        sampling_metadata = make_sampling_metadata(temperature, top_k, top_p)
    return sampler(spec_metadata, draft_probs, logits, sampling_metadata).sampled_token_ids
