"""Plugin registration, patches, option validation and bad input - no engine start (seconds).

Bad speculative configs must fail in ``EngineArgs.create_engine_config`` (what ``LLM(...)`` and
the OpenAI server both call before starting an engine) with one clear BebopSpecError.
"""

from __future__ import annotations

import json
import shutil
import types
from pathlib import Path

import pytest
import torch

from bebop_vllm.config import BebopSpecError, parse_options
from bebop_vllm.paths import default_model_dir


@pytest.fixture(scope="module")
def registered():
    from bebop_vllm.plugin import register

    register()
    return True


@pytest.fixture(scope="module")
def heads(tmp_path_factory) -> Path:
    from bebop_vllm.heads import init_random_heads

    if not (default_model_dir() / "config.json").is_file():
        pytest.fail(f"default model missing at {default_model_dir()}: run `bebop fetch-model` first")
    return init_random_heads(default_model_dir(), tmp_path_factory.mktemp("heads") / "h", num_depths=2, seed=0)


def _engine_config(spec, **kw):
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(model=str(default_model_dir()), max_model_len=256, enforce_eager=True,
                      speculative_config=spec, **kw)
    return args, args.create_engine_config()


# ---------------------------------------------------------------- registration & version


def test_register_is_idempotent_and_applies_every_patch(registered):
    from vllm import ModelRegistry

    from bebop_vllm.plugin import register
    from bebop_vllm.plugin.patches import PATCHES

    register()
    register()
    assert {"BebopMTPModel", "EagleBebopMTPModel"} <= set(ModelRegistry.get_supported_archs())
    names = [p.name for p in PATCHES]
    assert len(names) == len(set(names))
    assert {"speculative_config", "cpu_expand_fix", "model_runner", "draft_sampling", "runner_v2_guard"} <= set(names)
    for p in PATCHES:
        assert p.applied == p.needed(), p.name  # cpu_expand_fix: CPU hosts only
        assert "0.32.0" in p.upstream and ".py:" in p.upstream, p.upstream


def test_version_check_refuses_other_versions():
    from bebop_vllm.plugin.version import UnsupportedVLLMVersion, check_vllm_version

    assert check_vllm_version().startswith("0.32.0")
    assert check_vllm_version("0.32.0+cpu") == "0.32.0+cpu"
    with pytest.raises(UnsupportedVLLMVersion, match=r"written for vLLM 0\.32\.0.*found vLLM 0\.33\.1"):
        check_vllm_version("0.33.1")


def test_patch_fails_loudly_on_changed_signature():
    from bebop_vllm.plugin.patches.base import Patch, PatchError

    mod = types.ModuleType("fake_vllm_mod")
    mod.f = lambda a, b: a + b
    import sys

    sys.modules["fake_vllm_mod"] = mod
    try:
        bad = Patch(name="t", upstream="fake.py:1 f (vLLM 0.32.0)", module="fake_vllm_mod", attr="f",
                    expected_params=("a", "b", "c"), make_replacement=lambda orig: orig)
        with pytest.raises(PatchError, match=r"has parameters \('a', 'b'\), expected \('a', 'b', 'c'\)"):
            bad.apply()
        missing = Patch(name="t2", upstream="fake.py:2 g", module="fake_vllm_mod", attr="g",
                        make_replacement=lambda orig: orig)
        with pytest.raises(PatchError, match="fake_vllm_mod.g not found"):
            missing.apply()
        good = Patch(name="t3", upstream="fake.py:1 f", module="fake_vllm_mod", attr="f",
                     expected_params=("a", "b"), make_replacement=lambda orig: (lambda a, b: orig(a, b) * 10))
        good.apply()
        good.apply()  # idempotent: not wrapped twice
        assert mod.f(1, 2) == 30
    finally:
        del sys.modules["fake_vllm_mod"]


# ---------------------------------------------------------------- CPU expand fix


