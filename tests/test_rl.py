"""RL support without an engine (issue 13): stats, acceptance monitor, policy-weight validation,
fingerprints, and the two draft-model fixes (lm_head cache after an in-place update, load_weights
ignoring non-head tensors). The engine tests are in test_rl_engine.py."""

from __future__ import annotations

import json
import math
import random
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from bebop_vllm.rl import AcceptanceFit, AcceptanceMonitor, PolicyWeightsError, SequenceRecord, rollout_stats
from bebop_vllm.rl.monitor import crossover
from bebop_vllm.rl.weights import ExpectedPolicy, check_finite, fingerprint, read_policy_specs, tensor_specs


# -- stats ----------------------------------------------------------------------------------------
def _metrics(drafted, accepted, histogram, entropies):
    return SimpleNamespace(num_draft_tokens_per_pos=drafted, num_accepted_tokens_per_pos=accepted,
                           histogram=histogram, token_entropies=entropies)


def _output(*completions):
    return SimpleNamespace(outputs=[SimpleNamespace(token_ids=list(range(n)), spec_decode_metrics=m)
                                    for n, m in completions])


def test_rollout_stats_sums_sequences():
    # seq A: 4 verify steps, k=2: accepted 0,1,2,2 -> per pos accepted [3, 2]; seq B: no speculation.
    a = _metrics([4, 4], [3, 2], [1, 1, 2], [0.5, 1.5, 1.0])  # histogram sum 4 steps; accepted 0+1+4=5
    c = _metrics([2, 2], [1, 0], [1, 1, 0], [2.0])
    outs = [_output((9, a), (5, None)), _output((3, c))]
    s = rollout_stats(outs, seconds=2.0, policy_version="7")
    assert (s.num_prompts, s.num_sequences, s.num_output_tokens) == (2, 3, 17)
    assert s.tokens_per_s == pytest.approx(8.5)
    assert s.drafted_per_position == [6, 6] and s.accepted_per_position == [4, 2]
    assert s.acceptance_per_position == pytest.approx([4 / 6, 2 / 6])
    assert s.acceptance == pytest.approx(6 / 12)
    assert s.num_verify_steps == 6
    assert s.mean_tokens_per_verify_step == pytest.approx(1 + (5 + 1) / 6)
    assert s.mean_target_entropy == pytest.approx((0.5 + 1.5 + 1.0 + 2.0) / 4)
    assert [r.mean_entropy for r in s.sequences] == pytest.approx([1.0, 2.0])
    assert s.policy_version == "7" and "sequences" not in s.to_dict()


def test_rollout_stats_plain_engine():
    s = rollout_stats([_output((4, None))], seconds=1.0)
    assert s.acceptance is None and s.mean_tokens_per_verify_step is None and s.acceptance_per_position == []


# -- monitor --------------------------------------------------------------------------------------
def _synthetic(n, a, b, rng, k=3, drafts=200, shift=0.0, entropy=(0.5, 3.0)):
    """Sequences whose acceptance at position i is (a_i + b_i H) - shift, binomially sampled."""
    recs = []
    for _ in range(n):
        h = rng.uniform(*entropy)
        acc = []
        for i in range(k):
            p = min(1.0, max(0.0, a[i] + b[i] * h - shift))
            acc.append(sum(rng.random() < p for _ in range(drafts)))
        recs.append(SequenceRecord(drafts, drafts, tuple([drafts] * k), tuple(acc), h, drafts))
    return recs


A, B = (0.7, 0.55, 0.45), (-0.12, -0.1, -0.08)


def test_fit_recovers_lines():
    fit = AcceptanceFit.fit(_synthetic(200, A, B, random.Random(0)))
    for i, p in enumerate(fit.positions):
        assert p.intercept == pytest.approx(A[i], abs=0.02) and p.slope == pytest.approx(B[i], abs=0.01)
    assert fit.entropy_range[0] < 0.6 and fit.entropy_range[1] > 2.9
    back = AcceptanceFit.from_dict(json.loads(json.dumps(fit.to_dict())))
    assert back == fit


def test_fit_needs_data():
    with pytest.raises(ValueError, match="needs >= 3"):
        AcceptanceFit.fit(_synthetic(2, A, B, random.Random(0)))


