"""draft_length="auto": policy math, step-cost model, scheduler planner and runner entropies - no engine."""

from __future__ import annotations

import itertools
import json
import types

import pytest
import torch

from bebop_vllm.draft_policy import AcceptanceEstimate, batch_expected_tokens, plan_draft_lengths
from bebop_vllm.step_cost import StepCostModel, default_model, interpolate, measure_curves


def linear_cost(fixed: float, per_token: float, per_depth: float = 0.0):
    return lambda num_tokens, depths: fixed + per_token * num_tokens + per_depth * depths


def brute_force(alphas, max_k, cost):
    best, best_rate = None, -1.0
    for lengths in itertools.product(range(max_k + 1), repeat=len(alphas)):
        rate = batch_expected_tokens(alphas, lengths) / cost(len(alphas) + sum(lengths), max(lengths))
        if rate > best_rate * (1 + 1e-9):
            best, best_rate = lengths, rate
    return best, best_rate


# ------------------------------------------------------------------ policy math


@pytest.mark.parametrize("alphas", [[0.9], [0.2, 0.8], [0.5, 0.5, 0.95], [0.0, 0.7, 0.3, 0.99]])
@pytest.mark.parametrize("cost", [linear_cost(1.0, 0.01), linear_cost(1.0, 0.3, 0.05), linear_cost(0.1, 1.0),
                                  linear_cost(1.0, 0.0, 0.4)])
def test_plan_matches_brute_force(alphas, cost):
    plan = plan_draft_lengths(alphas, 3, cost)
    _, best_rate = brute_force(alphas, 3, cost)
    assert plan.rate == pytest.approx(best_rate)
    assert plan.depths == max(plan.lengths)
    assert plan.expected_tokens == pytest.approx(batch_expected_tokens(alphas, plan.lengths))


def test_memory_bound_step_drafts_everything_compute_bound_step_drafts_nothing():
    # GPU-like: one more token is ~free -> every request drafts the maximum
    assert plan_draft_lengths([0.6] * 8, 3, linear_cost(1.0, 0.001)).lengths == (3,) * 8
    # CPU crowd: a step costs ~ its tokens -> no drafts, zero depths (the step costs a plain step)
    plan = plan_draft_lengths([0.6] * 64, 3, linear_cost(0.05, 0.02, 0.1))
    assert plan.lengths == (0,) * 64 and plan.depths == 0
    assert plan.seconds == pytest.approx(0.05 + 0.02 * 64)


def test_all_zero_when_drafting_cannot_pay_and_margin_is_respected():
    cost = linear_cost(1.0, 0.2)  # one draft costs 20 % of a plain step
    assert plan_draft_lengths([0.15, 0.1], 3, cost).depths == 0  # alpha < relative cost
    gain_plan = plan_draft_lengths([0.3], 3, cost)
    assert gain_plan.depths >= 1 and gain_plan.predicted_speedup > 1.0
    # a margin above the predicted gain turns drafting off
    assert plan_draft_lengths([0.3], 3, cost, min_gain=gain_plan.predicted_speedup - 1 + 0.01).depths == 0


def test_lengths_follow_acceptance_and_ineligible_requests_never_draft():
    plan = plan_draft_lengths([0.95, 0.5, 0.05], 4, linear_cost(1.0, 0.1))
    assert plan.lengths[0] >= plan.lengths[1] >= plan.lengths[2]
    assert plan.lengths[0] > 0 and plan.lengths[2] == 0
    plan = plan_draft_lengths([0.95, 0.95], 3, linear_cost(1.0, 0.001), eligible=[False, True])
    assert plan.lengths == (0, 3)
    assert plan_draft_lengths([0.95], 3, linear_cost(1.0, 0.001), eligible=[False]).depths == 0
    assert plan_draft_lengths([], 3, linear_cost(1.0, 0.001)).depths == 0


def test_shared_depth_cost_favours_fewer_depths_for_the_batch():
    # Each depth costs the whole batch 0.3: one request with a great alpha cannot pay for depth 3 alone
    alphas, cost = [0.9] + [0.2] * 3, linear_cost(1.0, 0.0, 0.3)
    plan = plan_draft_lengths(alphas, 3, cost)
    assert plan.depths < 3
    assert plan.rate == pytest.approx(brute_force(alphas, 3, cost)[1])


def test_base_tokens_of_prefill_chunks_make_drafts_relatively_cheaper():
    cost = linear_cost(0.0, 0.01, 0.0)
    lone = plan_draft_lengths([0.3], 3, lambda n, d: 0.01 * n + 0.004 * d)
    with_prefill = plan_draft_lengths([0.3, 0.0], 3, lambda n, d: 0.01 * n + 0.004 * d, base_tokens=200,
                                      eligible=[True, False])
    assert with_prefill.depths >= lone.depths
    assert plan_draft_lengths([0.5], 3, cost).lengths[0] == 0  # cost exactly proportional: never pays


def test_acceptance_estimate_blends_prior_history_and_entropy():
    est = AcceptanceEstimate(prior_alpha=0.3)
    assert est.alpha() == pytest.approx(0.3)
    for _ in range(20):
        est.observe(drafted=3, accepted=3)
    assert est.alpha() > 0.8  # ~15 effective observations against the prior weight 4
    for _ in range(20):
        est.observe(drafted=3, accepted=0)
    assert est.alpha() < 0.2  # recent history dominates (decay)
    fresh = AcceptanceEstimate(prior_alpha=0.3, entropy=0.0)
    assert fresh.alpha(fit=(0.8, -0.1)) == pytest.approx(0.8)  # the entropy fit is the prior
    fresh.entropy = 5.0
    assert fresh.alpha(fit=(0.8, -0.1)) == pytest.approx(0.3)
    est.observe(drafted=0, accepted=0)  # a step without drafts says nothing