def test_cpu_expand_fix_matches_repeat_interleave(registered):
    from vllm.v1.sample import rejection_sampler as rs

    from bebop_vllm.plugin.patches.cpu_expand_fix import expand_batch_to_tokens

    assert rs.expand_batch_to_tokens.__bebop_patch__ == "cpu_expand_fix"
    temps = torch.tensor([0.0, 0.7, 1.3], dtype=torch.float32)
    cu = torch.tensor([2, 2, 5], dtype=torch.int32)  # second request has no draft tokens
    out = rs.expand_batch_to_tokens(temps, cu, 5, replace_from=0, replace_to=1)
    assert out.tolist() == pytest.approx([1.0, 1.0, 1.3, 1.3, 1.3])
    topk = torch.tensor([5, 7, 9], dtype=torch.int32)
    assert expand_batch_to_tokens(topk, cu, 5).tolist() == [5, 5, 9, 9, 9]
    assert expand_batch_to_tokens(topk, cu, 5).dtype == torch.int32


# ---------------------------------------------------------------- draft sampling


def _meta(temperature, top_k=None, top_p=None, generators=None):
    return types.SimpleNamespace(temperature=temperature, top_k=top_k, top_p=top_p, generators=generators or {},
                                 all_greedy=False, all_random=False)


def test_draft_sampling_uses_request_top_k_top_p_and_seeds(registered):
    from bebop_vllm.plugin.patches.draft_sampling import request_distribution_sample

    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    meta = _meta(torch.tensor([1.0, 0.0, 0.5]), top_k=torch.tensor([5, 50, 50]), top_p=torch.tensor([1.0, 1.0, 0.5]))
    ids, probs = request_distribution_sample(logits.clone(), meta)
    assert torch.allclose(probs.sum(-1), torch.ones(3))
    assert (probs[0] > 0).sum() == 5  # top-k 5 applied to the draft distribution
    assert ids[1] == logits[1].argmax()  # greedy row drafts greedily
    expected2 = torch.softmax(logits[2] / 0.5, -1)
    kept = probs[2] > 0
    assert expected2[kept].sum() >= 0.5 and kept.sum() < 50  # top-p 0.5 nucleus
    assert torch.allclose(probs[2][kept], expected2[kept] / expected2[kept].sum(), atol=1e-6)
    # Seeded rows are reproducible.
    draws = []
    for _ in range(2):
        gen = torch.Generator().manual_seed(7)
        meta = _meta(torch.tensor([1.0] * 3), generators={0: gen, 2: torch.Generator().manual_seed(8)})
        logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
        draws.append(request_distribution_sample(logits, meta)[0])
    assert draws[0][0] == draws[1][0] and draws[0][2] == draws[1][2]


def test_draft_sampling_distribution_is_the_request_distribution(registered):
    from bebop_vllm.plugin.patches.draft_sampling import request_distribution_sample

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(20000, 1)
    meta = _meta(torch.full((20000,), 0.7), top_k=torch.full((20000,), 3))
    ids, probs = request_distribution_sample(logits, meta)
    want = torch.softmax(torch.tensor([2.0, 1.0, 0.0]) / 0.7, -1)
    freq = torch.bincount(ids, minlength=4).float() / 20000
    assert freq[3] == 0
    assert torch.allclose(freq[:3], want, atol=0.015)


# ---------------------------------------------------------------- options & bad input


def test_options_defaults_and_errors():
    opts = parse_options({"method": "bebop", "num-speculative-tokens": 2})
    assert (opts.draft_sampling, opts.verifier, opts.metrics, opts.num_speculative_tokens) == (
        "probabilistic", "bebop", "summary", 2)
    with pytest.raises(BebopSpecError, match=r"unknown key 'draft_temperature'; valid keys: method, model, "
                                             r"num_speculative_tokens, draft_sampling, verifier, metrics"):
        parse_options({"method": "bebop", "draft_temperature": 1})
    with pytest.raises(BebopSpecError, match=r"draft_sampling='topk'.*'probabilistic' or 'greedy'"):
        parse_options({"method": "bebop", "draft_sampling": "topk"})
    with pytest.raises(BebopSpecError, match=r"verifier='fast'.*'bebop' or 'vllm'"):
        parse_options({"method": "bebop", "verifier": "fast"})
    with pytest.raises(BebopSpecError, match=r"num_speculative_tokens=0"):
        parse_options({"method": "bebop", "num_speculative_tokens": 0})


