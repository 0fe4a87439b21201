"""``RolloutStats``: one rollout call's speculative-decoding record, summed from vLLM's outputs.

The plugin attaches a :class:`~bebop_vllm.plugin.metrics.BebopSpecDecodeMetrics` to every
``CompletionOutput`` (``spec_decode_metrics``): per draft position the drafts proposed and accepted,
the verify-step histogram and the target entropy at every decided draft position. This module only
adds them up; it needs neither an engine nor vLLM (duck-typed), so it is unit-tested with fakes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class SequenceRecord:
    """One generated sequence's speculative record (the unit the acceptance monitor fits on)."""

    num_output_tokens: int
    num_verify_steps: int
    drafted_per_pos: tuple[int, ...]
    accepted_per_pos: tuple[int, ...]
    mean_entropy: float | None  # mean target entropy (nats) over its decided draft positions
    num_entropy_tokens: int


@dataclass
class RolloutStats:
    """What one :meth:`RolloutEngine.generate` call measured.

    ``acceptance_per_position[i]``: drafts accepted at depth i / drafts proposed at depth i (vLLM's
    per-position rate; unconditional: accepting depth i needs depths < i accepted).
    ``mean_tokens_per_verify_step``: 1 + accepted drafts / verify steps (the bonus/recovered token
    included), over sequences that ran speculation. ``mean_target_entropy``: over every decided draft
    position of the call. All None / empty without speculation (a plain engine).
    """

    num_prompts: int
    num_sequences: int
    num_output_tokens: int
    seconds: float
    tokens_per_s: float
    num_verify_steps: int = 0
    drafted_per_position: list[int] = field(default_factory=list)
    accepted_per_position: list[int] = field(default_factory=list)
    acceptance_per_position: list[float] = field(default_factory=list)
    mean_tokens_per_verify_step: float | None = None
    mean_target_entropy: float | None = None
    policy_version: str | None = None
    sequences: list[SequenceRecord] = field(default_factory=list)

    @property
    def acceptance(self) -> float | None:
        """All positions pooled: accepted drafts / proposed drafts."""
        drafted = sum(self.drafted_per_position)
        return sum(self.accepted_per_position) / drafted if drafted else None

    def to_dict(self, with_sequences: bool = False) -> dict[str, Any]:
        d = asdict(self)
        d["acceptance"] = self.acceptance
        if not with_sequences:
            d.pop("sequences")
        return d


def sequence_record(completion: Any) -> SequenceRecord | None:
    """The record of one ``CompletionOutput`` (None when speculation did not run for it)."""
    m = getattr(completion, "spec_decode_metrics", None)
    if m is None:
        return None
    drafted = tuple(int(x) for x in getattr(m, "num_draft_tokens_per_pos", ()) or ())
    accepted = tuple(int(x) for x in getattr(m, "num_accepted_tokens_per_pos", ()) or ())
    entropies = list(getattr(m, "token_entropies", ()) or ())
    return SequenceRecord(
        num_output_tokens=len(completion.token_ids),
        num_verify_steps=int(sum(m.histogram)),
        drafted_per_pos=drafted,
        accepted_per_pos=accepted,
        mean_entropy=math.fsum(entropies) / len(entropies) if entropies else None,
        num_entropy_tokens=len(entropies),
    )


def rollout_stats(outputs: Iterable[Any], seconds: float, policy_version: str | None = None) -> RolloutStats:
    """Sum the per-sequence records of vLLM ``RequestOutput`` objects into a :class:`RolloutStats`."""
    outputs = list(outputs)
    records: list[SequenceRecord] = []
    n_seq = n_tok = 0
    entropy_sum, entropy_n, accepted_total = 0.0, 0, 0
    for req in outputs:
        for c in req.outputs:
            n_seq += 1
            n_tok += len(c.token_ids)
            rec = sequence_record(c)
            if rec is None:
                continue
            records.append(rec)
            m = c.spec_decode_metrics
            ent = list(getattr(m, "token_entropies", ()) or ())
            entropy_sum += math.fsum(ent)
            entropy_n += len(ent)
            accepted_total += sum(j * count for j, count in enumerate(m.histogram))
    width = max((len(r.drafted_per_pos) for r in records), default=0)
    drafted = [sum(r.drafted_per_pos[i] for r in records if i < len(r.drafted_per_pos)) for i in range(width)]
    accepted = [sum(r.accepted_per_pos[i] for r in records if i < len(r.accepted_per_pos)) for i in range(width)]
    steps = sum(r.num_verify_steps for r in records)
    return RolloutStats(
        num_prompts=len(outputs),
        num_sequences=n_seq,
        num_output_tokens=n_tok,
        seconds=seconds,
        tokens_per_s=n_tok / seconds if seconds > 0 else math.nan,
        num_verify_steps=steps,
        drafted_per_position=drafted,
        accepted_per_position=accepted,
        acceptance_per_position=[a / d if d else 0.0 for a, d in zip(accepted, drafted, strict=True)],
        mean_tokens_per_verify_step=1.0 + accepted_total / steps if steps else None,
        mean_target_entropy=entropy_sum / entropy_n if entropy_n else None,
        policy_version=policy_version,
        sequences=records,
    )