# ------------------------------------------------------------------ step cost model


def test_interpolation_and_step_seconds():
    pts = [(1, 1.0), (4, 2.0), (16, 8.0)]
    assert interpolate(pts, 0) == 1.0 and interpolate(pts, 1) == 1.0
    assert interpolate(pts, 2.5) == pytest.approx(1.5)
    assert interpolate(pts, 32) == pytest.approx(16.0)  # last slope 0.5/token
    assert interpolate([(2, 1.0)], 4) == pytest.approx(2.0)
    model = StepCostModel(target=pts, draft_pass=[(1, 0.1), (16, 0.2)], draft_head=[(1, 0.05), (8, 0.1)],
                          draft_forward=[(1, 0.02), (8, 0.04)])
    assert model.step_seconds(4, 0, 4) == pytest.approx(2.0 + 0.1 + 0.1 * 3 / 15)
    k3 = model.step_seconds(16, 3, 4)
    depth_costs = 3 * interpolate(model.draft_head, 4) + 2 * interpolate(model.draft_forward, 4)
    assert k3 == pytest.approx(8.0 + 0.2 + depth_costs)
    assert model.for_batch(4)(16, 3) == k3
    assert "target [1:1000.00" in model.summary()
    # nothing rises above the first point: flat, more tokens never cost less
    dipped = StepCostModel(target=[(1, 1.0), (64, 0.083), (128, 0.147), (256, 0.12), (512, 0.209)],
                           draft_pass=[(1, 0.1)], draft_head=[(1, 0.1)], draft_forward=[(1, 0.1)])
    assert [y for _, y in dipped.target] == [1.0, 1.0, 1.0, 1.0, 1.0]
    # a dip is dropped, not flattened: the tokens up to it must not be free (a flat segment let the
    # planner fill batches of ~200 requests with drafts up to 256 tokens, 0.69x plain)
    dipped = StepCostModel(target=[(1, 0.02), (64, 0.083), (128, 0.147), (256, 0.12), (512, 0.209)],
                           draft_pass=[(1, 0.1)], draft_head=[(1, 0.1)], draft_forward=[(1, 0.1)])
    assert dipped.target == [(1, 0.02), (64, 0.083), (128, 0.147), (512, 0.209)]
    assert interpolate(dipped.target, 256) - interpolate(dipped.target, 200) == pytest.approx(56 * 0.062 / 384)
    # an equal value (what a cache file written by the old clamping holds) is dropped too
    flat = StepCostModel(target=[(1, 0.02), (4, 0.03), (8, 0.03), (16, 0.05)],
                         draft_pass=[(1, 0.1)], draft_head=[(1, 0.1)], draft_forward=[(1, 0.1)])
    assert flat.target == [(1, 0.02), (4, 0.03), (16, 0.05)]


def test_model_json_round_trip_and_validation(tmp_path):
    from bebop_vllm.step_cost import load

    model = default_model(on_gpu=False)
    model.save(tmp_path / "c.json")
    back = load(tmp_path / "c.json")
    assert back.target == model.target and back.source.startswith("file:")
    with pytest.raises(ValueError, match="needs distinct points"):
        StepCostModel(target=[], draft_pass=[(1, 0.1)], draft_head=[(1, 0.1)], draft_forward=[(1, 0.1)])
    data = json.loads((tmp_path / "c.json").read_text())
    data["format_version"] = 99
    with pytest.raises(ValueError, match="format_version"):
        StepCostModel.from_json(data, "x")


def test_default_models_make_the_policy_behave_as_expected():
    gpu, cpu = default_model(on_gpu=True), default_model(on_gpu=False)
    assert plan_draft_lengths([0.6] * 16, 3, gpu.for_batch(16)).depths == 3
    assert plan_draft_lengths([0.6] * 64, 3, cpu.for_batch(64)).depths == 0
    assert plan_draft_lengths([0.6], 3, cpu.for_batch(1)).depths >= 1


def test_measure_curves_respects_sizes_and_budget():
    calls = []

    def run(name, per):
        return lambda n: calls.append((name, n))

    curves = measure_curves(run("t", 0), run("p", 0), run("h", 0), run("f", 0), max_tokens=20, max_batch=4,
                            budget_s=1.0)
    assert [x for x, _ in curves["target"]] == [1, 2, 4, 8, 16]
    assert [x for x, _ in curves["draft_head"]] == [1, 2, 4]
    assert all(len(curves[c]) >= 1 for c in curves)
    assert sum(1 for name, _ in calls if name == "t") == 5 * 3  # warm-up + 2 timed per size

    import time

    slow = measure_curves(lambda n: time.sleep(0.02), run("p", 0), run("h", 0), run("f", 0), max_tokens=512,
                          max_batch=4, budget_s=0.2)
    assert 2 <= len(slow["target"]) < 10  # stopped by the budget, still two points for a slope


