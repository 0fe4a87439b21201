"""Our target-distribution operator is vLLM 0.32's own, checked against vLLM's functions.

Draft-position rows: vLLM's ``apply_sampling_constraints`` (temperature with 0 -> 1, then
top-k / top-p); bonus rows: ``Sampler.apply_temperature`` then ``apply_top_k_top_p``; greedy
requests: vLLM's full ``RejectionSampler`` is deterministic for them, so outputs must match
exactly. Ties are provoked with integer-valued logits.
"""

from __future__ import annotations

# vLLM is part of every install (cpu / gpu extra): a broken install fails here, it is not skipped.
import pytest
import torch
from bebop_vllm.kernels import greedy_verify, rejection_sample_from_logits
from bebop_vllm.kernels.layout import build_layout
from bebop_vllm.kernels.sampling_operator import (
    apply_temperature,
    apply_top_k_top_p_reference,
    effective_temperature,
)
from bebop_vllm.kernels.vllm_baseline import (
    cpu_expand_fixed,
    make_sampling_metadata,
    make_spec_decode_metadata,
    make_vllm_rejection_sampler,
    vllm_rejection_sample,
)
from vllm.v1.sample import rejection_sampler as vllm_rs
from vllm.v1.sample.ops import topk_topp_sampler as vllm_topk
from vllm.v1.sample.sampler import Sampler


def _logits(rows: int, vocab: int, seed: int, ties: bool) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if ties:
        return torch.randint(-3, 4, (rows, vocab), generator=gen).float()
    return torch.randn(rows, vocab, generator=gen) * 3


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("mode", ["k", "p", "kp"])
def test_top_k_top_p_bitwise_equal_to_vllm(mode: str, ties: bool) -> None:
    rows, vocab = 12, 257
    logits = _logits(rows, vocab, seed=1, ties=ties)
    gen = torch.Generator().manual_seed(2)
    k = torch.randint(1, vocab + 1, (rows,), generator=gen)
    k[0] = vocab  # top-k off for this row
    p = torch.rand(rows, generator=gen) * 0.9 + 0.05
    p[1] = 1.0  # top-p off for this row
    k = k if "k" in mode else None
    p = p if "p" in mode else None
    ours = apply_top_k_top_p_reference(logits.clone(), k, p)
    sort_based = vllm_topk.apply_top_k_top_p_pytorch(logits.clone(), k, p, allow_cpu_sync=False)
    dispatched = vllm_topk.apply_top_k_top_p(logits.clone(), k, p)  # vLLM's CPU choice
    assert torch.equal(ours, sort_based)
    assert torch.equal(ours, dispatched)


@pytest.mark.parametrize("ties", [False, True])
def test_draft_rows_operator_equals_vllm_apply_sampling_constraints(ties: bool) -> None:
    ks = [2, 0, 3, 1]
    vocab = 300
    logits = _logits(sum(ks) + len(ks), vocab, seed=3, ties=ties)
    temperature = torch.tensor([0.0, 0.7, 1.3, 1.0])
    top_k = torch.tensor([20, vocab, 5, 100], dtype=torch.int32)
    top_p = torch.tensor([0.8, 0.6, 1.0, 0.95])
    layout = build_layout(ks, sum(ks), torch.device("cpu"))
    draft_rows = layout.row_of_draft
    meta = make_spec_decode_metadata(torch.zeros(sum(ks), dtype=torch.long), ks)
    with cpu_expand_fixed():
        theirs = vllm_rs.apply_sampling_constraints(
            logits[draft_rows].clone(), meta.cu_num_draft_tokens,
            make_sampling_metadata(temperature, top_k, top_p),
        )
    row_temp = effective_temperature(temperature)[layout.request_of_row]
    ours = apply_top_k_top_p_reference(
        apply_temperature(logits.clone(), row_temp),
        top_k[layout.request_of_row], top_p[layout.request_of_row],
    )[draft_rows]
    assert torch.equal(ours, theirs)


def test_bonus_rows_operator_equals_vllm_sampler() -> None:
    batch, vocab = 6, 300
    logits = _logits(batch, vocab, seed=4, ties=False)
    temperature = torch.tensor([0.0, 0.5, 1.0, 1.7, 0.0, 0.9])
    top_k = torch.tensor([10, 50, vocab, 3, 7, 200], dtype=torch.int32)
    top_p = torch.tensor([0.9, 0.7, 0.5, 1.0, 0.3, 0.99])
    theirs = vllm_topk.apply_top_k_top_p(
        Sampler.apply_temperature(logits.clone(), temperature, all_random=False), top_k, top_p
    )
    ours = apply_top_k_top_p_reference(
        apply_temperature(logits.clone(), effective_temperature(temperature)), top_k, top_p
    )
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("ties", [False, True])
def test_greedy_requests_match_vllm_rejection_sampler_exactly(ties: bool) -> None:
    """A mixed batch through vLLM's full RejectionSampler: greedy requests are deterministic."""
    ks = [3, 2, 0, 4, 1, 3]
    vocab = 64
    logits = _logits(sum(ks) + len(ks), vocab, seed=5, ties=ties)
    layout = build_layout(ks, sum(ks), torch.device("cpu"))
    argmax = logits.argmax(-1)
    drafts = argmax[layout.row_of_draft].clone()
    drafts[[1, 6, 9]] = (drafts[[1, 6, 9]] + 1) % vocab  # some greedy rejections
    temperature = torch.tensor([0.0, 0.8, 0.0, 0.0, 1.2, 0.0])
    top_k = torch.tensor([5, 10, vocab, 3, vocab, 2], dtype=torch.int32)
    top_p = torch.tensor([0.9, 1.0, 0.5, 0.7, 0.8, 0.2])
    sampler = make_vllm_rejection_sampler()
    with cpu_expand_fixed():
        theirs = vllm_rejection_sample(
            sampler, logits.clone(), drafts, ks, temperature, None, top_k, top_p
        )
    ours = rejection_sample_from_logits(
        logits, drafts, ks, temperature, None, top_k=top_k, top_p=top_p,
        generator=torch.Generator().manual_seed(0),
    )
    greedy = temperature == 0
    assert torch.equal(ours.output_token_ids[greedy], theirs[greedy])


def test_all_greedy_batch_matches_vllm_and_greedy_verify() -> None:
    ks = [2, 3, 0, 1]
    vocab = 50
    logits = _logits(sum(ks) + len(ks), vocab, seed=6, ties=True)
    layout = build_layout(ks, sum(ks), torch.device("cpu"))
    drafts = logits.argmax(-1)[layout.row_of_draft].clone()
    drafts[3] = (drafts[3] + 1) % vocab
    temperature = torch.zeros(len(ks))
    theirs = vllm_rejection_sample(make_vllm_rejection_sampler(), logits.clone(), drafts, ks, temperature)
    ours = rejection_sample_from_logits(logits, drafts, ks, temperature, None)
    assert torch.equal(ours.output_token_ids, theirs)
    assert torch.equal(greedy_verify(logits, drafts, ks)[0], theirs)
