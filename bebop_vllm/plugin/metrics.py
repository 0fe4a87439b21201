"""Per-request speculative-decoding metrics with target entropy (the record users see).

vLLM 0.32 keeps one :class:`~vllm.v1.metrics.stats.RequestSpecDecodeMetrics` per engine
request (one per sampled sequence, so ``n > 1`` gets one per choice), fills it in the
scheduler after every verify step and ships it, on the request's final output, to
``CompletionOutput.spec_decode_metrics`` and the OpenAI ``metrics.speculative_decoding``.
:class:`BebopSpecDecodeMetrics` is that record plus

* drafted / accepted tokens per draft position,
* the target's entropy (nats) of the distribution the verifier checks each draft against
  (after temperature / top-k / top-p; for greedy requests, whose sampling distribution is
  a point mass, the temperature-1 distribution — the same convention as bebop's verifier).

Which positions carry an entropy: the *decided* draft positions of every verify step — the
accepted drafts plus the first rejected one, min(accepted + 1, drafted) per step (see
:mod:`bebop_vllm.plugin.metrics_entropy`). Tokens sampled outside verification (first
token after prefill, bonus tokens) have none.

The runner computes the entropies (:mod:`bebop_vllm.plugin.metrics_entropy`), the
scheduler hands them to :meth:`BebopSpecDecodeMetrics.stage_entropy` just before vLLM
calls :meth:`observe` for the same step; the patches that wire this live in
:mod:`bebop_vllm.plugin.patches.metrics`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from vllm.v1.metrics.stats import RequestSpecDecodeMetrics


@dataclass
class BebopSpecDecodeMetrics(RequestSpecDecodeMetrics):
    """vLLM's per-sequence spec-decode record plus per-position counts and target entropy.

    New fields (all travel engine → frontend; ``_staged`` does not, it is not a field):
        num_draft_tokens_per_pos: drafts proposed at depth i (index 0 = first draft).
        num_accepted_tokens_per_pos: drafts accepted at depth i.
        token_entropies: target entropy (nats) at every decided draft position, in output
            order (kept at every level: the Prometheus histogram needs it).
        per_step_entropy: mean of the above per verify step, aligned with vLLM's
            ``per_step_accepted`` (``detailed`` level only; None where a step had none).
    """

    num_draft_tokens_per_pos: list[int] = field(default_factory=list)
    num_accepted_tokens_per_pos: list[int] = field(default_factory=list)
    token_entropies: list[float] = field(default_factory=list)
    per_step_entropy: list[float | None] = field(default_factory=list)

    @classmethod
    def new(cls, num_spec_tokens: int) -> BebopSpecDecodeMetrics:
        return cls(
            num_spec_tokens=num_spec_tokens,
            histogram=[0] * (num_spec_tokens + 1),
            num_draft_tokens_per_pos=[0] * num_spec_tokens,
            num_accepted_tokens_per_pos=[0] * num_spec_tokens,
        )

    def stage_entropy(self, entropies: list[float]) -> None:
        """Hold this step's decided-position entropies until :meth:`observe` consumes them."""
        self._staged = entropies

    def observe(self, num_draft_tokens: int, num_accepted: int, detailed: bool = False) -> None:
        super().observe(num_draft_tokens=num_draft_tokens, num_accepted=num_accepted,
                        detailed=detailed)
        for i in range(num_draft_tokens):
            self.num_draft_tokens_per_pos[i] += 1
        for i in range(num_accepted):
            self.num_accepted_tokens_per_pos[i] += 1
        staged: list[float] | None = self.__dict__.pop("_staged", None)
        # Decided positions: accepted drafts + the first rejected one. vLLM counts acceptance
        # from the same untruncated verifier output, so this stays aligned when a stop trims.
        step = staged[: min(num_accepted + 1, num_draft_tokens)] if staged else []
        self.token_entropies.extend(step)
        if detailed:
            self.per_step_entropy.append(sum(step) / len(step) if step else None)

    @property
    def mean_target_entropy(self) -> float | None:
        """Mean target entropy (nats) over the decided draft positions."""
        n = len(self.token_entropies)
        return math.fsum(self.token_entropies) / n if n else None

    def to_dict(self) -> dict[str, Any]:
        """vLLM's payload (``SpeculativeDecodingMetrics``) plus bebop's fields."""
        result = super().to_dict()
        drafted, accepted = self.num_draft_tokens_per_pos, self.num_accepted_tokens_per_pos
        result["num_draft_tokens_per_pos"] = list(drafted)
        result["num_accepted_tokens_per_pos"] = list(accepted)
        result["acceptance_rate_per_pos"] = [a / d if d else 0.0 for a, d in zip(accepted, drafted, strict=True)]
        result["mean_target_entropy"] = self.mean_target_entropy
        result["num_entropy_tokens"] = len(self.token_entropies)
        if self.per_step_accepted:  # the `detailed` level, same switch vLLM uses
            result["per_step_target_entropy"] = list(self.per_step_entropy)
        return result


def spec_metrics_dict(metrics: RequestSpecDecodeMetrics | None) -> dict[str, Any] | None:
    """The user-facing dict of one sequence's metrics (None when speculation did not run)."""
    return None if metrics is None else metrics.to_dict()