def test_resolve_prefers_file_then_cache_then_calibration(tmp_path, monkeypatch):
    from bebop_vllm import step_cost

    monkeypatch.setenv("BEBOP_HOME", str(tmp_path))
    monkeypatch.setattr(step_cost, "_REGISTRY", {})
    cfg = types.SimpleNamespace(
        additional_config={"bebop": {}}, model_config=types.SimpleNamespace(model="m", dtype="float32"),
        speculative_config=types.SimpleNamespace(model="h", num_speculative_tokens=3),
        parallel_config=types.SimpleNamespace(tensor_parallel_size=1))
    assert step_cost.resolve(cfg).source == "default"  # nothing known, no runner
    calibrated = StepCostModel(target=[(1, 0.5), (8, 1.0)], draft_pass=[(1, 0.01)], draft_head=[(1, 0.01)],
                               draft_forward=[(1, 0.01)], source="calibrated")
    monkeypatch.setattr(step_cost, "calibrate", lambda runner, budget_s: calibrated)
    assert step_cost.resolve(cfg, runner=object()) is calibrated
    assert step_cost.resolve(cfg) is calibrated  # the scheduler of the same process
    monkeypatch.setattr(step_cost, "_REGISTRY", {})
    cached = step_cost.resolve(cfg)  # a new process: from the cache file
    assert cached.source.startswith("cache:") and cached.target == calibrated.target
    other = tmp_path / "other.json"
    default_model(on_gpu=True).save(other)
    cfg.additional_config = {"bebop": {"step_cost_file": str(other)}}
    assert step_cost.resolve(cfg).source == f"file:{other}"

    def broken(runner, budget_s):
        raise RuntimeError("no dummy run here")

    monkeypatch.setattr(step_cost, "calibrate", broken)
    monkeypatch.setattr(step_cost, "_REGISTRY", {})
    cfg.additional_config = {"bebop": {}}
    cfg.model_config.model = "another-model"
    assert step_cost.resolve(cfg, runner=object()).source == "default"  # never stops the engine


def test_eager_and_compiled_engines_do_not_share_a_step_cost_cache(tmp_path, monkeypatch):
    from vllm.config import CompilationMode

    from bebop_vllm import step_cost

    monkeypatch.setenv("BEBOP_HOME", str(tmp_path))

    def cfg(mode):
        return types.SimpleNamespace(
            additional_config={"bebop": {}}, model_config=types.SimpleNamespace(model="m", dtype="float32"),
            speculative_config=types.SimpleNamespace(model="h", num_speculative_tokens=3),
            parallel_config=types.SimpleNamespace(tensor_parallel_size=1),
            compilation_config=types.SimpleNamespace(mode=mode))

    eager, compiled = cfg(CompilationMode.NONE), cfg(CompilationMode.DYNAMO_TRACE_ONCE)
    assert step_cost.cache_key(eager)["compilation"] == "NONE"
    assert step_cost.cache_key(compiled)["compilation"] == "DYNAMO_TRACE_ONCE"
    assert step_cost.cache_path(step_cost.cache_key(eager)) != step_cost.cache_path(step_cost.cache_key(compiled))
    assert step_cost.cache_path(step_cost.cache_key(eager)) == step_cost.cache_path(
        step_cost.cache_key(cfg(CompilationMode.NONE)))


def test_heads_widened_in_place_get_their_own_step_cost_cache(tmp_path, monkeypatch):
    """Same heads path, wider MLP (``bebop train --head-intermediate-size``): a draft pass costs
    more, so the calibration of the narrow heads must not be reused."""
    from bebop_vllm import step_cost

    monkeypatch.setenv("BEBOP_HOME", str(tmp_path))

    def cfg(width):
        draft = types.SimpleNamespace(hf_config=types.SimpleNamespace(intermediate_size=width))
        return types.SimpleNamespace(
            additional_config={"bebop": {}}, model_config=types.SimpleNamespace(model="m", dtype="float32"),
            speculative_config=types.SimpleNamespace(model="h", num_speculative_tokens=3, draft_model_config=draft),
            parallel_config=types.SimpleNamespace(tensor_parallel_size=1), compilation_config=None)

    assert step_cost.cache_key(cfg(1536))["heads_draft_width"] == 1536
    assert step_cost.cache_path(step_cost.cache_key(cfg(1536))) != step_cost.cache_path(step_cost.cache_key(cfg(3072)))


# ------------------------------------------------------------------ scheduler planner (fakes)


def _opts(**kw):
    from bebop_vllm.config import BebopOptions

    return BebopOptions(method="bebop", **kw)


class FakeScheduler:
    """The bits of vllm.v1.core.sched.scheduler.Scheduler the hooks read."""

    def __init__(self, opts, k, cost, num_reqs):
        from bebop_vllm.plugin.patches.draft_length import PLANNER_ATTR, DraftPlanner

        self.num_spec_tokens = k
        self.requests = {f"r{i}": types.SimpleNamespace(is_prefill_chunk=False, spec_token_ids=[-1] * k)
                         for i in range(num_reqs)}
        planner = DraftPlanner(opts, types.SimpleNamespace(), k)
        planner._cost = cost
        setattr(self, PLANNER_ATTR, planner)

    def output(self):
        return types.SimpleNamespace(num_scheduled_tokens=dict.fromkeys(self.requests, 1),
                                     num_spec_tokens_to_schedule=self.num_spec_tokens,
                                     scheduled_spec_decode_tokens={}, num_invalid_spec_tokens=None)


def _hooks():
    from bebop_vllm.plugin.patches import draft_length as dl

    base = dl._wrap_update_after_schedule(lambda self, out: None)

    def async_original(self, out):  # AsyncScheduler: super() then placeholders of length K
        base(self, out)
        for r in out.num_scheduled_tokens:
            self.requests[r].spec_token_ids = [-1] * out.num_spec_tokens_to_schedule

    trimmed = []
    return (base, dl._wrap_async_update_after_schedule(async_original),
            dl._wrap_update_draft_token_ids(lambda self, d: trimmed.append(d)), trimmed)


