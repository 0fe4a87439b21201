"""Deterministic behaviour of the rejection-sampling API: layout, edge cases, seeding, errors."""

from __future__ import annotations

import pytest
import torch
from bebop_vllm.kernels import (
    draw_uniforms,
    entropy,
    greedy_verify,
    rejection_sample,
    rejection_sample_from_logits,
)
from bebop_vllm.kernels.inverse_cdf import BLOCK_V, sample_inverse_cdf
from bebop_vllm.kernels.layout import build_layout
from bebop_vllm.kernels.sampling_operator import apply_top_k_top_p_reference


def _random_problem(ks: list[int], vocab: int, seed: int, sharp: float = 2.0):
    gen = torch.Generator().manual_seed(seed)
    rows, drafts = sum(ks) + len(ks), sum(ks)
    p = torch.softmax(torch.randn(rows, vocab, generator=gen) * sharp, dim=-1)
    q = torch.softmax(torch.randn(drafts, vocab, generator=gen) * sharp, dim=-1)
    x = torch.multinomial(q, 1, generator=gen).squeeze(1) if drafts else torch.empty(0, dtype=torch.long)
    return p, q, x


def test_layout_maps_ragged_requests() -> None:
    layout = build_layout([2, 0, 3], 5, torch.device("cpu"))
    assert layout.row_of_draft.tolist() == [0, 1, 4, 5, 6]
    assert layout.bonus_row.tolist() == [2, 3, 7]
    assert layout.position_of_draft.tolist() == [0, 1, 0, 1, 2]
    assert layout.request_of_row.tolist() == [0, 0, 0, 1, 2, 2, 2, 2]
    assert layout.max_num_draft_tokens == 3


def test_identical_draft_and_target_accept_everything() -> None:
    ks = [3, 1, 0, 4] * 50
    p, _, _ = _random_problem(ks, 40, seed=0)
    layout = build_layout(ks, sum(ks), torch.device("cpu"))
    q = p[layout.row_of_draft]
    x = torch.multinomial(q, 1, generator=torch.Generator().manual_seed(1)).squeeze(1)
    out, accepted = rejection_sample(p, x, ks, q, generator=torch.Generator().manual_seed(2))
    assert accepted.tolist() == ks
    assert out.dtype == torch.int32 and accepted.dtype == torch.int32
    assert out.shape == (len(ks), 5)
    for i, k in enumerate(ks):
        start = int(layout.draft_start[i])
        assert out[i, :k].tolist() == x[start:start + k].tolist()
        assert int(out[i, k]) >= 0
        assert (out[i, k + 1:] == -1).all()


def test_disjoint_supports_reject_everything_and_resample_target() -> None:
    vocab, n = 10, 2000
    p = torch.zeros(vocab)
    p[:5] = torch.tensor([0.1, 0.2, 0.3, 0.15, 0.25])
    q = torch.zeros(vocab)
    q[5:] = 0.2
    x = torch.multinomial(q, n, replacement=True, generator=torch.Generator().manual_seed(3))
    out, accepted = rejection_sample(
        p.repeat(2 * n, 1), x, [1] * n, q.repeat(n, 1), generator=torch.Generator().manual_seed(4)
    )
    assert (accepted == 0).all()
    assert (out[:, 0] < 5).all() and (out[:, 1] == -1).all()
    # residual == p: with disjoint supports max(p - q, 0) = p exactly.
    freq = torch.bincount(out[:, 0].long(), minlength=vocab).float() / n
    assert (freq - p).abs().max() < 0.05


