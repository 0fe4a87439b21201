"""The entropy-aware draft-length policy (pure math; the engine side is in test_exactness)."""

from __future__ import annotations

import itertools

import pytest

from bebop_vllm.draft_length import MAX_ALPHA, choose_draft_length, expected_tokens, predicted_alpha

FIT = (1.0, -0.25)  # alpha = 1 - H / 4


def test_expected_tokens_is_the_geometric_series():
    assert expected_tokens(0.5, 0) == 1.0
    assert expected_tokens(0.5, 3) == pytest.approx(1 + 0.5 + 0.25 + 0.125)
    assert expected_tokens(0.0, 5) == 1.0


def test_predicted_alpha_is_clipped():
    assert predicted_alpha(0.0, FIT) == MAX_ALPHA
    assert predicted_alpha(2.0, FIT) == pytest.approx(0.5)
    assert predicted_alpha(10.0, FIT) == 0.0


def test_no_entropy_yet_drafts_the_maximum():
    assert choose_draft_length(None, FIT, max_k=4, token_cost=5.0) == 4


@pytest.mark.parametrize("max_k, cost", list(itertools.product([1, 3, 5], [0.0, 0.05, 0.2, 1.0])))
def test_choice_maximises_tokens_per_cost_and_shrinks_with_entropy(max_k, cost):
    previous = max_k
    for h in [i * 0.1 for i in range(0, 60)]:
        k = choose_draft_length(h, FIT, max_k, cost)
        alpha = predicted_alpha(h, FIT)
        rates = [expected_tokens(alpha, j) / (1 + cost * j) for j in range(max_k + 1)]
        assert rates[k] == pytest.approx(max(rates))  # brute force agrees
        assert k <= previous  # more entropy never drafts more
        previous = k


def test_extremes():
    assert choose_draft_length(0.1, FIT, max_k=3, token_cost=0.1) == 3  # alpha ~0.98: draft all
    assert choose_draft_length(3.9, FIT, max_k=3, token_cost=0.1) == 0  # alpha ~0.03 < cost: none
    assert choose_draft_length(3.0, FIT, max_k=3, token_cost=0.1) == 1  # alpha 0.25: one draft