def test_engine_config_translation(registered, heads):
    args, cfg = _engine_config({"method": "bebop", "model": str(heads), "draft_sampling": "greedy",
                                "verifier": "vllm", "metrics": "detailed"})
    spec = cfg.speculative_config
    assert spec.method == "eagle" and spec.num_speculative_tokens == 2  # default: the heads' depth g
    assert spec.draft_sample_method == "greedy"
    assert spec.draft_model_config.architectures == ["EagleBebopMTPModel"]
    assert cfg.additional_config["bebop"] == {"method": "bebop", "model": str(heads), "num_speculative_tokens": 2,
                                              "draft_sampling": "greedy", "verifier": "vllm", "metrics": "detailed",
                                              "draft_length": "auto", "acceptance_fit": None,
                                              "draft_token_cost": 0.1, "draft_min_gain": 0.03,
                                              "step_cost_file": None, "draft_vocab_size": None}
    assert cfg.observability_config.per_request_spec_decode_metrics == "detailed"
    assert not cfg.use_v2_model_runner  # our verifier lives in the V1 runner


def test_per_request_draft_length_uses_vllm_dynamic_speculation(registered, heads):
    """auto (the default) and entropy switch on vLLM's dynamic-K machinery; fixed does not."""
    for extra in ({}, {"draft_length": "entropy", "acceptance_fit": [0.9, -0.2]}):
        _, cfg = _engine_config({"method": "bebop", "model": str(heads), **extra}, async_scheduling=True)
        assert cfg.speculative_config.num_speculative_tokens_per_batch_size == [(1, 1 << 30, 2)]
        # no longer an error (the entropy policy used to need synchronous scheduling); vLLM's CPU
        # platform turns async scheduling off by itself
    _, cfg = _engine_config({"method": "bebop", "model": str(heads), "draft_length": "fixed"})
    assert cfg.speculative_config.num_speculative_tokens_per_batch_size is None
    with pytest.raises(BebopSpecError, match=r"draft_length='entropy' needs acceptance_fit=\[a, b\]"):
        _engine_config({"method": "bebop", "model": str(heads), "draft_length": "entropy"})
    with pytest.raises(BebopSpecError, match=r"step_cost_file='/nonexistent.json' does not exist"):
        _engine_config({"method": "bebop", "model": str(heads), "step_cost_file": "/nonexistent.json"})


def test_draft_vocab_size_is_checked_before_engine_start(registered, heads, tmp_path):
    import numpy as np

    from bebop_vllm.draft_vocab import write_draft_vocab

    h = tmp_path / "h"
    shutil.copytree(heads, h)
    spec = {"method": "bebop", "model": str(h), "draft_vocab_size": 64}
    with pytest.raises(BebopSpecError, match=r"draft_vocab_size=64 needs .*draft_vocab\.json: write it with "
                                             r"`bebop draft-vocab"):
        _engine_config(spec)
    counts = np.zeros(49152, dtype=np.int64)
    counts[:100] = np.arange(100, 0, -1)
    write_draft_vocab(h, counts, np.zeros_like(counts), {"test": True})
    _, cfg = _engine_config(spec)
    assert cfg.additional_config["bebop"]["draft_vocab_size"] == 64
    with pytest.raises(BebopSpecError, match=r"draft_vocab_size=101: .* ranks 100 tokens .* choose 1\.\.100"):
        _engine_config(dict(spec, draft_vocab_size=101))
    with pytest.raises(BebopSpecError, match=r"draft_vocab_size=0"):
        _engine_config(dict(spec, draft_vocab_size=0))
    write_draft_vocab(h, counts[:1000], np.zeros(1000, dtype=np.int64), {"test": True})
    with pytest.raises(BebopSpecError, match=r"built for a vocabulary of 1000 tokens; the target has 49152"):
        _engine_config(spec)


def test_non_bebop_configs_untouched(registered):
    _, cfg = _engine_config(None)
    assert cfg.speculative_config is None and "bebop" not in (cfg.additional_config or {})