def test_same_generator_state_same_output() -> None:
    ks = [2, 0, 5, 1]
    p, q, x = _random_problem(ks, 300, seed=5)
    a = rejection_sample(p, x, ks, q, generator=torch.Generator().manual_seed(7))
    b = rejection_sample(p, x, ks, q, generator=torch.Generator().manual_seed(7))
    c = rejection_sample(p, x, ks, q, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    outputs = [rejection_sample(p, x, ks, q, generator=torch.Generator().manual_seed(s))[0] for s in range(8)]
    assert any(not torch.equal(o, c[0]) for o in outputs), "output ignores the generator"


def test_uniforms_fully_determine_the_output() -> None:
    ks = [3, 2]
    p, q, x = _random_problem(ks, 64, seed=9)
    u = draw_uniforms(sum(ks), len(ks), torch.device("cpu"), torch.Generator().manual_seed(1))
    a = rejection_sample(p, x, ks, q, uniforms=u)
    b = rejection_sample(p, x, ks, q, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a[0], b[0])


def test_all_zero_drafts_is_plain_sampling_from_bonus_rows() -> None:
    ks = [0, 0, 0]
    p, _, _ = _random_problem(ks, 20, seed=10)
    out, accepted = rejection_sample(p, torch.empty(0, dtype=torch.long), ks, None)
    assert out.shape == (3, 1) and (accepted == 0).all()
    assert (p[torch.arange(3), out[:, 0].long()] > 0).all()


def test_num_draft_tokens_tensor_equals_list() -> None:
    ks = [1, 4, 0, 2]
    p, q, x = _random_problem(ks, 50, seed=11)
    a = rejection_sample(p, x, ks, q, generator=torch.Generator().manual_seed(0))
    b = rejection_sample(p, x, torch.tensor(ks), q, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_greedy_verify_accepts_while_draft_is_argmax() -> None:
    logits = torch.tensor(
        [[0.0, 3.0, 1.0], [2.0, 0.0, 1.0], [0.0, 0.0, 5.0],  # request 0: k=2 + bonus
         [1.0, 0.0, 0.0],  # request 1: k=0
         [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]  # request 2: k=1
    )
    drafts = torch.tensor([1, 2, 0])
    out, accepted = greedy_verify(logits, drafts, [2, 0, 1])
    assert accepted.tolist() == [1, 0, 0]
    assert out.tolist() == [[1, 0, -1], [0, -1, -1], [1, -1, -1]]
    out_p, acc_p = greedy_verify(logits.softmax(-1), drafts, [2, 0, 1])
    assert torch.equal(out, out_p) and torch.equal(accepted, acc_p)


def test_greedy_verify_ties_take_first_index() -> None:
    logits = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0]])
    out, accepted = greedy_verify(logits, torch.tensor([1]), [1])
    assert accepted.tolist() == [0] and out.tolist() == [[0, -1]]


@pytest.mark.parametrize("vocab", [5, BLOCK_V, BLOCK_V + 3, 3 * BLOCK_V - 1])
def test_inverse_cdf_matches_cumsum_definition(vocab: int) -> None:
    gen = torch.Generator().manual_seed(vocab)
    weights = torch.rand(64, vocab, generator=gen)
    weights[weights < 0.3] = 0
    u = torch.rand(64, dtype=torch.float64, generator=gen)
    token = sample_inverse_cdf(weights, u)
    cdf = torch.cumsum(weights.double(), dim=-1)
    expected = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
    assert torch.equal(token, expected)
    assert (weights[torch.arange(64), token] > 0).all()


def test_inverse_cdf_extremes_never_pick_zero_weight() -> None:
    weights = torch.zeros(3, 2000)
    weights[:, 7] = 1.0
    weights[:, 1500] = 2.0
    u = torch.tensor([0.0, 1 - 2**-53, 0.5], dtype=torch.float64)
    assert sample_inverse_cdf(weights, u).tolist() == [7, 1500, 1500]


# ---------------------------------------------------------------------------- fused entry


