"""Drafter KV-cache writes of K = 0 proposer passes, held until the drafter next reads its cache.

Under load ``draft_length="auto"`` drafts nothing in most steps, and each such step still runs
a proposer pass whose only job is to write the drafter's KV cache for the step's tokens
(llm_base_proposer.py:617, vLLM 0.32.0). On a 2-core CPU that pass plus the proposer's
bookkeeping costs ~2 ms of a ~35 ms step at 16 requests in flight: a fixed price paid while
speculation gives nothing. Nothing reads the drafter's cache until the next pass that drafts
(K > 0), so the draft_kv_only patch keeps the pass's inputs here instead, one entry per step,
and :meth:`BebopMTPModel.flush_deferred_kv` writes them all in one batched pass right before
the drafter next attends to its cache (and before a policy update changes the weights).

Replaying the writes in step order gives the cache the eager passes would have left:

- a slot written twice (a rejected draft token's position, later the accepted token's; a block
  freed by a finished request and handed to a new one) keeps its *last* write, as eagerly;
  :func:`last_write_per_slot` picks those rows, so one batched write never has two rows racing
  for a slot;
- padding rows (slot < 0) are dropped, as vLLM's cache-write kernels skip them.

A write that still came out different could only move acceptance, never exactness: the
verifier checks every draft against the target. tests/test_draft_kv_only.py checks the bits on
a real engine; tests/test_deferred_kv.py checks the replay order here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Flush once this many token rows are held: bounds the memory (aux heads hold (n + 1) * H
# values per row: ~4.6 KB for SmolLM2-135M with three aux layers, ~9 MB at the cap) and the
# size of the one batched write that a long crowded phase ends with.
DEFAULT_MAX_PENDING_TOKENS = 2048


def last_write_per_slot(slot_mapping: torch.Tensor) -> torch.Tensor:
    """Row indices that an in-order replay of ``slot_mapping`` leaves in the cache.

    slot_mapping: [N] int, cache slot of each row in write order (< 0: padding, not written).
    Returns: [M] int64 ascending, for each distinct slot >= 0 the index of its last row.
    """
    rows = (slot_mapping >= 0).nonzero().squeeze(1)
    slots = slot_mapping.index_select(0, rows)
    unique_slots, which = torch.unique(slots, return_inverse=True)
    if unique_slots.numel() == rows.numel():  # the common case: every slot written once
        return rows
    last = torch.full((unique_slots.numel(),), -1, dtype=torch.long, device=slot_mapping.device)
    last.scatter_reduce_(0, which, rows, reduce="amax")
    return last.sort().values


@dataclass
class PendingDraftKV:
    """Inputs of the K = 0 passes not yet written: one entry per deferred pass, in step order.

    Each entry: input_ids [T] (the drafter's: target tokens shifted by one, the sampled token
    last per request), positions [T], target_states [T, D] (what the proposer received: the
    captured target states before any aux combine), slot_mapping [T].
    """

    max_tokens: int = DEFAULT_MAX_PENDING_TOKENS
    entries: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    tokens: int = 0

    def add(self, input_ids: torch.Tensor, positions: torch.Tensor, target_states: torch.Tensor,
            slot_mapping: torch.Tensor) -> None:
        """Hold one pass's inputs (copied: the runner reuses its buffers every step)."""
        n = input_ids.shape[0]
        if not (positions.shape[0] == target_states.shape[0] == slot_mapping.shape[0] == n):
            raise ValueError(f"one row per token expected: input_ids {tuple(input_ids.shape)}, positions "
                             f"{tuple(positions.shape)}, target_states {tuple(target_states.shape)}, "
                             f"slot_mapping {tuple(slot_mapping.shape)}")
        self.entries.append((input_ids.clone(), positions.clone(), target_states.clone(), slot_mapping.clone()))
        self.tokens += n

    @property
    def full(self) -> bool:
        return self.tokens >= self.max_tokens

    def take(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The rows to write (last write per slot, in step order), and forget them; None if none."""
        if not self.entries:
            return None
        entries, self.entries, self.tokens = self.entries, [], 0
        if len(entries) == 1:
            ids, positions, states, slots = entries[0]
        else:
            ids, positions, states, slots = (torch.cat(parts) for parts in zip(*entries, strict=True))
        keep = last_write_per_slot(slots)
        if keep.numel() == slots.numel():
            return ids, positions, states, slots
        return ids[keep], positions[keep], states[keep], slots[keep]
