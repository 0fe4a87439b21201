"""Drafts are drawn from exactly the q handed to the verifier (plugin/patches/draft_sampling.py).

Rejection sampling is exact only if every draft x ~ q for the very q the verifier receives.
``request_distribution_sample`` returns (ids, q) and draws ids by a float64 inverse CDF
(``kernels.inverse_cdf.sample_float64_cdf``); vLLM's float32 exponential race (its default,
``use_fp64_gumbel=False``) cannot draw tokens below a few 1e-9 of a row's maximum.

- deterministic: every token owns the slice of [0, 1) of length q(t) (checked at the slice's
  midpoint, including a 1e-12 token), zero-probability tokens own none, extreme u are safe;
- statistical: a chi-square test of the draws against the returned q, with top-k, top-p and
  temperature, its power stated, and a negative control (the draws against the q vLLM would
  hand over when it ignores top-k / top-p) that must fail;
- seeds: a seeded request's draft depends on its seed only.
"""

from __future__ import annotations

import types
from fractions import Fraction

import pytest
import torch
from bebop_vllm.kernels.goodness_of_fit import chi_square_test, power_at
from bebop_vllm.kernels.inverse_cdf import sample_float64_cdf

from bebop_vllm.plugin.patches.draft_sampling import request_distribution_sample

ALPHA = 1e-3


def _meta(temperature, top_k=None, top_p=None, generators=None):
    return types.SimpleNamespace(temperature=temperature, top_k=top_k, top_p=top_p,
                                 generators=generators or {}, all_greedy=False, all_random=False)


def _slices(probs: list[float]) -> list[tuple[float, float]]:
    """[lo, hi) slice of [0, 1) owned by each token, from an exact rational running sum."""
    exact = [Fraction(p) for p in probs]
    total = sum(exact)
    out, acc = [], Fraction(0)
    for p in exact:
        out.append((float(acc / total), float((acc + p) / total)))
        acc += p
    return out


@pytest.mark.parametrize("vocab", [5, 1000, 4099])
def test_every_token_owns_its_slice(vocab: int) -> None:
    """Midpoint of each token's exact slice -> that token; zero-probability tokens never.

    A token of probability 1e-12 (far below what float32 exponential noise can draw, about
    4e-9 of the row maximum) is included; 1e-30 as the first token (float64 resolves a slice
    relative to the mass before it, ~1e-16, so tiny tokens are exact where that mass is 0).
    """
    gen = torch.Generator().manual_seed(vocab)
    probs = torch.rand(vocab, generator=gen, dtype=torch.float64)
    probs[::7] = 0.0  # exact zeros (top-k / allowed-token masks)
    probs[0] = 1e-30
    probs[vocab // 2 + 1] = 1e-12
    probs = (probs / probs.sum()).float()
    slices = _slices(probs.double().tolist())
    tokens = [t for t in range(vocab) if probs[t] > 0]
    u = torch.tensor([(slices[t][0] + slices[t][1]) / 2 for t in tokens], dtype=torch.float64)
    drawn = sample_float64_cdf(probs.unsqueeze(0).expand(len(tokens), -1), u)
    assert drawn.tolist() == tokens


def test_zero_probability_tokens_and_extreme_uniforms() -> None:
    probs = torch.tensor([[0.0, 0.25, 0.0, 0.75, 0.0]] * 4)
    u = torch.tensor([0.0, 0.25, 0.2499999, 1 - 2**-53], dtype=torch.float64)
    assert sample_float64_cdf(probs, u).tolist() == [1, 3, 1, 3]
    assert sample_float64_cdf(probs[:0], u[:0]).shape == (0,)


N_DRAWS = 30_000
TV_DETECTABLE = 0.025


def test_draft_test_has_power() -> None:
    """n = 30,000 draws, <= 12 categories, ALPHA = 1e-3: power >= 0.99 against TV 0.025."""
    assert power_at(N_DRAWS, TV_DETECTABLE, 11, ALPHA) >= 0.99


def _case():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(12, generator=gen) * 1.5
    meta = _meta(torch.full((N_DRAWS,), 0.8), top_k=torch.full((N_DRAWS,), 9), top_p=torch.full((N_DRAWS,), 0.9))
    return logits, meta


def test_drafts_follow_the_returned_q() -> None:
    logits, meta = _case()
    torch.manual_seed(0)
    ids, probs = request_distribution_sample(logits.repeat(N_DRAWS, 1), meta)
    assert torch.equal(probs, probs[:1].expand_as(probs))  # one q for every row
    assert int((probs[0] == 0).sum()) >= 3  # top-k / top-p really cut the support
    result = chi_square_test(ids, probs[0])  # also fails on any draw of a q = 0 token
    assert result.p_value > ALPHA, result


def test_negative_control_q_without_top_k_top_p_is_detected() -> None:
    """The same draws against softmax(logits / T) (top-k / top-p ignored, as vLLM's own draft
    q is) must be rejected: the q handed over has to be the one sampled."""
    logits, meta = _case()
    torch.manual_seed(0)
    ids, probs = request_distribution_sample(logits.repeat(N_DRAWS, 1), meta)
    unfiltered = torch.softmax(logits / 0.8, -1)
    assert 0.5 * float((unfiltered - probs[0]).abs().sum()) > 2 * TV_DETECTABLE
    counts = torch.bincount(ids, minlength=12).double()
    expected = unfiltered.double() * N_DRAWS
    statistic = float(((counts - expected) ** 2 / expected).sum())
    from scipy.stats import chi2

    assert chi2.sf(statistic, 11) < ALPHA


def test_greedy_rows_take_the_argmax() -> None:
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(1))
    ids, _ = request_distribution_sample(logits, _meta(torch.tensor([0.0, 1.0, 0.0, 1.0])))
    assert ids[0] == logits[0].argmax() and ids[2] == logits[2].argmax()


