"""bebop's Prometheus metrics, fed from each finished sequence's per-request record.

They sit next to vLLM's own ``vllm:spec_decode_*`` counters on ``/metrics`` (the frontend's
default registry). Fed from the same :class:`BebopSpecDecodeMetrics` the responses carry, so
the totals over a set of requests equal the sums of those requests' response fields:

* ``bebop:spec_decode_target_entropy_nats`` (histogram): target entropy at every decided
  draft position (what acceptance depends on);
* ``bebop:spec_decode_num_draft_tokens_per_pos_total{position}`` and
  ``bebop:spec_decode_num_accepted_tokens_per_pos_total{position}`` (counters): drafted and
  accepted tokens per draft depth — their ratio is the acceptance rate per position;
* ``bebop:spec_decode_num_sequences_total`` (counter): sequences those came from.

Named ``bebop:`` so vLLM's ``unregister_vllm_metrics`` (which drops ``vllm:`` collectors)
leaves them alone.
"""

from __future__ import annotations

import threading
from typing import Any

# Natural-log entropy of a 49k vocabulary tops out near 10.8 nats.
ENTROPY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 11.0)

_lock = threading.Lock()
_collectors: dict[str, Any] | None = None


def collectors() -> dict[str, Any]:
    """The process's bebop collectors, created once in the default registry."""
    global _collectors
    if _collectors is None:
        with _lock:
            if _collectors is None:
                from prometheus_client import Counter, Histogram

                _collectors = {
                    "entropy": Histogram(
                        "bebop:spec_decode_target_entropy_nats",
                        "Target entropy (nats) of the verifier's distribution at each decided "
                        "draft position (accepted drafts + first rejected one).",
                        buckets=ENTROPY_BUCKETS),
                    "drafted": Counter(
                        "bebop:spec_decode_num_draft_tokens_per_pos",
                        "Draft tokens proposed, by draft position (0 = first draft).",
                        labelnames=["position"]),
                    "accepted": Counter(
                        "bebop:spec_decode_num_accepted_tokens_per_pos",
                        "Draft tokens accepted, by draft position (0 = first draft).",
                        labelnames=["position"]),
                    "sequences": Counter(
                        "bebop:spec_decode_num_sequences",
                        "Finished sequences whose speculative metrics were recorded."),
                }
    return _collectors


def observe_finished(record: Any) -> None:
    """Add one finished sequence's record (a BebopSpecDecodeMetrics) to the collectors."""
    entropies = getattr(record, "token_entropies", None)
    if entropies is None:  # vLLM's plain record: not ours to count
        return
    c = collectors()
    for value in entropies:
        c["entropy"].observe(value)
    for pos, (drafted, accepted) in enumerate(zip(record.num_draft_tokens_per_pos,
                                                  record.num_accepted_tokens_per_pos, strict=True)):
        c["drafted"].labels(position=str(pos)).inc(drafted)
        c["accepted"].labels(position=str(pos)).inc(accepted)
    c["sequences"].inc()