def test_crowded_batch_schedules_zero_depths_and_no_drafts():
    base, async_hook, trim, trimmed = _hooks()
    cpu = StepCostModel(target=[(1, 0.05), (8, 0.1), (64, 0.6), (256, 2.4)], draft_pass=[(1, 0.002), (256, 0.1)],
                        draft_head=[(1, 0.003), (64, 0.03)], draft_forward=[(1, 0.002), (64, 0.02)])
    sched = FakeScheduler(_opts(), 3, cpu, 48)
    out = sched.output()
    base(sched, out)
    assert out.num_spec_tokens_to_schedule == 0  # the drafter runs no depth: a plain step
    out = sched.output()
    async_hook(sched, out)
    assert all(r.spec_token_ids == [] for r in sched.requests.values())
    drafts = types.SimpleNamespace(req_ids=list(sched.requests), draft_token_ids=[[] for _ in sched.requests])
    trim(sched, drafts)
    assert trimmed[-1].draft_token_ids == [[] for _ in sched.requests]


def test_lone_request_drafts_and_sync_async_trim_to_plan():
    base, async_hook, trim, trimmed = _hooks()
    cpu = StepCostModel(target=[(1, 0.05), (2, 0.052), (4, 0.056), (8, 0.07), (64, 0.6)],
                        draft_pass=[(1, 0.001), (64, 0.02)], draft_head=[(1, 0.002), (64, 0.03)],
                        draft_forward=[(1, 0.001), (64, 0.02)])
    sched = FakeScheduler(_opts(), 3, cpu, 2)
    planner = sched._bebop_draft_planner
    for _ in range(10):  # r0 accepts everything, r1 nothing
        planner.estimate("r0").observe(3, 3)
        planner.estimate("r1").observe(3, 0)
    out = sched.output()
    base(sched, out)
    assert out.num_spec_tokens_to_schedule == 3
    k1 = planner.lengths["r1"]
    assert planner.lengths["r0"] == 3 and k1 < 3
    out = sched.output()
    async_hook(sched, out)
    assert sched.requests["r0"].spec_token_ids == [-1] * 3 and sched.requests["r1"].spec_token_ids == [-1] * k1
    trim(sched, types.SimpleNamespace(req_ids=["r0", "r1"], draft_token_ids=[[5, 6, 7], [8, 9, 10]]))
    assert trimmed[-1].draft_token_ids == [[5, 6, 7], [8, 9, 10][:k1]]


def test_planner_observes_acceptance_entropy_and_forgets_finished():
    from bebop_vllm.plugin.patches.draft_length import POLICY_ENTROPY_ATTR, DraftPlanner

    planner = DraftPlanner(_opts(acceptance_fit=(0.9, -0.2)), types.SimpleNamespace(), 3)
    sched_out = types.SimpleNamespace(scheduled_spec_decode_tokens={"a": [1, 2, 3], "b": [4, 5], "c": [-1]},
                                      num_invalid_spec_tokens={"c": 1})
    runner_out = types.SimpleNamespace(sampled_token_ids=[[1, 2, 3, 4], [4], [9]],
                                       req_id_to_index={"a": 0, "b": 1, "c": 2})
    setattr(runner_out, POLICY_ENTROPY_ATTR, {"a": 0.5, "c": 4.0})
    planner.observe(sched_out, runner_out)
    assert planner.estimates["a"].successes == 3 and planner.estimates["a"].failures == 0
    assert planner.estimates["b"].successes == 0 and planner.estimates["b"].failures == 1
    assert planner.estimates["c"].successes == 0 and planner.estimates["c"].failures == 0  # invalid draft
    assert planner.estimates["c"].entropy == 4.0
    planner.forget_finished({"a": None})
    assert set(planner.estimates) == {"a"}


def test_entropy_mode_uses_the_entropy_rule():
    from bebop_vllm.draft_length import choose_draft_length
    from bebop_vllm.plugin.patches.draft_length import DraftPlanner

    opts = _opts(draft_length="entropy", acceptance_fit=(1.0, -0.25), draft_token_cost=0.1)
    planner = DraftPlanner(opts, types.SimpleNamespace(), 3)
    sched = types.SimpleNamespace(requests={r: types.SimpleNamespace(is_prefill_chunk=False) for r in "xyz"})
    for r, h in zip("xyz", [0.1, 3.0, 3.9], strict=True):
        planner.estimate(r).entropy = h
    out = types.SimpleNamespace(num_scheduled_tokens=dict.fromkeys("xyz", 1))
    assert planner.plan(sched, out) == 3
    assert planner.lengths == {r: choose_draft_length(h, (1.0, -0.25), 3, 0.1)
                               for r, h in zip("xyz", [0.1, 3.0, 3.9], strict=True)}
    assert planner.lengths["y"] == 1  # k = 1 requests: only K = max k depths are drafted, not all 3


def test_heads_prior_alpha(tmp_path):
    from bebop_vllm.plugin.patches.draft_length import DEFAULT_PRIOR_ALPHA, heads_prior_alpha

    (tmp_path / "bebop.json").write_text(json.dumps({"heldout": {"alphas": [0.4, 0.2]}}))
    assert heads_prior_alpha(str(tmp_path)) == pytest.approx(0.3)
    assert heads_prior_alpha(str(tmp_path / "missing")) == DEFAULT_PRIOR_ALPHA


