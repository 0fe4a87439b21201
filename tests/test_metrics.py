"""Unit tests of the per-request metrics plumbing (no engine start: seconds)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from bebop_vllm.plugin import register

register()  # the patches under test (idempotent)

from bebop_vllm.plugin.metrics import BebopSpecDecodeMetrics  # noqa: E402
from bebop_vllm.plugin.metrics_entropy import (  # noqa: E402
    decided_position_entropies,
    draft_entropy,
    fallback_draft_entropy,
)


def test_record_counts_positions_and_decided_entropies():
    rec = BebopSpecDecodeMetrics.new(3)
    rec.stage_entropy([1.0, 2.0, 3.0])
    rec.observe(num_draft_tokens=3, num_accepted=1, detailed=True)  # decided: pos 0 (acc), 1 (rej)
    rec.stage_entropy([0.5, 0.5, 0.5])
    rec.observe(num_draft_tokens=3, num_accepted=3, detailed=True)  # all accepted: 3 decided
    rec.observe(num_draft_tokens=2, num_accepted=0, detailed=True)  # nothing staged: no entropy
    d = rec.to_dict()
    assert d["acceptance_histogram"] == [1, 1, 0, 1]
    assert d["num_draft_tokens_per_pos"] == [3, 3, 2]
    assert d["num_accepted_tokens_per_pos"] == [2, 1, 1]
    assert d["acceptance_rate_per_pos"] == pytest.approx([2 / 3, 1 / 3, 1 / 2])
    assert d["num_entropy_tokens"] == 5
    assert d["mean_target_entropy"] == pytest.approx((1 + 2 + 0.5 * 3) / 5)
    assert d["per_step_target_entropy"] == [1.5, 0.5, None]
    assert d["mean_acceptance_length"] == pytest.approx(1 + 4 / 3)
    json.dumps(d)  # the OpenAI payload must be JSON


def test_record_summary_level_has_no_per_step_fields():
    rec = BebopSpecDecodeMetrics.new(2)
    rec.stage_entropy([0.25, 0.75])
    rec.observe(num_draft_tokens=2, num_accepted=2, detailed=False)
    d = rec.to_dict()
    assert "per_step_target_entropy" not in d and "per_step_accepted" not in d
    assert d["mean_target_entropy"] == pytest.approx(0.5)


def test_stale_staging_is_not_reused():
    rec = BebopSpecDecodeMetrics.new(2)
    rec.stage_entropy([9.0, 9.0])
    rec.observe(num_draft_tokens=2, num_accepted=0, detailed=False)
    rec.observe(num_draft_tokens=2, num_accepted=0, detailed=False)
    assert rec.token_entropies == [9.0]


def test_decided_positions_per_request():
    ent = torch.arange(7, dtype=torch.float32)  # drafts: req a 3, req b 0, req c 4
    sampled = torch.tensor([[5, 6, -1, -1, -1],    # a: 1 accepted -> positions 0, 1
                            [7, -1, -1, -1, -1],   # b: no drafts -> not reported
                            [1, 2, 3, 4, 5]],      # c: all 4 accepted + bonus -> 4 positions
                           dtype=torch.int32)
    out = decided_position_entropies(ent, [3, 0, 4], sampled, ["a", "b", "c"])
    assert out == {"a": [0.0, 1.0], "c": [3.0, 4.0, 5.0, 6.0]}


def _vllm_verifier_entropy(logits, meta, sm):
    """Entropy of the distribution vLLM's RejectionSampler builds (expand fix applied)."""
    from vllm.v1.sample import rejection_sampler as rs

    target = logits[meta.target_logits_indices].float().clone()
    target = rs.apply_sampling_constraints(target, meta.cu_num_draft_tokens, sm)
    return -(target.softmax(-1) * target.log_softmax(-1).nan_to_num(neginf=0.0)).sum(-1)


def test_fallback_entropy_matches_vllm_verifier_distribution():
    torch.manual_seed(0)
    num_draft = [2, 3, 1]
    rows = sum(num_draft) + len(num_draft)
    logits = torch.randn(rows, 500) * 3
    target_idx, start = [], 0
    for k in num_draft:
        target_idx += list(range(start, start + k))
        start += k + 1
    meta = SimpleNamespace(num_draft_tokens=num_draft,
                           target_logits_indices=torch.tensor(target_idx),
                           cu_num_draft_tokens=torch.tensor(num_draft).cumsum(0).to(torch.int32))
    sm = SimpleNamespace(all_greedy=False, all_random=True,
                         temperature=torch.tensor([0.7, 1.3, 1.0]),
                         top_k=torch.tensor([500, 20, 500], dtype=torch.int32),
                         top_p=torch.tensor([1.0, 1.0, 0.9]))
    ours = fallback_draft_entropy(logits, meta, sm)
    theirs = _vllm_verifier_entropy(logits, meta, sm)
    assert ours.shape == (sum(num_draft),)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    # Different temperatures really give different entropies (the test has power).
    assert not torch.allclose(ours[:2], fallback_draft_entropy(logits, meta, SimpleNamespace(
        **{**vars(sm), "temperature": torch.tensor([1.0, 1.3, 1.0])}))[:2])