def test_cpu_bebop_engines_default_to_32_token_kv_blocks(registered, heads):
    """On CPU a bebop engine gets 32-token KV blocks unless the user chose a size; plain keeps vLLM's 128."""
    from vllm.platforms import current_platform

    from bebop_vllm.plugin.patches.cpu_block_size import BEBOP_CPU_BLOCK_SIZE, VLLM_CPU_DEFAULT_BLOCK_SIZE

    spec = {"method": "bebop", "model": str(heads)}
    plain = _engine_config(None)[1].cache_config.block_size
    bebop = _engine_config(spec)[1].cache_config.block_size
    if not current_platform.is_cpu():
        assert bebop == plain  # the patch applies on CPU hosts only: vLLM's own choice stands
        return
    assert plain == VLLM_CPU_DEFAULT_BLOCK_SIZE == 128
    assert bebop == BEBOP_CPU_BLOCK_SIZE == 32
    assert _engine_config({"method": "eagle", "model": str(heads), "num_speculative_tokens": 2}
                          )[1].cache_config.block_size == 128  # vLLM's own EAGLE: untouched
    for chosen in (128, 64):
        assert _engine_config(spec, block_size=chosen)[1].cache_config.block_size == chosen


@pytest.mark.parametrize(
    "mutate, message",
    [
        ("missing", r"heads folder .* does not exist"),
        ("no_weights", r"has no model\.safetensors"),
        ("corrupt_weights", r"not a valid safetensors file"),
        ("corrupt_config", r"config\.json is not valid JSON"),
        ("other_hidden", r"made for a model with hidden_size=640, but the target model has hidden_size=576"),
        ("other_tokenizer", r"tokenizer fingerprint"),
        ("not_heads", r"expected \['BebopMTPModel'\]"),
    ],
)
def test_bad_heads_fail_before_engine_start(registered, heads, tmp_path, mutate, message):
    bad = tmp_path / "bad"
    if mutate != "missing":
        shutil.copytree(heads, bad)
    if mutate == "no_weights":
        (bad / "model.safetensors").unlink()
    elif mutate == "corrupt_weights":
        (bad / "model.safetensors").write_bytes(b"\x00" * 64)
    elif mutate == "corrupt_config":
        (bad / "config.json").write_text("{not json")
    elif mutate in ("other_hidden", "not_heads"):
        cfg = json.loads((bad / "config.json").read_text())
        if mutate == "other_hidden":
            cfg["hidden_size"] = 640
        else:
            cfg["architectures"] = ["LlamaForCausalLM"]
        (bad / "config.json").write_text(json.dumps(cfg))
    elif mutate == "other_tokenizer":
        meta = json.loads((bad / "bebop.json").read_text())
        meta["tokenizer_fingerprint"] = "sha256:" + "0" * 64
        (bad / "bebop.json").write_text(json.dumps(meta))
    with pytest.raises(BebopSpecError, match=message):
        _engine_config({"method": "bebop", "model": str(bad)})


def test_invalid_option_fails_before_engine_start(registered, heads):
    with pytest.raises(BebopSpecError, match=r"unknown key 'k'"):
        _engine_config({"method": "bebop", "model": str(heads), "k": 3})


def test_model_required_for_non_default_target(registered, tmp_path):
    from bebop_vllm.plugin.patches.speculative_config import translate

    args = types.SimpleNamespace(speculative_config={"method": "bebop"}, spec_method=None,
                                 additional_config={}, per_request_spec_decode_metrics="none")
    target = types.SimpleNamespace(model=str(tmp_path), hf_config=None)
    with pytest.raises(BebopSpecError, match=r"speculative_config\['model'\] \(the heads folder\) is required"):
        translate(args, target)


def test_forcing_model_runner_v2_is_refused(registered, heads, monkeypatch):
    import vllm.envs as envs

    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    if hasattr(envs, "disable_envs_cache"):
        envs.disable_envs_cache()
    with pytest.raises(BebopSpecError, match="VLLM_USE_V2_MODEL_RUNNER=1 forces V2"):
        _engine_config({"method": "bebop", "model": str(heads)})
