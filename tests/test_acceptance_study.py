"""The acceptance study (docs/study.md): its statistics, its teacher-forced acceptance against the
heads' slow reference drafting, its verdict rules, and the ``--quick`` pipeline end to end."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from study import fits  # noqa: E402
from study.analytic import SequenceInput, head_stats, sequence_stats  # noqa: E402
from study.summarize import claim1, claim2, claim3  # noqa: E402

VERDICTS = {"confirmed", "partly", "not on our model", "not tested"}


def test_linfit_recovers_a_known_line_and_reports_no_fit_for_noise() -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 3, 200)
    f = fits.linfit(x, 0.8 - 0.1 * x + rng.normal(0, 0.01, 200))
    assert abs(f["slope"] + 0.1) < 0.005 and abs(f["intercept"] - 0.8) < 0.01
    assert f["r2"] > 0.95 and f["p_value"] < 1e-10
    noise = fits.linfit(x, rng.normal(0, 1, 200))
    assert noise["r2"] < 0.05
    assert math.isnan(fits.linfit([1, 1, 1], [1, 2, 3])["slope"]), "a constant x has no slope"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    from bebop_vllm.heads import init_random_heads, load_heads
    from bebop_vllm.heads.target import load_target_model
    from bebop_vllm.heads.tiny import make_tiny_target

    d = tmp_path_factory.mktemp("tiny")
    target_dir = make_tiny_target(d / "target")
    init_random_heads(target_dir, d / "head", num_depths=3, seed=1)
    return load_target_model(target_dir), load_heads(d / "head", target_dir)


@pytest.mark.parametrize("temperature", [0.6, 1.0, 1.3])
def test_teacher_forced_acceptance_matches_sequential_reference_drafting(tiny, temperature: float) -> None:  # noqa: ANN001
    """alpha per depth and E[tau] from the study equal an independent computation: the heads'
    slow KV-cached reference drafting per chain (draft_chain_probs) against the target model's
    own logits, for probabilistic (sum min(p, q)) and greedy (p(argmax q)) drafting."""
    from bebop_vllm.heads.reference import draft_chain_probs
    from bebop_vllm.heads.target import final_hidden_states

    target, head = tiny
    g = 3
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 128, (30,), generator=gen).tolist()
    plen = 9
    hidden = final_hidden_states(target, torch.tensor([tokens]))[0]
    st = head_stats(head, SequenceInput(tokens, plen, temperature), hidden, g)
    assert st is not None

    ids = torch.tensor([tokens])
    p_all = torch.softmax(target(ids).logits[0].float() / temperature, dim=-1)  # p(. | x_<=i) at row i
    length = len(tokens)
    sums = {m: np.zeros(g) for m in ("probabilistic", "greedy")}
    counts = np.zeros(g)
    taus: dict[str, list[float]] = {"probabilistic": [], "greedy": []}
    for t in range(plen - 1, length - 1):
        depths = min(g, length - 1 - t)
        q = draft_chain_probs(head, hidden, tokens[: t + 2], tokens[t + 2 : t + 1 + depths], temperature)[:depths]
        p = p_all[t + 1 : t + 1 + depths]
        a = {"probabilistic": torch.minimum(p, q).sum(-1), "greedy": p.gather(-1, q.argmax(-1, keepdim=True))[:, 0]}
        counts[:depths] += 1
        for m in sums:
            sums[m][:depths] += a[m].double().numpy()
            if depths == g:
                taus[m].append(1 + float(torch.cumprod(a[m].double(), 0).sum()))
    for m in sums:
        np.testing.assert_allclose(st[m]["alpha_count"], counts)
        np.testing.assert_allclose(st[m]["alpha_sum"], sums[m], rtol=2e-4, atol=2e-5)
        assert st[m]["tau_count"] == len(taus[m])
        assert st[m]["tau"] == pytest.approx(float(np.mean(taus[m])), rel=2e-4)
        assert st[m]["acceptance"] == pytest.approx((st[m]["tau"] - 1) / g)
    h_ref = -(p_all[plen : length] * torch.log(p_all[plen : length].clamp_min(1e-30))).sum(-1).mean()
    assert st["entropy"] == pytest.approx(float(h_ref), rel=1e-4)


def test_greedy_acceptance_never_exceeds_the_max_probability(tiny) -> None:  # noqa: ANN001
    target, head = tiny
    tokens = torch.randint(0, 128, (40,), generator=torch.Generator().manual_seed(5)).tolist()
    st = sequence_stats(target, {"h": head}, SequenceInput(tokens, 5, 0.8), 3)["h"]
    bins = st["bins"]
    assert sum(bins["count"]) == st["num_chains"]
    assert all(g <= pm + 1e-6 for g, pm in zip(bins["alpha_greedy"], bins["pmax"], strict=True))
    assert st["greedy"]["alpha"][0] <= st["pmax"] + 1e-6


@pytest.fixture(scope="module")
def tiny_aux(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """A 3-layer tiny target and head folders: ``plain`` (random), ``zero`` (+ aux layers 1, 2 by
    ``add_aux_layers``: aux_fc zero), ``random`` (layers 1, 2, random aux_fc), ``upper`` (layer 2,
    random aux_fc). Returns (target model, target dir, {name: head folder})."""
    from bebop_vllm.heads import init_random_heads, load_heads, save_heads
    from bebop_vllm.heads.checkpoint import add_aux_layers
    from bebop_vllm.heads.target import load_target_model, read_target_config
    from bebop_vllm.heads.tiny import make_tiny_target

    d = tmp_path_factory.mktemp("tiny-aux")
    target_dir = make_tiny_target(d / "target", num_layers=3)
    init_random_heads(target_dir, d / "plain", num_depths=3, seed=1)
    plain = load_heads(d / "plain", target_dir)
    dirs = {"plain": d / "plain"}
    gen = torch.Generator().manual_seed(0)
    for name, ids in (("zero", (1, 2)), ("random", (1, 2)), ("upper", (2,))):
        head = add_aux_layers(plain, ids, target_dir)
        if name != "zero":
            with torch.no_grad():
                head.aux_fc.weight.normal_(0.0, 0.3, generator=gen)
        dirs[name] = save_heads(head, d / name, read_target_config(target_dir), head.metadata, dtype="fp32")
    return load_target_model(target_dir), target_dir, dirs


def test_aux_heads_read_their_own_layers_at_depth_one_only(tiny_aux) -> None:  # noqa: ANN001
    """sequence_stats on heads with aux layers: with aux_fc zero exactly the plain head's numbers;
    with a random aux_fc other acceptance but the same target side (entropy); each head's numbers
    equal its chains fed [its layers' residual streams, h] built by hand from the target's
    hidden_states; hidden states without the aux streams are refused by name."""
    from bebop_vllm.errors import BebopError
    from bebop_vllm.heads import load_heads

    target, target_dir, dirs = tiny_aux
    heads = {name: load_heads(d, target_dir) for name, d in dirs.items()}
    tokens = torch.randint(0, 128, (30,), generator=torch.Generator().manual_seed(3)).tolist()
    seq = SequenceInput(tokens, 9, 0.8)
    st = sequence_stats(target, heads, seq, 3)
    assert st["zero"] == st["plain"]
    for name in ("random", "upper"):
        a, b = st[name]["probabilistic"]["alpha"], st["plain"]["probabilistic"]["alpha"]
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) > 1e-3, name
        assert st[name]["entropy"] == st["plain"]["entropy"]
    out = target.model(input_ids=torch.tensor([tokens]), output_hidden_states=True)
    h, streams = out.last_hidden_state[0], out.hidden_states  # streams[i]: after layer i - 1
    for name, ids in (("random", (1, 2)), ("upper", (2,))):
        reads = torch.cat([*(streams[i][0] for i in ids), h], dim=-1)
        assert head_stats(heads[name], seq, h, 3, head_input=reads) == st[name], name
    aux = {i: streams[i][0] for i in (1, 2)}
    assert sequence_stats(target, heads, seq, 3, hidden=h, aux=aux) == st
    with pytest.raises(BebopError, match=r"reads the target's aux layers \[2\]; no residual stream was given for"):
        sequence_stats(target, {"upper": heads["upper"]}, seq, 3, hidden=h)


def test_analyzer_caches_the_aux_streams_its_heads_read(tiny_aux, tmp_path: Path) -> None:  # noqa: ANN001
    """The study's Analyzer keeps the union of its heads' aux layers next to the hidden states
    (a file of its own); cached, prefilled and fresh passes give the same numbers; a cache written
    before aux heads (hidden states only) still loads and gains the aux file; an analyzer of plain
    heads writes the hidden states only, as before."""
    from acceptance_study import Analyzer
    from study.common import StudyConfig

    target, target_dir, dirs = tiny_aux

    def analyzer(names: list[str]) -> Analyzer:
        cfg = StudyConfig(
            model_dir=str(target_dir), heads={n: str(dirs[n]) for n in names}, primary=names[0], domains=["x"],
            prompts_per_domain=1, max_prompt_tokens=64, max_new_tokens=32, temperatures=[0.8],
            compare_temperatures=[0.8], num_depths=3, seed=0, engine=False, engine_prompts_per_domain=0,
            engine_max_new_tokens=0, engine_temperatures=[], engine_configs=[],
        )
        return Analyzer(cfg, tmp_path / "hidden")

    tokens = torch.randint(0, 128, (30,), generator=torch.Generator().manual_seed(4)).tolist()
    an = analyzer(["plain", "random", "upper"])
    assert an.aux_layer_ids == (1, 2)
    want = sequence_stats(an.target, an.heads, SequenceInput(tokens, 9, 0.8), 3)  # a fresh pass, no cache
    an.prefill_shared(tokens[:9], [("a", tokens[9:]), ("b", tokens[9:20])])
    names = sorted(p.name for p in (tmp_path / "hidden").iterdir())
    assert len(names) == 4 and sum(n.endswith("-aux1_2.pt") for n in names) == 2, names
    got = an.run(tokens, 9, 0.8, ["plain", "random", "upper"], key="a")
    for name in want:  # the prefill ran the prompt once: equal up to float rounding
        assert got[name]["probabilistic"]["alpha"] == pytest.approx(want[name]["probabilistic"]["alpha"], abs=1e-5)
    (h_file,) = (f for f in (tmp_path / "hidden").glob("a-*.pt") if "-aux" not in f.name)
    aux_file = h_file.with_name(h_file.stem + "-aux1_2.pt")
    aux_file.unlink()  # a cache from before aux heads: hidden states only
    hidden, aux = an.states(tokens, "a")
    assert torch.equal(hidden, torch.load(h_file)) and aux_file.is_file()
    streams = target.model(input_ids=torch.tensor([tokens]), output_hidden_states=True).hidden_states
    for i in (1, 2):
        assert torch.equal(torch.load(aux_file)[i], aux[i])
        torch.testing.assert_close(aux[i], streams[i][0])
    assert an.run(tokens, 9, 0.8, ["plain", "random", "upper"], key="a") == sequence_stats(
        an.target, an.heads, SequenceInput(tokens, 9, 0.8), 3, hidden=hidden, aux=aux)
    plain = analyzer(["plain"])
    assert plain.aux_layer_ids == ()
    plain.prefill_shared(tokens[:9], [("c", tokens[9:])])
    assert len(list((tmp_path / "hidden").glob("c-*"))) == 1


def _fit(slope: float, r2: float, p: float, n: int = 50) -> dict:
    return {"n": n, "slope": slope, "intercept": 0.5, "r2": r2, "slope_se": 0.01, "p_value": p}


def test_verdict_rules() -> None:
    strong = {"greedy": {"all": {"acceptance": _fit(-0.1, 0.8, 1e-9)}},
              "probabilistic": {"all": {"acceptance": _fit(-0.02, 0.2, 1e-3)}}}
    assert claim1(strong)["verdict"] == "confirmed" and claim1(strong)["probabilistic_flatter"]
    weak = {"greedy": {"all": {"acceptance": _fit(-0.1, 0.2, 1e-5)}},
            "probabilistic": {"all": {"acceptance": _fit(-0.1, 0.2, 1e-5)}}}
    assert claim1(weak)["verdict"] == "partly"
    flat = {"greedy": {"all": {"acceptance": _fit(0.01, 0.01, 0.6)}},
            "probabilistic": {"all": {"acceptance": _fit(0.0, 0.0, 0.9)}}}
    assert claim1(flat)["verdict"] == "not on our model"

    def row(t: float, gap: float) -> dict:
        return {"temperature": t, "gap_acceptance": gap, "gap_acceptance_se": 0.005}

    assert claim2([row(0.3, 0.02), row(0.7, 0.05), row(1.0, 0.08), row(1.3, 0.12)])["verdict"] == "confirmed"
    assert claim2([row(0.3, 0.05), row(0.7, 0.05), row(1.0, 0.05), row(1.3, 0.05)])["verdict"] == "partly"
    assert claim2([row(0.3, -0.05), row(0.7, -0.06), row(1.0, -0.05), row(1.3, -0.07)])["verdict"] == (
        "not on our model"
    )

    def gains(lo: float, hi: float) -> dict:
        return {"acceptance_probabilistic": {"gain": (lo + hi) / 2, "ci95": [lo, hi], "n": 20}}

    comp = {"1": {"heads": {}, "gains": {"e2e-tv_vs_ce": gains(0.02, 0.1), "e2e-tv_vs_kl": gains(0.01, 0.05)}}}
    assert claim3(comp, ["e2e-tv", "ce", "kl"])["verdict"] == "confirmed"
    comp["1"]["gains"]["e2e-tv_vs_kl"] = gains(-0.05, 0.05)
    assert claim3(comp, ["e2e-tv", "ce", "kl"])["verdict"] == "partly"
    assert claim3(comp, ["e2e-tv"])["verdict"] == "not tested"


@pytest.mark.slow
def test_quick_study_runs_end_to_end_and_resumes(tmp_path: Path) -> None:
    """The whole pipeline (vLLM sampling, analytic acceptance, bebop engines, fits, plots, report)
    on a few prompts; a second run reuses every cached stage and writes the same results."""
    from bebop_vllm.paths import default_model_dir

    assert (default_model_dir() / "config.json").is_file(), "default model not fetched: run ./run setup"
    cmd = [sys.executable, str(REPO / "benchmarks" / "acceptance_study.py"), "--quick", "--out", str(tmp_path)]
    t0 = time.time()
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    wall = time.time() - t0
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    s = json.loads((tmp_path / "study.json").read_text())
    for name, c in s["claims"].items():
        assert c["verdict"] in VERDICTS, name
    failed = [r["config"] for r in s["throughput"] if r.get("error")]
    assert not failed, f"bebop engines failed: {failed}; " + json.dumps(s["throughput"])[:2000]
    assert s["throughput"][0]["config"] == "no speculation" and len(s["throughput"]) >= 3
    for r in s["throughput"][1:]:
        assert r["measured_tau"] is not None and 1.0 <= r["measured_tau"] <= 1 + s["config"]["num_depths"]
    assert len(s["requests"]) >= 3 * len(s["config"]["temperatures"])
    for r in s["requests"]:
        assert 0 <= r["probabilistic_acceptance"] <= 1 and 0 <= r["greedy_acceptance"] <= 1
    for fig in s["figures"]:
        assert (tmp_path / fig).stat().st_size > 5000, fig
    md = (tmp_path / "study.md").read_text()
    assert all(c["verdict"] in md for c in s["claims"].values())
    print(f"--quick wall time: {wall:.0f} s")

    t1 = time.time()
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "[analytic] cached" in second.stdout and "[timed] cached" in second.stdout
    s2 = json.loads((tmp_path / "study.json").read_text())
    assert s2["claims"] == s["claims"] and s2["temperature_sweep"] == s["temperature_sweep"]
    assert time.time() - t1 < wall, "the resumed run must not redo the stages"


def test_default_heads_include_the_default_primary() -> None:
    """The study's default primary (--primary: the shipped heads' name, e.g. v5) must be among the
    heads it discovers; before, only heads named by loss were, and the study silently fell back to
    the first of them (e2e-tv) as primary."""
    from study.common import discover_heads

    from bebop_vllm.paths import SHIPPED_HEADS_DIR

    heads = discover_heads()
    assert heads[SHIPPED_HEADS_DIR.name.removeprefix("smollm2-135m-")] == SHIPPED_HEADS_DIR
    assert "ce" in heads and "kl" in heads  # the loss heads of claim 3 are still there


def test_crosscheck_key_follows_the_timed_results() -> None:
    """The cross-check is computed from the timed stage's results, so its cache key changes with
    them: a rerun after failed engines must not reuse the cross-check of the engines that ran."""
    from study.common import result_key

    partial = {"none": {"timed": []}, "v5-k3": {"timed": [1]}, "kl-k3": {"error": "failed to start"}}
    complete = {**partial, "kl-k3": {"timed": [2]}}
    assert result_key("abc", partial) != result_key("abc", complete)
    assert result_key("abc", complete) == result_key("abc", json.loads(json.dumps(complete)))
    assert result_key("abc", complete) != result_key("abd", complete)


def test_engine_memory_warning_names_the_setting_that_does_not_fit() -> None:
    """Four engines with 2 GiB of KV cache each with ~8 GiB free (what made two of the study's
    engines fail on 2026-12-07) warn and say what to change; the study's own 1 GiB default with
    20 GiB free, or unknown free memory, does not warn."""
    from study.common import engine_memory_warning

    msg = engine_memory_warning(2.0, 4, 8.0)
    assert msg is not None
    assert "VLLM_CPU_KVCACHE_SPACE=2 GiB" in msg and "--engines-at-once" in msg and "14.0 GiB" in msg
    assert engine_memory_warning(1.0, 4, 20.0) is None
    assert engine_memory_warning(2.0, 4, None) is None