# ------------------------------------------------------------------ runner entropies: one transfer


def test_step_entropies_one_transfer_matches_separate_computations(monkeypatch):
    from bebop_vllm.plugin import metrics_entropy as me

    torch.manual_seed(0)
    vocab, num_draft = 11, [2, 0, 1]
    logits = torch.randn(sum(num_draft) + len(num_draft), vocab)
    metadata = types.SimpleNamespace(num_draft_tokens=num_draft, target_logits_indices=torch.tensor([0, 1, 4]),
                                     bonus_logits_indices=torch.tensor([2, 3, 5]))
    sampling = types.SimpleNamespace(temperature=torch.tensor([1.0, 0.5, 1.0]), all_greedy=False, top_k=None,
                                     top_p=None)
    verifier = types.SimpleNamespace(last_target_entropy=me.entropy(torch.softmax(logits[[0, 1, 4]], -1)))
    sampled = torch.tensor([[7, -1, -1], [3, -1, -1], [1, 2, -1]])  # r0 accepted 0 of 2, r2 1 of 1
    transfers = []
    real_cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: transfers.append(1) or real_cpu(self, *a, **k))
    metrics, policy = me.step_entropies(verifier, logits, metadata, sampling, sampled, ["r0", "r1", "r2"],
                                        want_metrics=True, want_policy=True)
    assert len(transfers) == 1
    expected = me.decided_position_entropies(verifier.last_target_entropy, num_draft, sampled, ["r0", "r1", "r2"])
    assert metrics.keys() == expected.keys()
    assert all(metrics[r] == pytest.approx(expected[r]) for r in expected)
    bonus = me.entropy(torch.softmax(logits[3] / 0.5, -1)).item()
    assert policy["r1"] == pytest.approx(bonus, rel=1e-5)
    assert policy["r0"] == pytest.approx(expected["r0"][0]) and policy["r2"] == pytest.approx(expected["r2"][0])
    # no drafts at all this step (K = 0): one row per request; at most POLICY_ENTROPY_ROWS of them
    monkeypatch.setattr(me, "POLICY_ENTROPY_ROWS", 2)
    plain = torch.randn(3, vocab)
    m2, p2 = me.step_entropies(verifier, plain, None, sampling, torch.zeros(3, 1), ["a", "b", "c"],
                               want_metrics=False, want_policy=True, cursor=2)
    assert m2 == {} and set(p2) == {"c", "a"}
    assert p2["a"] == pytest.approx(me.entropy(torch.softmax(plain[0], -1)).item(), rel=1e-5)
    assert me.step_entropies(verifier, plain, None, sampling, torch.zeros(3, 1), ["a", "b", "c"],
                             want_metrics=True, want_policy=False) == ({}, {})


def test_vectorised_costs_match_scalar_ones():
    import numpy as np

    from bebop_vllm.step_cost import interpolate_array

    for pts in ([(1, 1.0), (16, 2.0), (256, 9.0)], [(4, 2.0)]):
        xs = [0, 1, 3, 4, 10, 16, 100, 256, 1000]
        assert np.allclose(interpolate_array(pts, xs), [interpolate(pts, x) for x in xs])
    model = default_model(on_gpu=False)
    assert np.allclose(model.step_seconds(np.array([1, 7, 300]), 2, 8),
                       [model.step_seconds(n, 2, 8) for n in (1, 7, 300)])


# ------------------------------------------------------------------ step-time correction


def test_step_time_correction_averages_per_bucket_and_kind():
    from bebop_vllm.draft_policy import StepTimeCorrection

    c = StepTimeCorrection(min_steps=3)
    for _ in range(2):
        c.observe(16, False, predicted_s=0.1, observed_s=0.2, base_s=0.1)
    assert c.factor(16, False) == 1.0  # fewer than min_steps: trust the model
    c.observe(16, False, 0.1, 0.2, 0.1)
    assert c.factor(16, False) == pytest.approx(2.0)
    assert c.factor(16, True) == pytest.approx(2.0)  # drafting steps not measured yet: the plain ratio
    assert c.overhead(16) == 0.0  # ... and no per-step overhead
    for _ in range(3):  # extra part as predicted: y = 0.25 - 2 * 0.1 = 0.05 = x
        c.observe(16, True, 0.15, 0.25, 0.1)
    assert c.factor(16, True) == pytest.approx(1.0) and c.overhead(16) == pytest.approx(0.0, abs=1e-12)
    assert c.factor(31, False) == pytest.approx(2.0)  # same bucket (16-31)
    assert c.factor(2, False) == pytest.approx(2.0)  # nearest bucket with data
    for _ in range(3):
        c.observe(2, False, 0.1, 0.1, 0.1)
    assert c.factor(2, False) == pytest.approx(1.0) and c.factor(16, False) == pytest.approx(2.0)
    c.observe(64, False, 0.1, 100.0, 0.1)  # one stalled step is clipped
    assert c.ratios[(c.bucket(64), False)][0] <= c.max_ratio
    c.observe(64, False, 0.0, 1.0, 0.0)  # nonsense input is ignored
    assert c.ratios[(c.bucket(64), False)][1] == 1
    probing = StepTimeCorrection(min_steps=2, max_probes=3)
    assert probing.probe(8, True) is None  # nothing measured: follow the plan
    probing.observe(8, True, 1.0, 1.0, 0.0)
    probing.observe(8, True, 1.0, 1.0, 0.0)
    assert [probing.probe(8, True) for _ in range(4)] == [False, False, False, None]  # capped
    uniform = StepTimeCorrection(min_steps=1)
    uniform.observe(16, False, 1.0, 0.25, 1.0)  # a model 4x too slow for plain steps...
    step = uniform.corrected(lambda n, k: n / 16 + 0.1 * k, 16, 16)
    assert step(20, 2) == pytest.approx(0.25 * (20 / 16 + 0.2))  # ...is assumed 4x too slow for drafting too