def test_seeded_draft_depends_on_its_seed_only() -> None:
    vocab = 500
    gen = torch.Generator().manual_seed(2)
    mine = torch.randn(vocab, generator=gen)
    draws = []
    for others in (1, 5, 9):
        logits = torch.cat([torch.randn(others, vocab, generator=gen), mine.unsqueeze(0)])
        meta = _meta(torch.ones(others + 1), generators={others: torch.Generator().manual_seed(77)})
        draws.append(int(request_distribution_sample(logits, meta)[0][others]))
    assert draws[0] == draws[1] == draws[2]
    # Unseeded rows with the same q do vary (so the equality above is not vacuous).
    flat = torch.zeros(64, vocab)
    ids, _ = request_distribution_sample(flat, _meta(torch.ones(64)))
    assert len(set(ids.tolist())) > 10


def test_patch_draws_by_the_float64_cdf() -> None:
    """The patch's draft for a seeded row is sample_float64_cdf at that generator's uniform:
    the exact sampler above is the one drafting uses (not an exponential race)."""
    vocab = 2000
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(4)) * 3
    seeds = {0: 11, 2: 12}
    meta = _meta(torch.tensor([0.7, 1.0, 1.2]), generators={i: torch.Generator().manual_seed(s)
                                                           for i, s in seeds.items()})
    ids, probs = request_distribution_sample(logits, meta)
    for i, seed in seeds.items():
        u = torch.empty(1, dtype=torch.float64).uniform_(generator=torch.Generator().manual_seed(seed))
        assert int(ids[i]) == int(sample_float64_cdf(probs[i : i + 1], u)[0])


def _on_draft_vocab(logits: torch.Tensor, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``logits [R, S]`` spread over sorted random columns of a ``vocab``-wide row, -inf elsewhere
    (what the drafter's compute_logits returns with a draft vocabulary) -> (full logits, support)."""
    support = torch.randperm(vocab, generator=torch.Generator().manual_seed(seed))[: logits.shape[1]].sort().values
    full = torch.full((logits.shape[0], vocab), float("-inf"))
    full[:, support] = logits
    return full, support


@pytest.mark.parametrize("top_k", [None, 5, 3000])  # 3000 = V: a row without top-k
@pytest.mark.parametrize("top_p", [None, 0.9])
def test_draft_vocabulary_support_gives_the_full_vocabulary_draw(top_k, top_p) -> None:
    """Sampling on the draft vocabulary's columns only (support=) returns the same q, scattered
    back to the full width, and the same token for the same seed, as sampling the full row;
    top-k larger than the draft vocabulary (k = V: a row without top-k) keeps it whole."""
    rows, vocab, size = 6, 3000, 700
    sub = torch.randn(rows, size, generator=torch.Generator().manual_seed(5)) * 2
    full, support = _on_draft_vocab(sub, vocab, seed=6)
    temperature = torch.tensor([1.0, 0.7, 0.0, 1.3, 1.0, 0.0])

    def meta():
        return _meta(temperature, top_k=None if top_k is None else torch.full((rows,), top_k),
                     top_p=None if top_p is None else torch.full((rows,), top_p),
                     generators={i: torch.Generator().manual_seed(100 + i) for i in range(rows)})

    ids_full, q_full = request_distribution_sample(full, meta())
    ids_sub, q_sub = request_distribution_sample(full, meta(), support=support)
    assert q_sub.shape == (rows, vocab)
    assert torch.equal(ids_sub, ids_full)
    torch.testing.assert_close(q_sub, q_full, rtol=1e-6, atol=1e-9)
    outside = torch.ones(vocab, dtype=torch.bool)
    outside[support] = False
    assert int((q_sub[:, outside] != 0).sum()) == 0
    assert set(ids_sub.tolist()) <= set(support.tolist())


def test_drafts_on_a_draft_vocabulary_follow_the_returned_q() -> None:
    """The chi-square test above, with the 12 logits spread over a 40-token vocabulary and
    sampled through support=: the draws follow the full-width q returned (a draw outside the
    support, where q = 0, fails the test outright)."""
    logits, meta = _case()
    full, support = _on_draft_vocab(logits.unsqueeze(0), 40, seed=7)
    torch.manual_seed(0)
    ids, probs = request_distribution_sample(full.repeat(N_DRAWS, 1), meta, support=support)
    assert torch.equal(probs, probs[:1].expand_as(probs))
    assert int((probs[0][support] == 0).sum()) >= 3  # top-k / top-p cut the draft vocabulary too
    result = chi_square_test(ids, probs[0])
    assert result.p_value > ALPHA, result