def test_monitor_entropy_shift_is_not_drift():
    """RL lowers entropy and acceptance rises: fresh heads, no drift flag."""
    rng = random.Random(1)
    mon = AcceptanceMonitor(AcceptanceFit.fit(_synthetic(100, A, B, rng)))
    for step in range(5):
        rep = mon.observe(_synthetic(30, A, B, rng, entropy=(0.5, 1.0)), step=step)
        assert not rep.below_fit and not rep.drift
        assert abs(rep.gap) < 0.03 and rep.entropy < 1.0
    assert not mon.drift


def test_monitor_flags_stale_heads_after_patience():
    rng = random.Random(2)
    mon = AcceptanceMonitor(AcceptanceFit.fit(_synthetic(100, A, B, rng)), patience=2)
    first = mon.observe(_synthetic(30, A, B, rng, shift=0.15))
    assert first.below_fit and not first.drift  # one step is not enough
    second = mon.observe(_synthetic(30, A, B, rng, shift=0.15))
    assert second.below_fit and second.drift and mon.drift
    assert second.gap == pytest.approx(0.15, abs=0.03)
    assert all(o < p for o, p in zip(second.observed_per_pos, second.predicted_per_pos, strict=True))
    third = mon.observe(_synthetic(30, A, B, rng))  # recovered
    assert not third.below_fit and not third.drift


def test_monitor_small_gap_within_tolerance():
    rng = random.Random(3)
    mon = AcceptanceMonitor(AcceptanceFit.fit(_synthetic(100, A, B, rng)), tolerance=0.05, patience=1)
    rep = mon.observe(_synthetic(30, A, B, rng, shift=0.02))
    assert not rep.below_fit and rep.threshold >= 0.05


def test_monitor_noise_raises_threshold():
    """Few drafts per step: the cluster-robust se, not the tolerance, decides."""
    rng = random.Random(4)
    mon = AcceptanceMonitor(AcceptanceFit.fit(_synthetic(100, A, B, rng)), tolerance=0.0, z=3.0, patience=1)
    rep = mon.observe(_synthetic(3, A, B, rng, drafts=5))
    assert rep.threshold == pytest.approx(3 * rep.se) and rep.se > 0.02


def test_monitor_extrapolation_and_empty():
    rng = random.Random(5)
    mon = AcceptanceMonitor(AcceptanceFit.fit(_synthetic(50, A, B, rng, entropy=(1.0, 2.0))))
    assert mon.observe(_synthetic(10, A, B, rng, entropy=(3.0, 3.5))).extrapolated
    with pytest.raises(ValueError, match="no sequence"):
        mon.observe([SequenceRecord(3, 0, (0, 0, 0), (0, 0, 0), None, 0)])


def test_greedy_crossover():
    rng = random.Random(6)
    # greedy: better at low entropy, falls faster: crossing at H* = (0.8 - 0.7) / (0.2 - 0.12) = 1.25
    greedy_a, greedy_b = (0.8, 0.65, 0.55), (-0.2, -0.18, -0.16)
    prob = AcceptanceFit.fit(_synthetic(300, A, B, rng))
    greedy = AcceptanceFit.fit(_synthetic(300, greedy_a, greedy_b, rng))
    mon = AcceptanceMonitor(prob, greedy)
    cross = mon.greedy_crossover()
    assert cross[0].entropy == pytest.approx(1.25, abs=0.15)
    assert cross[0].greedy_better == "below" and cross[0].within_fit_range
    assert cross[0].greedy_wins_at(0.6) and not cross[0].greedy_wins_at(2.5)
    low = mon.observe(_synthetic(20, A, B, rng, entropy=(0.5, 0.7)))
    high = mon.observe(_synthetic(20, A, B, rng, entropy=(2.5, 3.0)))
    assert low.greedy_would_win[0] and not high.greedy_would_win[0]


def test_crossover_parallel_lines():
    from bebop_vllm.rl.monitor import PositionFit

    c = crossover(PositionFit(0.5, -0.1, 9, 9, 0), PositionFit(0.4, -0.1, 9, 9, 0), 0, (0, 3))
    assert c.entropy is None and c.greedy_better == "never" and not c.greedy_wins_at(1.0)


