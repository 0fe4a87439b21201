"""Deferred K = 0 drafter KV writes replay to the cache the eager passes would have left.

``PendingDraftKV`` holds the inputs of proposer passes that drafted nothing and hands them back
as one batch of rows to write. A cache written row by row, pass after pass (what the eager
passes do), must equal one batched write of what ``take`` returns: a slot written twice (a
rejected draft's position overwritten by the accepted token; a freed block reused by a new
request) keeps its last write, and padding rows (slot < 0) are never written. The bits of the
write itself, on a real engine, are checked in tests/test_draft_kv_only.py.
"""

from __future__ import annotations

import pytest
import torch

from bebop_vllm.plugin.deferred_kv import PendingDraftKV, last_write_per_slot

NUM_SLOTS = 64


def _last_write_reference(slots: list[int]) -> list[int]:
    """Plain Python: for each slot >= 0 the index of its last row, in row order."""
    last: dict[int, int] = {}
    for row, slot in enumerate(slots):
        if slot >= 0:
            last[slot] = row
    return sorted(last.values())


@pytest.mark.parametrize("seed", range(8))
def test_last_write_per_slot_matches_the_reference(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 200, (1,), generator=g))
    slots = torch.randint(-1, 40, (n,), generator=g)  # many repeats, some padding
    assert last_write_per_slot(slots).tolist() == _last_write_reference(slots.tolist())


def test_last_write_per_slot_without_repeats_keeps_every_row() -> None:
    slots = torch.tensor([5, 3, 9, 0])
    assert last_write_per_slot(slots).tolist() == [0, 1, 2, 3]
    assert last_write_per_slot(torch.tensor([-1, -1])).tolist() == []


def _random_pass(g: torch.Generator, step: int) -> tuple[torch.Tensor, ...]:
    t = int(torch.randint(1, 12, (1,), generator=g))
    ids = torch.randint(0, 1000, (t,), generator=g)
    positions = torch.arange(t) + step
    states = torch.randn(t, 6, generator=g)
    slots = torch.randint(-1, NUM_SLOTS // 2, (t,), generator=g)  # slots repeat across passes
    return ids, positions, states, slots


def _row_values(ids: torch.Tensor, positions: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """Stand-in for the KV a row writes: any function of the row's own inputs."""
    return states * 2 + ids[:, None].float() - positions[:, None].float()


def _write_rows(cache: torch.Tensor, rows: tuple[torch.Tensor, ...]) -> None:
    ids, positions, states, slots = rows
    keep = slots >= 0
    cache[slots[keep]] = _row_values(ids, positions, states)[keep]


@pytest.mark.parametrize("seed", range(6))
def test_one_batched_write_equals_the_passes_written_in_order(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    passes = [_random_pass(g, step) for step in range(int(torch.randint(2, 9, (1,), generator=g)))]
    eager = torch.zeros(NUM_SLOTS, 6)
    for p in passes:  # row by row, pass after pass: the last write of a slot wins
        ids, positions, states, slots = p
        for r in range(ids.shape[0]):
            if slots[r] >= 0:
                eager[slots[r]] = _row_values(ids[r : r + 1], positions[r : r + 1], states[r : r + 1])[0]
    pending = PendingDraftKV(max_tokens=10_000)
    for p in passes:
        pending.add(*p)
    assert pending.tokens == sum(p[0].shape[0] for p in passes)
    batched = torch.zeros(NUM_SLOTS, 6)
    taken = pending.take()
    assert taken is not None
    assert len(set(taken[3].tolist())) == taken[3].shape[0], "a slot appears twice in one batched write"
    _write_rows(batched, taken)
    assert torch.equal(batched, eager)
    assert pending.take() is None and pending.tokens == 0


def test_keeping_the_first_write_instead_would_be_noticed() -> None:
    """Negative control: a slot written in two passes with different values."""
    first = (torch.tensor([1]), torch.tensor([0]), torch.ones(1, 6), torch.tensor([3]))
    second = (torch.tensor([2]), torch.tensor([0]), torch.full((1, 6), 5.0), torch.tensor([3]))
    eager = torch.zeros(NUM_SLOTS, 6)
    _write_rows(eager, first)
    _write_rows(eager, second)
    wrong = torch.zeros(NUM_SLOTS, 6)
    _write_rows(wrong, second)
    _write_rows(wrong, first)
    assert not torch.equal(wrong, eager)
    pending = PendingDraftKV()
    pending.add(*first)
    pending.add(*second)
    batched = torch.zeros(NUM_SLOTS, 6)
    _write_rows(batched, pending.take())
    assert torch.equal(batched, eager)


def test_rows_are_copied_and_full_at_the_cap() -> None:
    pending = PendingDraftKV(max_tokens=4)
    ids, positions, states, slots = torch.arange(3), torch.arange(3), torch.zeros(3, 2), torch.arange(3)
    pending.add(ids, positions, states, slots)
    states.fill_(7.0)  # the runner reuses its buffers: what was held must not change
    assert not pending.full
    pending.add(torch.arange(1), torch.arange(1), torch.zeros(1, 2), torch.tensor([9]))
    assert pending.full
    taken = pending.take()
    assert taken is not None and torch.equal(taken[2], torch.zeros(4, 2))


def test_rows_that_do_not_line_up_are_refused() -> None:
    with pytest.raises(ValueError, match="one row per token"):
        PendingDraftKV().add(torch.arange(3), torch.arange(3), torch.zeros(2, 4), torch.arange(3))
