"""Invalid draft ids and given bonus tokens in the kernels: torch path, and Triton under its interpreter.

vLLM pads drafts that a grammar rejected with -1 and its verifier rejects them at their
position; an id is never used as an index unless it is in [0, V). Both backends must do that
(the Triton loads indexed by a draft id are masked), and with ``bonus_token_ids`` (target
rows = draft rows only, vLLM's ``target_logits``) both must emit the given token when every
draft is accepted. The Triton half re-runs this file in a subprocess with
``TRITON_INTERPRET=1`` (see tests/test_kernels_triton.py for why).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from bebop_vllm.kernels import draw_uniforms, greedy_verify, rejection_sample, rejection_sample_from_logits
from bebop_vllm.kernels.random_numbers import RejectionUniforms

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
BACKENDS = ["torch", "triton"] if INTERPRETED else ["torch"]


def test_triton_half_under_interpreter() -> None:
    if INTERPRETED:
        pytest.skip("this is the interpreter subprocess itself")
    import triton  # noqa: F401  (part of the cpu/gpu install: a missing Triton is a failure)

    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        env=env, capture_output=True, text=True, timeout=600,
    )
    report = result.stdout[-6000:] + result.stderr[-2000:]
    assert result.returncode == 0, report
    assert " passed" in result.stdout and " failed" not in result.stdout, report


def _problem(ks: list[int], vocab: int, seed: int, bonus_rows: bool = True):
    gen = torch.Generator().manual_seed(seed)
    nd = sum(ks)
    rows = nd + (len(ks) if bonus_rows else 0)
    logits = torch.randn(rows, vocab, generator=gen) * 2
    q = torch.softmax(torch.randn(nd, vocab, generator=gen) * 2, dim=-1)
    x = torch.multinomial(q, 1, generator=gen).squeeze(1) if nd else torch.empty(0, dtype=torch.long)
    u = draw_uniforms(nd, len(ks), torch.device("cpu"), gen)
    return logits, q, x, u


def _draft_rows(ks: list[int], bonus_rows: bool) -> list[int]:
    """Target row of every draft position."""
    rows, start = [], 0
    for i, k in enumerate(ks):
        rows += [start + j + (i if bonus_rows else 0) for j in range(k)]
        start += k
    return rows


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bonus_ids", [False, True], ids=["bonus-rows", "bonus-ids"])
@pytest.mark.parametrize("one_hot", [False, True], ids=["draft-probs", "one-hot"])
@pytest.mark.parametrize("position", [0, 1, 2])
def test_invalid_draft_rejected_at_every_position(position: int, one_hot: bool, bonus_ids: bool, backend: str) -> None:
    """Every valid draft certain to be accepted (p = q = point mass); one -1 at ``position``."""
    ks, vocab = [3, 1, 3], 40
    drafts = torch.tensor([5, 6, 7, 8, 9, 10, 11])
    bad_request, start = 2, 4
    drafts[start + position] = -1
    target = torch.full((7 + (0 if bonus_ids else 3), vocab), 0.0)
    rows = _draft_rows(ks, bonus_rows=not bonus_ids)
    for d, row in enumerate(rows):
        target[row, 5 + d] = 1.0  # the valid draft's token
    if not bonus_ids:
        target[[3, 5, 9], [30, 31, 32]] = 1.0  # bonus rows
    # The row reached at the -1 position: p = 1/2 on two tokens; after the rejection the
    # emitted token comes from there.
    bad_row = rows[start + position]
    target[bad_row] = 0.0
    target[bad_row, [20, 21]] = 0.5
    # Make a -1 read through as "previous row's last entry" look acceptable, to catch it.
    target[bad_row - 1, vocab - 1] += 1.0
    target = target / target.sum(-1, keepdim=True)
    q = None if one_hot else torch.nn.functional.one_hot(drafts.clamp(min=0), vocab).float()
    bonus = torch.tensor([30, 31, 32]) if bonus_ids else None
    u = RejectionUniforms(accept=torch.full((7,), 0.3, dtype=torch.float64),
                          final=torch.full((3,), 0.25, dtype=torch.float64))
    out, accepted = rejection_sample(target, drafts, ks, q, uniforms=u, validate=False, backend=backend,
                                     bonus_token_ids=bonus)
    assert accepted.tolist()[:2] == [3, 1]
    assert out[0].tolist() == [5, 6, 7, 30] and out[1].tolist()[:2] == [8, 31]
    assert int(accepted[bad_request]) == position
    assert out[bad_request, :position].tolist() == drafts[start:start + position].tolist()
    assert int(out[bad_request, position]) == 20  # u = 0.25 of (0.5, 0.5): the first token
    assert (out[bad_request, position + 1:] == -1).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bonus_ids", [False, True], ids=["bonus-rows", "bonus-ids"])
@pytest.mark.parametrize("masked", [False, True], ids=["temperature", "top-k-top-p"])
def test_fused_entry_invalid_and_out_of_range_drafts(masked: bool, bonus_ids: bool, backend: str) -> None:
    """Mixed greedy / random batch; ids -1 and V + 3 sprinkled in; ragged with an empty request."""
    ks, vocab = [3, 0, 4, 2, 1], 300
    logits, q, x, u = _problem(ks, vocab, seed=21, bonus_rows=not bonus_ids)
    x[[1, 4, 8]] = -1
    x[6] = vocab + 3
    batch = len(ks)
    temperature = torch.tensor([0.0, 0.9, 1.0, 0.0, 1.3])
    kwargs = {}
    if masked:
        kwargs = dict(top_k=torch.tensor([5, vocab, 40, 200, 17]), top_p=torch.tensor([0.9, 0.8, 1.0, 0.5, 0.95]))
    bonus = torch.arange(100, 100 + batch) if bonus_ids else None
    result = rejection_sample_from_logits(logits, x, ks, temperature, q, uniforms=u, return_entropy=True,
                                          backend=backend, validate=False, bonus_token_ids=bonus, **kwargs)
    reference = rejection_sample_from_logits(logits, x, ks, temperature, q, uniforms=u, return_entropy=True,
                                             backend="torch", validate=False, bonus_token_ids=bonus, **kwargs)
    assert torch.equal(result.output_token_ids, reference.output_token_ids)
    assert torch.equal(result.num_accepted, reference.num_accepted)
    # Requests 0 (-1 at position 1), 2 (V + 3 at 2, -1 at 3) stop at or before those positions.
    assert int(result.num_accepted[0]) <= 1 and int(result.num_accepted[2]) <= 2
    emitted = result.output_token_ids
    assert bool(((emitted == -1) | ((emitted >= 0) & (emitted < vocab + 100))).all())
    assert not bool((emitted == vocab + 3).any())


@pytest.mark.parametrize("backend", BACKENDS)
def test_bonus_ids_emitted_when_everything_is_accepted(backend: str) -> None:
    """p = q: every draft accepted, then the given bonus token; k = 0 requests emit it directly."""
    ks, vocab = [2, 0, 3], 64
    _, q, x, u = _problem(ks, vocab, seed=5, bonus_rows=False)
    bonus = torch.tensor([[7], [8], [9]])
    out, accepted = rejection_sample(q.clone(), x, ks, q, uniforms=u, backend=backend, bonus_token_ids=bonus)
    assert accepted.tolist() == ks
    assert out[:, 3].tolist() == [-1, -1, 9] and out[0, 2] == 7 and out[1, 0] == 8


def test_greedy_verify_with_bonus_ids_and_invalid_drafts() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 0.0], [0.0, 0.0, 2.0]])
    out, accepted = greedy_verify(logits, torch.tensor([1, -1, 2]), [2, 1], bonus_token_ids=torch.tensor([1, 0]))
    assert out.tolist() == [[1, 0, -1], [2, 0, -1]]
    assert accepted.tolist() == [1, 1]


def test_validation_accepts_negative_ids_and_checks_bonus_ids() -> None:
    ks, vocab = [2, 1], 16
    logits, q, x, _ = _problem(ks, vocab, seed=3, bonus_rows=False)
    p = logits.softmax(-1)
    x[0] = -1
    out, accepted = rejection_sample(p, x, ks, q, bonus_token_ids=torch.tensor([1, 2]),
                                     generator=torch.Generator().manual_seed(0))
    assert int(accepted[0]) == 0
    with pytest.raises(ValueError, match="needs sum\\(k_i\\) = 3"):
        rejection_sample(p[:2], x, ks, q, bonus_token_ids=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="bonus_token_ids must have shape \\(2,\\)"):
        rejection_sample(p, x, ks, q, bonus_token_ids=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="bonus token id 16 is out of range"):
        rejection_sample(p, x, ks, q, bonus_token_ids=torch.tensor([1, 16]))
    with pytest.raises(ValueError, match="draft token id 16 is out of range"):
        rejection_sample(p, x.index_fill(0, torch.tensor([1]), 16), ks, q, bonus_token_ids=torch.tensor([1, 2]))