def test_fit_from_study(tmp_path):
    reqs = [{"head": "h", "entropy": h, "new_tokens": 100,
             "probabilistic_alpha": [0.6 - 0.1 * h, 0.5, 0.5], "greedy_alpha": [0.7 - 0.2 * h, 0.5, 0.5]}
            for h in (0.5, 1.0, 1.5, 2.0)]
    path = tmp_path / "study.json"
    path.write_text(json.dumps({"config": {"primary": "h"}, "requests": reqs}))
    prob = AcceptanceFit.from_study(path)
    assert prob.positions[0].slope == pytest.approx(-0.1) and prob.positions[0].intercept == pytest.approx(0.6)
    # unconditional rate at depth 2 = alpha1 * alpha2
    assert prob.predict(1, 1.0) == pytest.approx(0.5 * 0.5)
    greedy = AcceptanceFit.from_study(path, mode="greedy")
    assert AcceptanceMonitor(prob, greedy).greedy_crossover()[0].entropy == pytest.approx(1.0)


# -- policy weights -------------------------------------------------------------------------------
def _checkpoint(tmp_path, tied=True):
    d = tmp_path / "model"
    d.mkdir()
    tensors = {"model.embed_tokens.weight": torch.randn(10, 4, dtype=torch.bfloat16),
               "model.layers.0.mlp.up_proj.weight": torch.randn(8, 4, dtype=torch.bfloat16),
               "model.norm.weight": torch.ones(4, dtype=torch.bfloat16)}
    save_file(tensors, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"tie_word_embeddings": tied}))
    return d, tensors


def test_expected_policy_accepts_a_matching_update(tmp_path):
    d, tensors = _checkpoint(tmp_path)
    exp = ExpectedPolicy.from_model_dir(d, torch.bfloat16)
    assert exp.tied_lm_head
    update = {k: v.clone() for k, v in tensors.items()}
    update["lm_head.weight"] = update["model.embed_tokens.weight"]  # HF state_dict of a tied model
    names = exp.validate(tensor_specs(update))
    assert sorted(names) == sorted(tensors)  # the tied lm_head is dropped
    check_finite(update, names)
    # the same from a file
    save_file({k: v for k, v in tensors.items()}, str(tmp_path / "p.safetensors"))
    assert sorted(exp.validate(read_policy_specs([tmp_path / "p.safetensors"]))) == sorted(tensors)


@pytest.mark.parametrize("mutate, match", [
    (lambda u: u.update({"model.layers.9.mlp.up_proj.weight": torch.zeros(8, 4, dtype=torch.bfloat16)}),
     "unknown policy tensor 'model.layers.9.mlp.up_proj.weight'"),
    (lambda u: u.pop("model.norm.weight"), "lacks tensor 'model.norm.weight'"),
    (lambda u: u.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(4, 8, dtype=torch.bfloat16)}),
     r"'model.layers.0.mlp.up_proj.weight' has shape \[4, 8\], the engine's has \[8, 4\]"),
    (lambda u: u.update({"model.norm.weight": torch.ones(4)}),
     "'model.norm.weight' has dtype torch.float32, the engine runs torch.bfloat16"),
    (lambda u: u.update({"lm_head.weight": torch.zeros(3, 4, dtype=torch.bfloat16)}),
     "'lm_head.weight' has shape"),
    (lambda u: u.update({"model.norm.weight": [1.0] * 4}), "'model.norm.weight' is a list"),
])
def test_expected_policy_refuses_bad_input(tmp_path, mutate, match):
    d, tensors = _checkpoint(tmp_path)
    exp = ExpectedPolicy.from_model_dir(d, torch.bfloat16)
    update = dict(tensors)
    mutate(update)
    with pytest.raises(PolicyWeightsError, match=match):
        exp.validate(tensor_specs(update))