def _toy_model(n, k):  # noqa: ANN001, ANN202 - plain part 1 s; extra parts 0.2 (k = 1), 0.35 (2), 0.5 (3)
    return 1.0 + {0: 0.0, 1: 0.2, 2: 0.35, 3: 0.5}[k]


def test_step_time_correction_separates_a_per_step_overhead_from_the_per_depth_cost():
    """A drafting step may pay a fixed part (proposer bookkeeping, the verifier's pass) that does
    not grow with its depth, plus a per-depth part. Steps of depths 1
    and 3 whose extra parts are 0.6 + 2 x the model's (0.2 / 0.5 -> 1.0 / 1.6 s) recover c ~ 0.6
    and r ~ 2, and a k = 2 step is priced ~1 + 0.6 + 2 * 0.35 = 2.3 s. The fit through the origin
    (c = 0) would have priced k = 1 at 1 + 3.2 * 0.2 = 1.64 s (truth 2.0) and k = 3 alike: drafting
    little would have looked much cheaper than it is."""
    from bebop_vllm.draft_policy import StepTimeCorrection

    c = StepTimeCorrection(min_steps=3)
    for _ in range(3):  # plain steps as predicted (until measured, the plain ratio is the drafting one)
        c.observe(1, False, _toy_model(1, 0), 1.0, _toy_model(1, 0))
    for _ in range(6):
        c.observe(1, True, _toy_model(2, 1), 2.0, _toy_model(1, 0))
        c.observe(1, True, _toy_model(4, 3), 2.6, _toy_model(1, 0))
    # (the slope's ridge towards 1 pulls r a little under 2 and c a little over 0.6)
    assert c.overhead(1) == pytest.approx(0.6, abs=0.05) and c.factor(1, True) == pytest.approx(2.0, rel=0.07)
    step = c.corrected(_toy_model, 1, 1)
    assert step(1, 0) == pytest.approx(1.0)
    assert step(2, 1) == pytest.approx(2.0, rel=0.03) and step(4, 3) == pytest.approx(2.6, rel=0.03)
    assert step(3, 2) == pytest.approx(2.3, rel=0.03)
    # one depth only: the data cannot split c from r; r stays at the calibrated 1 and c takes the rest
    one = StepTimeCorrection(min_steps=3)
    for _ in range(5):
        one.observe(1, False, 1.0, 1.0, 1.0)
        one.observe(1, True, _toy_model(4, 3), 2.6, 1.0)
    assert one.factor(1, True) == pytest.approx(1.0) and one.overhead(1) == pytest.approx(1.1)
    assert one.corrected(_toy_model, 1, 1)(2, 1) == pytest.approx(1.0 + 1.1 + 0.2)
    # a fit with a negative per-step part never prices a drafting step below the plain step
    cheap = StepTimeCorrection(min_steps=3)
    for _ in range(3):
        cheap.observe(1, False, 1.0, 1.0, 1.0)
    for k, y in [(2, 0.01), (3, 1.0)] * 4:  # extra parts 0.01 / 1.0 s against 0.35 / 0.5 predicted
        cheap.observe(1, True, _toy_model(4, k), 1.0 + y, 1.0)
    c, r, _ = cheap.fit((1, True))
    assert c + r * 0.2 < -0.2  # the line itself would price a k = 1 step well below a plain step
    assert cheap.corrected(_toy_model, 1, 1)(2, 1) == pytest.approx(cheap.corrected(_toy_model, 1, 1)(1, 0))
    # the plain part is scaled by the plain ratio: plain steps 2x slower than predicted
    slow = StepTimeCorrection(min_steps=1)
    slow.observe(16, False, 1.0, 2.0, 1.0)
    slow.observe(16, True, 1.5, 3.5, 1.0)  # extra part (3.5 - 2 * 1) = 1.5 against 0.5 predicted
    assert slow.corrected(_toy_model, 16, 16)(64, 3) == pytest.approx(3.5)
    # a stalled drafting step is clipped at max_extra_ratio times its extra part
    stalled = StepTimeCorrection(min_steps=1)
    stalled.observe(16, True, 1.5, 100.0, 1.0)
    assert stalled.corrected(_toy_model, 16, 16)(64, 3) == pytest.approx(1.0 + 0.5 * stalled.max_extra_ratio)


def test_step_time_correction_explores_neighbouring_depths():
    from bebop_vllm.draft_policy import StepTimeCorrection

    c = StepTimeCorrection(explore_every=4)
    seen = [c.explore(1, 3, 3) for _ in range(8)]
    assert seen == [None, None, None, 2, None, None, None, 2]  # at the top depth: one less
    assert [c.explore(1, 1, 3) for _ in range(4)][-1] == 2  # at depth 1: one more
    two = [c.explore(1, 2, 3) for _ in range(8)]
    assert sorted(d for d in two if d is not None) == [1, 3]  # in between: alternately
    assert c.explore(1, 0, 3) is None and StepTimeCorrection(explore_every=1).explore(1, 1, 1) is None
    assert c.explore(64, 3, 3) is None  # counted per bucket