def test_draft_entropy_prefers_the_verifiers_own_values():
    meta = SimpleNamespace(num_draft_tokens=[2], target_logits_indices=torch.tensor([0, 1]),
                           cu_num_draft_tokens=torch.tensor([2]))
    sm = SimpleNamespace(all_greedy=True, temperature=None, top_k=None, top_p=None)
    logits = torch.zeros(3, 8)  # uniform: fallback gives log(8)
    ours = torch.tensor([0.1, 0.2])
    assert draft_entropy(SimpleNamespace(last_target_entropy=ours), logits, meta, sm) is ours
    for verifier in (SimpleNamespace(), SimpleNamespace(last_target_entropy=None),
                     SimpleNamespace(last_target_entropy=torch.zeros(5))):
        got = draft_entropy(verifier, logits, meta, sm)
        torch.testing.assert_close(got, torch.full((2,), math.log(8)))


def test_record_survives_the_engine_to_frontend_wire():
    from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    rec = BebopSpecDecodeMetrics.new(2)
    rec.stage_entropy([1.25, 0.5])
    rec.observe(num_draft_tokens=2, num_accepted=1, detailed=True)
    wire = MsgpackEncoder().encode(EngineCoreOutputs(outputs=[
        EngineCoreOutput(request_id="r", new_token_ids=[1], spec_decode_metrics=rec)]))
    back = MsgpackDecoder(EngineCoreOutputs).decode(wire).outputs[0].spec_decode_metrics
    assert isinstance(back, BebopSpecDecodeMetrics)
    assert back.to_dict() == rec.to_dict()


def test_sse_injection_only_touches_finishing_choices():
    from bebop_vllm.plugin.patches.metrics_openai import _inject_sse

    metrics = {0: {"num_spec_steps": 1}, 1: {"num_spec_steps": 2}}
    running = 'data: {"choices":[{"index":0,"text":"a","finish_reason":null}]}\n\n'
    assert _inject_sse(running, metrics) == running
    done = 'data: {"choices":[{"index":1,"text":"b","finish_reason":"length"}]}\n\n'
    payload = json.loads(_inject_sse(done, metrics)[len("data: "):])
    assert payload["choices"][0]["speculative_decoding"] == {"num_spec_steps": 2}
    assert _inject_sse("data: [DONE]\n\n", metrics) == "data: [DONE]\n\n"


def test_prometheus_collectors_count_one_record():
    from prometheus_client import REGISTRY

    from bebop_vllm.plugin.metrics_prometheus import observe_finished

    def value(name, **labels):
        return REGISTRY.get_sample_value(name, labels) or 0.0

    before = (value("bebop:spec_decode_target_entropy_nats_count"),
              value("bebop:spec_decode_target_entropy_nats_sum"),
              value("bebop:spec_decode_num_accepted_tokens_per_pos_total", position="1"),
              value("bebop:spec_decode_num_sequences_total"))
    rec = BebopSpecDecodeMetrics.new(2)
    rec.stage_entropy([1.0, 3.0])
    rec.observe(num_draft_tokens=2, num_accepted=2)
    observe_finished(rec)
    after = (value("bebop:spec_decode_target_entropy_nats_count"),
             value("bebop:spec_decode_target_entropy_nats_sum"),
             value("bebop:spec_decode_num_accepted_tokens_per_pos_total", position="1"),
             value("bebop:spec_decode_num_sequences_total"))
    assert [a - b for a, b in zip(after, before, strict=True)] == [2, 4.0, 1, 1]


def test_metrics_patches_are_pinned_and_applied():
    from bebop_vllm.plugin.patches import PATCHES

    names = {p.name: p for p in PATCHES}
    for name in ("metrics_record_class", "metrics_wire_type", "metrics_runner_sample",
                 "metrics_runner_output", "metrics_scheduler_update", "metrics_frontend_prometheus",
                 "metrics_openai_completion_response", "metrics_openai_completion_stream",
                 "metrics_openai_chat_full", "metrics_openai_chat_stream"):
        assert names[name].applied, name
        assert "vLLM 0.32.0" in names[name].upstream and ".py:" in names[name].upstream
    from vllm.v1.core.sched import scheduler

    assert scheduler.RequestSpecDecodeMetrics is BebopSpecDecodeMetrics