def test_fused_entry_equals_probability_entry_on_processed_target() -> None:
    ks = [2, 0, 3]
    gen = torch.Generator().manual_seed(12)
    vocab = 100
    logits = torch.randn(sum(ks) + 3, vocab, generator=gen) * 3
    temperature = torch.tensor([0.8, 1.0, 1.5])
    top_k = torch.tensor([10, vocab, 50])
    top_p = torch.tensor([0.9, 0.7, 1.0])
    _, q, x = _random_problem(ks, vocab, seed=13)
    layout = build_layout(ks, sum(ks), torch.device("cpu"))
    processed = apply_top_k_top_p_reference(
        logits / temperature[layout.request_of_row].unsqueeze(-1),
        top_k[layout.request_of_row], top_p[layout.request_of_row],
    )
    probs = processed.softmax(-1)
    u = draw_uniforms(sum(ks), 3, torch.device("cpu"), torch.Generator().manual_seed(0))
    fused = rejection_sample_from_logits(
        logits, x, ks, temperature, q, top_k=top_k, top_p=top_p, uniforms=u, return_entropy=True
    )
    plain = rejection_sample(probs, x, ks, q, uniforms=u)
    assert torch.equal(fused.output_token_ids, plain[0])
    assert torch.equal(fused.num_accepted, plain[1])
    torch.testing.assert_close(fused.entropy, entropy(probs), atol=2e-5, rtol=1e-5)


def test_fused_entry_does_not_modify_logits_unless_allowed() -> None:
    ks = [2, 1]
    logits = torch.randn(5, 30)
    before = logits.clone()
    _, q, x = _random_problem(ks, 30, seed=14)
    kwargs = dict(top_k=torch.tensor([5, 30]), top_p=torch.tensor([0.9, 1.0]))
    rejection_sample_from_logits(logits, x, ks, torch.tensor([0.5, 2.0]), q, **kwargs)
    assert torch.equal(logits, before)
    rejection_sample_from_logits(logits, x, ks, torch.tensor([0.5, 2.0]), q, allow_inplace=True, **kwargs)
    assert not torch.equal(logits, before)


def test_fused_entry_greedy_requests_follow_argmax() -> None:
    ks = [3, 2, 0]
    logits = torch.randn(8, 20, generator=torch.Generator().manual_seed(15))
    argmax = logits.argmax(-1)
    layout = build_layout(ks, 5, torch.device("cpu"))
    drafts = argmax[layout.row_of_draft].clone()
    drafts[4] = (drafts[4] + 1) % 20  # request 1 rejects its second draft
    result = rejection_sample_from_logits(
        logits, drafts, ks, torch.zeros(3), None, generator=torch.Generator().manual_seed(0)
    )
    assert result.num_accepted.tolist() == [3, 1, 0]
    assert result.output_token_ids[0].tolist() == argmax[[0, 1, 2, 3]].tolist()
    assert result.output_token_ids[1, :2].tolist() == [int(argmax[4]), int(argmax[5])]
    assert int(result.output_token_ids[2, 0]) == int(argmax[7])


def test_fused_entry_bf16_logits() -> None:
    ks = [1, 2]
    logits = torch.randn(5, 64).to(torch.bfloat16)
    _, q, x = _random_problem(ks, 64, seed=16)
    u = draw_uniforms(3, 2, torch.device("cpu"), torch.Generator().manual_seed(0))
    a = rejection_sample_from_logits(logits, x, ks, torch.tensor([1.0, 0.5]), q, uniforms=u)
    b = rejection_sample_from_logits(logits.float(), x, ks, torch.tensor([1.0, 0.5]), q, uniforms=u)
    assert torch.equal(a.output_token_ids, b.output_token_ids)


# ------------------------------------------------------------------------------ bad input