def test_step_time_correction_is_not_swung_by_steps_with_a_tiny_extra_part():
    """The fit uses weighted moments, not a mean of per-step ratios: steps drafting 3 tokens per
    request (extra part 0.5 s predicted, 1.0 s observed) decide it; a step drafting one token
    (extra part 0.01 s predicted) that ran 0.1 s slower from timing noise (per-step ratio 10) moves
    the price of a k = 3 step by under 2 %."""
    from bebop_vllm.draft_policy import StepTimeCorrection

    c = StepTimeCorrection(min_steps=3)
    for _ in range(5):
        c.observe(16, False, 1.0, 1.0, 1.0)
        c.observe(16, True, 1.5, 2.0, 1.0)
    assert c.corrected(_toy_model, 16, 16)(64, 3) == pytest.approx(2.0)
    c.observe(16, True, 1.01, 1.1, 1.0)
    assert c.corrected(_toy_model, 16, 16)(64, 3) == pytest.approx(2.0, rel=0.02)
    # the fit still follows a real change: extra parts that now cost 4x move it there within a few steps
    for _ in range(12):
        c.observe(16, True, 1.5, 3.0, 1.0)
    assert c.corrected(_toy_model, 16, 16)(64, 3) == pytest.approx(3.0, rel=0.05)


def test_planner_stops_drafting_when_drafting_steps_run_slower_than_calibrated():
    """The calibrated model says drafting pays at batch 16; measured drafting steps take 2x the
    prediction, plain steps as predicted: after a few such steps the plan is a plain step."""
    base, _, _, _ = _hooks()
    model = StepCostModel(target=[(1, 0.05), (16, 0.06), (64, 0.09)], draft_pass=[(1, 0.001), (64, 0.004)],
                          draft_head=[(1, 0.001), (64, 0.004)], draft_forward=[(1, 0.001), (64, 0.004)])
    sched = FakeScheduler(_opts(), 3, model, 16)
    planner = sched._bebop_draft_planner
    out = sched.output()
    base(sched, out)
    assert out.num_spec_tokens_to_schedule > 0  # drafting predicted to pay

    def run_step(out, slowdown):
        spec = {r: [7] * planner.lengths.get(r, 0) for r in out.num_scheduled_tokens if planner.lengths.get(r, 0)}
        out.scheduled_spec_decode_tokens = spec
        out.total_num_scheduled_tokens = len(out.num_scheduled_tokens) + sum(map(len, spec.values()))
        predicted = model.step_seconds(out.total_num_scheduled_tokens, out.num_spec_tokens_to_schedule, 16)
        planner.observe_step_time(out, out._bebop_scheduled_at + predicted * slowdown)
        planner._last_update_end = 0.0

    kinds = []
    for _ in range(12):
        kinds.append(out.num_spec_tokens_to_schedule > 0)
        run_step(out, 2.0 if out.num_spec_tokens_to_schedule else 1.0)
        out = sched.output()
        base(sched, out)
    # 3 drafting steps measure drafting; from then on the corrected model says plain: no more
    # drafting (plain steps are measured as they run; until then the drafting ratio stands in)
    assert kinds[:3] == [True] * 3 and not any(kinds[3:])
    assert out.num_spec_tokens_to_schedule == 0
    # whole drafting steps took 2x, all at one depth: the data cannot split a per-step part from a
    # per-depth scale, so the scale stays at the calibrated 1 and the per-step part takes the rest
    overhead, scale, _ = planner.correction.fit((planner.correction.bucket(16), True))
    assert overhead > 0.05 and scale == pytest.approx(1.0)
    assert planner.correction.factor(16, False) == pytest.approx(1.0)
    assert planner.correction.ratios[(planner.correction.bucket(16), False)][1] >= 3  # plain steps measured
    # a prefill in the step: not observed
    before = dict(planner.correction.ratios)
    out.scheduled_spec_decode_tokens, out.total_num_scheduled_tokens = {}, 16 + 100
    planner.observe_step_time(out, out._bebop_scheduled_at + 5.0)
    assert planner.correction.ratios == before