def test_untied_checkpoint_refuses_extra_lm_head(tmp_path):
    d, tensors = _checkpoint(tmp_path, tied=False)
    exp = ExpectedPolicy.from_model_dir(d, torch.bfloat16)
    with pytest.raises(PolicyWeightsError, match="unknown policy tensor 'lm_head.weight'"):
        exp.validate(tensor_specs({**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"]}))


def test_nonfinite_refused(tmp_path):
    d, tensors = _checkpoint(tmp_path)
    bad = dict(tensors)
    bad["model.norm.weight"] = torch.tensor([1.0, math.nan, 1.0, 1.0], dtype=torch.bfloat16)
    with pytest.raises(PolicyWeightsError, match="'model.norm.weight' holds NaN"):
        check_finite(bad, list(bad))


def test_fingerprint_is_bit_exact():
    t = {"a": torch.randn(5, dtype=torch.bfloat16), "b": torch.randn(2, 3)}
    fp = fingerprint(t.items())
    assert fp == fingerprint(reversed(list(t.items())))  # order-free
    t2 = {k: v.clone() for k, v in t.items()}
    t2["b"].view(-1)[4] = torch.nextafter(t2["b"].view(-1)[4], torch.tensor(math.inf))
    assert fingerprint(t2.items()) != fp
    assert fingerprint({"a": t["a"].float(), "b": t["b"]}.items()) != fp  # dtype counts


# -- draft model fixes ----------------------------------------------------------------------------
draft_model = pytest.importorskip("bebop_vllm.plugin.draft_model")


def _bare_draft(vocab=64, hidden=8, draft_ids=(3, 1, 7, 20, 33, 40)):
    """A BebopMTPModel without a VllmConfig: only what compute_logits / load_weights touch."""
    m = draft_model.BebopMTPModel.__new__(draft_model.BebopMTPModel)
    nn.Module.__init__(m)
    m.config = SimpleNamespace(vocab_size=vocab, hidden_size=hidden, logit_scale=1.0)
    m.model = nn.Module()
    m.model.fc = nn.Linear(2 * hidden, hidden, bias=False)
    m.model.norm = nn.Module()
    m.model.norm.weight = nn.Parameter(torch.ones(hidden))
    m.model.embed_tokens = nn.Embedding(vocab, hidden)
    m.lm_head = nn.Module()
    m.lm_head.weight = m.model.embed_tokens.weight  # tied, shared by reference like the target's
    m._heads_loaded = False
    ids = list(draft_ids)
    m.register_buffer("draft_vocab_ids", torch.tensor(ids, dtype=torch.long), persistent=False)
    m._draft_lm_head, m._draft_lm_head_key, m._weights_generation = None, None, 0
    n = len(ids)
    probe = sorted({(i * (n - 1)) // (draft_model._PROBE_ROWS - 1) for i in range(draft_model._PROBE_ROWS)})
    m.register_buffer("_probe_rows", torch.tensor(probe, dtype=torch.long), persistent=False)
    return m


def _sub_logits(m, h):
    w = m.lm_head.weight
    return (h @ w[m.draft_vocab_ids].T).detach()


def test_draft_lm_head_cache_follows_in_place_updates():
    torch.manual_seed(0)
    m = _bare_draft(draft_ids=tuple(range(60, 20, -1)))  # 40 draft tokens, 16 of them probed
    h = torch.randn(2, 8)
    ids = m.draft_vocab_ids

    def check():
        with torch.no_grad():
            out = m._draft_lm_head_rows(m.lm_head.weight)
        assert torch.equal(out, m.lm_head.weight[ids].detach())
        assert torch.allclose(h @ out.T, _sub_logits(m, h))

    check()
    first = m._draft_lm_head
    check()
    assert m._draft_lm_head is first  # cached while unchanged
    # vLLM's reload path: param.data.copy_ keeps identity, data_ptr and _version
    w = m.lm_head.weight
    version = w._version
    w.data.copy_(torch.randn_like(w))
    assert w._version == version
    check()  # the probe noticed
    # an update that leaves every probed row alone: only the explicit invalidation catches it
    cached = m._draft_lm_head
    probed = set(m._probe_rows.tolist())
    unprobed = [i for i in range(len(ids)) if i not in probed]
    assert unprobed
    w.data[int(ids[unprobed[0]])] += 1.0
    assert m._draft_lm_head_rows(w) is cached  # stale: the probe cannot see it
    m.invalidate_weight_caches()  # what RolloutEngine.update_policy runs in every worker
    check()
    # a no_grad in-place write bumps _version: noticed without the probe
    with torch.no_grad():
        w[int(ids[unprobed[1]])] += 1.0
    check()
    # a new Parameter object (another loader): noticed by identity
    m.lm_head.weight = nn.Parameter(torch.randn_like(w))
    check()


def test_draft_lm_head_probe_covers_small_vocab():
    m = _bare_draft(draft_ids=(3, 1, 7))
    assert m._probe_rows.tolist() == [0, 1, 2]  # every row is probed when the vocabulary is small
    m._draft_lm_head_rows(m.lm_head.weight)
    m.lm_head.weight.data[7] += 1.0
    assert torch.equal(m._draft_lm_head_rows(m.lm_head.weight), m.lm_head.weight[m.draft_vocab_ids].detach())


def test_load_weights_first_load_strict_then_ignores_policy_tensors(caplog):
    m = _bare_draft()
    heads = {"fc.weight": torch.randn(8, 16), "norm.weight": torch.full((8,), 2.0)}
    with pytest.raises(ValueError, match="unexpected tensor 'model.layers.0.mlp.up_proj.weight'"):
        m.load_weights([*heads.items(), ("model.layers.0.mlp.up_proj.weight", torch.zeros(2))])
    m = _bare_draft()
    with pytest.raises(ValueError, match="lacks tensors"):
        m.load_weights([("fc.weight", heads["fc.weight"])])
    m = _bare_draft()
    loaded = m.load_weights(list(heads.items()))
    assert {"model.fc.weight", "model.norm.weight"} <= loaded
    before = fingerprint([(n, p) for n, p in m.named_parameters() if not n.startswith(("model.embed", "lm_head"))])
    # a SkyRL-style sync pushes the whole policy into the drafter: ignored, one log line, heads unchanged
    policy = [("model.layers.0.mlp.up_proj.weight", torch.zeros(2)), ("model.norm.weight", torch.zeros(8)),
              ("lm_head.weight", torch.zeros(64, 8)), ("model.embed_tokens.weight", torch.zeros(64, 8))]
    with caplog.at_level("INFO", logger=draft_model.__name__):
        m.load_weights(policy)
    after = fingerprint([(n, p) for n, p in m.named_parameters() if not n.startswith(("model.embed", "lm_head"))])
    assert after == before
    lines = [r for r in caplog.records if "ignored" in r.getMessage()]
    assert len(lines) == 1 and "ignored 2 tensors" in lines[0].getMessage()
    assert m.lm_head.weight.abs().sum() > 0  # the shared embedding / lm_head were not written either


def test_worker_extension_heads_fingerprint_excludes_shared():
    from bebop_vllm.rl.worker import BebopRLWorkerExtension, draft_head_parameters

    m = _bare_draft()
    names = [n for n, _ in draft_head_parameters(m)]
    assert names and not any(n.startswith(("lm_head.", "model.embed_tokens.")) for n in names)
    ext = BebopRLWorkerExtension()
    ext.get_draft_model = lambda: m  # type: ignore[attr-defined]
    fp = ext.bebop_heads_fingerprint()
    with torch.no_grad():
        m.lm_head.weight.add_(1.0)  # a policy update: shared tensors move, heads' fingerprint does not
    assert ext.bebop_heads_fingerprint() == fp
    with torch.no_grad():
        m.model.fc.weight.add_(1.0)
    assert ext.bebop_heads_fingerprint() != fp
    assert ext.bebop_invalidate_draft_caches() is True and m._weights_generation == 1


def test_policy_update_syncs_an_aux_heads_copy_of_the_final_norm():
    """Heads with aux layers rebuild h_t with a copy of the target's final-norm weight: a policy
    load copies the new weight in, and the copy is not part of the heads' fingerprint."""
    from bebop_vllm.rl.worker import BebopRLWorkerExtension, draft_head_parameters

    m = _bare_draft()
    m.config.bebop = {"aux_layer_ids": [1]}
    m.model.target_norm = nn.Module()
    m.model.target_norm.weight = nn.Parameter(torch.ones(8))
    assert not any(n.startswith("model.target_norm.") for n, _ in draft_head_parameters(m))
    target = nn.Module()
    target.model = nn.Module()
    target.model.norm = nn.Module()
    target.model.norm.weight = nn.Parameter(torch.arange(8.0))
    ext = BebopRLWorkerExtension()
    ext.get_draft_model = lambda: m  # type: ignore[attr-defined]
    fp = ext.bebop_heads_fingerprint()
    m.sync_target_norm(target)
    assert torch.equal(m.model.target_norm.weight, torch.arange(8.0)) and ext.bebop_heads_fingerprint() == fp
    m.config.bebop = {}  # heads without aux layers have no copy: nothing to sync
    target.model.norm.weight.data.fill_(5.0)
    m.sync_target_norm(target)
    assert torch.equal(m.model.target_norm.weight, torch.arange(8.0))
