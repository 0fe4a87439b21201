"""Index maps for the ragged, request-ordered rows that chain speculative sampling works on.

Request i owns k_i >= 0 draft positions. Target rows are laid out request by request: the
k_i draft-position rows, then the bonus row, so there are ``N = sum_i (k_i + 1)`` of them
(vLLM's ``[num_tokens + batch_size, V]`` logits layout). Draft tensors hold only the
``Nd = sum_i k_i`` draft positions in the same order.

Without bonus rows (``bonus_rows=False``: the caller already has each request's bonus token,
as vLLM's ``RejectionSampler`` does) the target rows are the draft rows only, ``N = Nd``, in
the same order as the draft tensors (vLLM's ``target_logits [num_tokens, V]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RaggedLayout:
    """Per-request and per-draft index tensors (all int64 on the target device).

    num_draft_tokens   [B]   k_i
    draft_start        [B]   index of request i's first draft position in ``[Nd]`` tensors
    row_start          [B]   index of request i's first target row in ``[N]`` tensors
    bonus_row          [B]   row_start + k_i
    request_of_draft   [Nd]  which request each draft position belongs to
    position_of_draft  [Nd]  0-based depth of each draft position inside its request
    row_of_draft       [Nd]  target row of each draft position
    request_of_row     [N]   which request each target row belongs to
    max_num_draft_tokens     max_i k_i (host int; sizes the output)
    has_bonus_rows           whether the target rows include a bonus row per request; when
                             False, ``bonus_row`` is one past the request's last row (no row)
    """

    num_draft_tokens: torch.Tensor
    draft_start: torch.Tensor
    row_start: torch.Tensor
    bonus_row: torch.Tensor
    request_of_draft: torch.Tensor
    position_of_draft: torch.Tensor
    row_of_draft: torch.Tensor
    request_of_row: torch.Tensor
    max_num_draft_tokens: int
    has_bonus_rows: bool = True

    @property
    def batch_size(self) -> int:
        return int(self.num_draft_tokens.shape[0])

    @property
    def total_draft_tokens(self) -> int:
        return int(self.request_of_draft.shape[0])

    @property
    def total_rows(self) -> int:
        return int(self.request_of_row.shape[0])


def as_count_tensor(num_draft_tokens: Sequence[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    """``num_draft_tokens`` as an int64 ``[B]`` tensor on ``device`` (no host sync for tensors)."""
    if isinstance(num_draft_tokens, torch.Tensor):
        return num_draft_tokens.to(device=device, dtype=torch.int64)
    return torch.tensor(list(num_draft_tokens), dtype=torch.int64, device=device)


def max_count(num_draft_tokens: Sequence[int] | torch.Tensor) -> int:
    """max_i k_i as a host int (a device tensor costs one sync; pass a list on the hot path)."""
    if isinstance(num_draft_tokens, torch.Tensor):
        return int(num_draft_tokens.max().item()) if num_draft_tokens.numel() else 0
    return max(num_draft_tokens, default=0)


def build_layout(
    num_draft_tokens: Sequence[int] | torch.Tensor,
    total_draft_tokens: int,
    device: torch.device,
    max_num_draft_tokens: int | None = None,
    bonus_rows: bool = True,
) -> RaggedLayout:
    """Index maps for ``num_draft_tokens`` ``[B]`` with ``total_draft_tokens = sum k_i`` (host int).

    ``total_draft_tokens`` comes from ``draft_token_ids.shape[0]`` so that nothing here reads a
    device value back (``repeat_interleave`` is given its output size). ``bonus_rows=False``:
    target rows are the draft rows only (see the module docstring).
    """
    counts = as_count_tensor(num_draft_tokens, device)
    if max_num_draft_tokens is None:
        max_num_draft_tokens = max_count(num_draft_tokens)
    batch = counts.shape[0]
    requests = torch.arange(batch, dtype=torch.int64, device=device)
    draft_end = torch.cumsum(counts, dim=0)
    draft_start = draft_end - counts
    request_of_draft = torch.repeat_interleave(requests, counts, output_size=total_draft_tokens)
    draft_index = torch.arange(total_draft_tokens, dtype=torch.int64, device=device)
    position_of_draft = draft_index - draft_start[request_of_draft]
    if bonus_rows:
        row_start = draft_start + requests
        row_of_draft = draft_index + request_of_draft
        request_of_row = torch.repeat_interleave(
            requests, counts + 1, output_size=total_draft_tokens + batch
        )
    else:
        row_start, row_of_draft, request_of_row = draft_start, draft_index, request_of_draft
    return RaggedLayout(
        num_draft_tokens=counts,
        draft_start=draft_start,
        row_start=row_start,
        bonus_row=row_start + counts,
        request_of_draft=request_of_draft,
        position_of_draft=position_of_draft,
        row_of_draft=row_of_draft,
        request_of_row=request_of_row,
        max_num_draft_tokens=int(max_num_draft_tokens),
        has_bonus_rows=bonus_rows,
    )