@pytest.mark.parametrize("reprobe_after", [128, 10**9])
def test_planner_drafts_again_after_a_transient_slowdown(reprobe_after):
    """The first three drafting steps run 10x their prediction (a cold start, another engine
    starting on the same cores: seen in `./run demo`, where it switched drafting off for the
    whole run); from then on every step runs as calibrated. The planner stops drafting, and
    once ``reprobe_after`` plain steps have passed it measures drafting afresh and drafts
    again. Negative control: without re-probing (10**9) drafting never comes back."""
    from bebop_vllm.draft_policy import StepTimeCorrection

    base, _, _, _ = _hooks()
    model = StepCostModel(target=[(1, 0.05), (16, 0.06), (64, 0.09)], draft_pass=[(1, 0.001), (64, 0.004)],
                          draft_head=[(1, 0.001), (64, 0.004)], draft_forward=[(1, 0.001), (64, 0.004)])
    sched = FakeScheduler(_opts(), 3, model, 16)
    planner = sched._bebop_draft_planner
    planner.correction = StepTimeCorrection(reprobe_after=reprobe_after)
    kinds, slow_left = [], 3
    out = sched.output()
    base(sched, out)
    for _ in range(400):
        drafting = out.num_spec_tokens_to_schedule > 0
        kinds.append(drafting)
        spec = {r: [7] * planner.lengths.get(r, 0) for r in out.num_scheduled_tokens if planner.lengths.get(r, 0)}
        out.scheduled_spec_decode_tokens = spec
        out.total_num_scheduled_tokens = len(out.num_scheduled_tokens) + sum(map(len, spec.values()))
        predicted = model.step_seconds(out.total_num_scheduled_tokens, out.num_spec_tokens_to_schedule, 16)
        slowdown = 10.0 if drafting and slow_left > 0 else 1.0
        slow_left -= drafting
        planner.observe_step_time(out, out._bebop_scheduled_at + predicted * slowdown)
        planner._last_update_end = 0.0
        out = sched.output()
        base(sched, out)
    assert kinds[:3] == [True] * 3 and not any(kinds[3:100])  # priced out by the slow steps
    if reprobe_after > len(kinds):
        assert not any(kinds[3:])
        return
    assert kinds.index(True, 3) <= 3 + reprobe_after + 3 + 1  # plain steps, then the drafting re-probe
    # measured afresh, drafting pays again: the plan drafts, but for the plain kind's own
    # re-measurement (3 steps per reprobe_after)
    assert sum(kinds[-200:]) >= 200 - 2 * 3
    assert planner.correction.factor(16, True) == pytest.approx(1.0, rel=0.05)


def test_step_cost_key_is_the_same_in_the_worker_and_the_scheduler_process(monkeypatch):
    """vLLM's CPU worker sets its own thread count and OMP_NUM_THREADS after it starts; the
    scheduler (another process with the multiprocess executor) must still find its calibration."""
    import torch

    from bebop_vllm.step_cost import machine_id

    before = machine_id()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        monkeypatch.setenv("OMP_NUM_THREADS", "7")
        assert machine_id() == before
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0")  # a setting both processes inherit: part of the key
    assert machine_id() != before


def test_crowded_batch_does_not_draft_into_a_calibrated_dip():
    """The calibration this project's CPU wrote before the RL-shaped rollout ran 0.69x plain:
    128 and 256 target tokens both timed 152.85 ms (a dip, clamped flat). With 200 requests in
    flight the flat segment made 56 drafts look free; dropping the dip prices them."""
    ms = 1e-3
    model = StepCostModel(
        target=[(1, 26.51 * ms), (2, 28.90 * ms), (4, 29.65 * ms), (8, 29.65 * ms), (16, 36.66 * ms),
                (32, 36.66 * ms), (64, 92.46 * ms), (128, 152.85 * ms), (256, 152.85 * ms), (512, 599.14 * ms)],
        draft_pass=[(1, 0.86 * ms), (2, 0.86 * ms)], draft_head=[(1, 0.62 * ms), (2, 0.64 * ms)],
        draft_forward=[(1, 0.88 * ms), (8, 1.00 * ms), (64, 1.45 * ms)])
    crowd = plan_draft_lengths([0.5] * 200, 3, model.for_batch(200), min_gain=0.03)
    assert crowd.depths == 0 and sum(crowd.lengths) == 0
    # negative control: the same model with the dip clamped flat (the old curves) drafts
    flat = [(128, 152.85 * ms), (256, 152.85 * ms)] + [p for p in model.target if p[0] > 256]
    flat = [p for p in model.target if p[0] < 128] + flat

    def flat_cost(tokens: int, depths: int) -> float:
        return model.for_batch(200)(tokens, depths) - interpolate(model.target, tokens) + interpolate(flat, tokens)

    assert sum(plan_draft_lengths([0.5] * 200, 3, flat_cost, min_gain=0.03).lengths) > 0
    # the tail still drafts: one request, the same curves
    assert plan_draft_lengths([0.5], 3, model.for_batch(1), min_gain=0.03).lengths[0] >= 2


@pytest.mark.parametrize("speed", [0.5, 1.2])
def test_planner_drops_a_calibration_made_under_contention(tmp_path, caplog, speed):
    """Plain steps that run at 0.5x the model's prediction (a calibration made while another
    engine started on the same cores) remove the model's cache file so the next engine start
    calibrates afresh; steps at 1.2x (healthy: the real step adds scheduler and sampler) keep it."""
    import logging

    from bebop_vllm.step_cost import StepCostModel as Model

    cache = tmp_path / "calibration.json"
    model = Model(target=[(1, 0.05), (16, 0.06)], draft_pass=[(1, 0.001), (16, 0.002)],
                  draft_head=[(1, 0.001), (16, 0.002)], draft_forward=[(1, 0.001), (16, 0.002)])
    model.save(cache)
    model = Model.from_json(json.loads(cache.read_text()), source=f"cache:{cache}")
    sched = FakeScheduler(_opts(), 3, model, 1)
    planner = sched._bebop_draft_planner
    with caplog.at_level(logging.WARNING, logger="vllm.bebop.draft_length"):
        for _ in range(3):
            out = sched.output()
            out.num_spec_tokens_to_schedule, out.total_num_scheduled_tokens = 0, 1
            out._bebop_scheduled_at = 100.0
            planner.observe_step_time(out, 100.0 + speed * model.step_seconds(1, 0, 1))
    assert cache.is_file() == (speed > 1.0)
    assert ("calibrates afresh" in caplog.text) == (speed < 1.0)
    user = Model.from_json(json.loads(json.dumps(model.to_json())), source=f"file:{cache}")
    from bebop_vllm.step_cost import forget

    assert forget(user) is None  # a user's step_cost_file is never removed