def _valid():
    ks = [2, 1]
    p, q, x = _random_problem(ks, 16, seed=17)
    return p, x, ks, q


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda p, x, ks, q: (p[:-1], x, ks, q), "needs sum\\(k_i \\+ 1\\)"),
        (lambda p, x, ks, q: (p, x[:-1], ks, q), "draft_token_ids has 2 entries"),
        (lambda p, x, ks, q: (p, x, [2, 2], q), "num_draft_tokens \\[2, 2\\] needs"),
        (lambda p, x, ks, q: (p, x, [3, -1], q), "must be >= 0"),
        (lambda p, x, ks, q: (p * 1.1, x, ks, q), "target_probs row \\d+ sums to"),
        (lambda p, x, ks, q: (p.index_fill(1, torch.tensor([0]), float("nan")), x, ks, q), "NaN or inf"),
        (lambda p, x, ks, q: (p.index_fill(1, torch.tensor([0]), float("inf")), x, ks, q), "NaN or inf"),
        (lambda p, x, ks, q: (p - p.mean(), x, ks, q), "negative probabilities"),
        (lambda p, x, ks, q: (p, x.index_fill(0, torch.tensor([1]), 16), ks, q), "out of range \\[0, 16\\)"),
        (lambda p, x, ks, q: (p, x.float(), ks, q), "must be integers"),
        (lambda p, x, ks, q: (p, x, ks, q[:, :8]), "draft_probs must have shape"),
        (lambda p, x, ks, q: (p, x, ks, q * 2), "draft_probs row \\d+ sums to"),
        (lambda p, x, ks, q: (p, x, ks, torch.nn.functional.one_hot((x + 1) % 16, 16).float()), "draft probability 0"),
        (lambda p, x, ks, q: (p[0], x, ks, q), "must be 2-D"),
    ],
)
def test_bad_input_raises_clear_value_error(mutate, message: str) -> None:
    args = mutate(*_valid())
    with pytest.raises(ValueError, match=message):
        rejection_sample(*args)


def test_validation_can_be_switched_off() -> None:
    p, x, ks, q = _valid()
    rejection_sample(p * 1.0001, x, ks, q, validate=False)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(temperature=torch.tensor([1.0, -1.0])), "temperature must be finite and >= 0"),
        (dict(temperature=torch.tensor([1.0])), "temperature must have shape \\(2,\\)"),
        (dict(top_k=torch.tensor([0, 3])), "top_k must be in \\[1, 16\\]"),
        (dict(top_k=torch.tensor([17, 3])), "top_k must be in \\[1, 16\\]"),
        (dict(top_p=torch.tensor([0.0, 1.0])), "top_p must be in \\(0, 1\\]"),
        (dict(logits_fill=float("nan")), "NaN or \\+inf"),
        (dict(logits_fill=float("-inf")), "entirely -inf"),
    ],
)
def test_fused_entry_bad_input(kwargs: dict, message: str) -> None:
    p, x, ks, q = _valid()
    logits = torch.log(p)
    if "logits_fill" in kwargs:
        logits[1] = kwargs.pop("logits_fill")
    call = dict(temperature=torch.tensor([1.0, 0.5]), top_k=None, top_p=None)
    call.update(kwargs)
    with pytest.raises(ValueError, match=message):
        rejection_sample_from_logits(logits, x, ks, call.pop("temperature"), q, **call)


def test_seeded_requests_are_reproducible_whatever_the_batch() -> None:
    from bebop_vllm.kernels import draw_uniforms_for_requests

    ks_a, ks_b = [2, 3, 0], [4, 3, 1, 0]
    a = draw_uniforms_for_requests(ks_a, torch.device("cpu"), {1: torch.Generator().manual_seed(5)})
    b = draw_uniforms_for_requests(ks_b, torch.device("cpu"), {1: torch.Generator().manual_seed(5)})
    assert torch.equal(a.accept[2:5], b.accept[4:7])
    assert torch.equal(a.final[1:2], b.final[1:2])
    assert a.accept.dtype == torch.float64 and ((a.accept >= 0) & (a.accept < 1)).all()
    c = draw_uniforms_for_requests(ks_a, torch.device("cpu"), {2: torch.Generator().manual_seed(5)})
    assert c.final.shape == (3,)
