"""Exactness of the "bebop" method on CPU with the default model: speculation must not change outputs.

Four engine configurations, each started once, in two child processes (``PROCESS_GROUPS``: the
engines of a group one after the other, each shut down before the next starts): ``plain`` (no
speculation) and ``bebop`` (heads draft probabilistically, our verifier, k drafts every step) get
every request below; ``bebop_auto`` and ``bebop_entropy_vocab`` (the draft-length policies and a
draft vocabulary) get the greedy prompts and the T = 1 case.

- T = 0: token ids identical to non-speculative decoding (also with stop strings, logprobs,
  max_tokens=1 and greedy requests mixed into a random batch).
- T = 1 and T = 0.7 + top-p 0.9: the tokens emitted by the verifier (positions 2-3; position 1
  is sampled before any draft exists) follow the same distribution as without speculation,
  by a two-sample chi-square test (``_assert_same_verifier_distribution``). Its power is stated
  and checked in the same run: ``detectable_tv`` computes, from the plain engine's own sample,
  the smallest total-variation distance the test detects with probability 0.9 at
  ``DIST_SAMPLES`` = 500 per engine (mass moved between the two most likely tokens, the least
  visible simple change; noncentral chi-square). For distributions like these that is a TV of
  roughly 0.09-0.16 (e.g. 0.14 for top masses 0.3 / 0.2 over 11 bins): the test catches gross
  errors (a wrong temperature, an uninitialised one), not subtle ones; exactness at finer
  resolution rests on the kernel-level tests (tests/test_kernels_exactness.py, 10^5-10^6 draws).
  Negative control through the *same helper*: T = 0.85 samples against T = 1 ones from the plain
  engine must fail it. With vLLM's CPU temperature bug re-introduced
  (``BEBOP_DISABLE_PATCHES=cpu_expand_fix``) the bebop-vs-plain test fails.
- Seeded requests are reproducible inside a mixed batch; n > 1 returns n completions.
- ``bebop_auto`` (the default config: ``draft_length="auto"``): per request and step 0..k drafts
  from the step-cost model; greedy outputs (alone and in a crowd of 64, where drafting mostly
  stops) are those of plain decoding, and the T = 1 distribution (sampled 4 requests at a time,
  so that the policy drafts) is unchanged.
- ``bebop_entropy_vocab`` (a fourth engine, the two other non-default options together):
  ``draft_length="entropy"`` with a steep fit, so that per-request draft lengths vary with the
  entropy, and ``draft_vocab_size``: the heads draft among a small vocabulary (the ~100 tokens of
  a short text, so most of the target's mass lies outside it). T = 0 / T = 1 outputs are still
  those of plain decoding, the draft length varies per step, and drafts are still accepted. (One
  engine for both: each engine start costs ~20 s plus its distribution sample ~30 s.)

Heads: ``$BEBOP_TEST_HEADS`` if set, else the shipped heads if present, else random heads.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from engine_subprocess import exit_after_result, run_engine_script
from heads_under_test import heads_under_test

pytestmark = pytest.mark.slow  # starts vLLM engines (subprocesses)

MAX_MODEL_LEN = 512
NUM_SPEC = 3
DIST_SAMPLES = 500  # per distribution case and engine
DIST_TOKENS = 3  # token 1 from the prefill sampler, tokens 2-3 from the verifier
ALPHA = 1e-3  # false-alarm rate per chi-square test

GREEDY_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Question: What is 12 * 7? Answer:",
    "Write a haiku about the sea.\n",
]
DIST_PROMPT = "Once upon a time, in a small village,"


def _req(rid: str, prompt: str, **params) -> dict:
    return {"id": rid, "prompt": prompt, "params": params}


def _requests() -> list[dict]:
    """Every request of the module, as plain dicts (the subprocess builds SamplingParams)."""
    reqs = [_req(f"greedy{i}", p, temperature=0.0, max_tokens=32) for i, p in enumerate(GREEDY_PROMPTS)]
    reqs += [
        _req("stop", GREEDY_PROMPTS[1], temperature=0.0, max_tokens=48, stop=["return"]),
        _req("logprobs", GREEDY_PROMPTS[0], temperature=0.0, max_tokens=12, logprobs=3),
        _req("one", GREEDY_PROMPTS[2], temperature=0.0, max_tokens=1),
        _req("one_random", GREEDY_PROMPTS[2], temperature=1.0, max_tokens=1),
        _req("n4", GREEDY_PROMPTS[3], temperature=1.0, max_tokens=8, n=4),
    ]
    return reqs


AUTO_DIST_CONCURRENCY = 4  # bebop_auto samples the distribution in small batches: the policy drafts there
CROWD = 64  # greedy requests in one batch: the auto policy should mostly stop drafting


def _crowd() -> list[dict]:
    return [_req(f"crowd{i}", GREEDY_PROMPTS[i % len(GREEDY_PROMPTS)] + " " * (i // len(GREEDY_PROMPTS)),
                 temperature=0.0, max_tokens=16) for i in range(CROWD)]


def _mixed_batch() -> list[dict]:
    """One generate() call mixing greedy, random and seeded requests (seeded one twice)."""
    return [
        _req("mixed_greedy0", GREEDY_PROMPTS[0], temperature=0.0, max_tokens=24),
        _req("mixed_seed_a", GREEDY_PROMPTS[3], temperature=1.0, max_tokens=16, seed=1234),
        _req("mixed_random", GREEDY_PROMPTS[1], temperature=0.8, top_p=0.95, max_tokens=24),
        _req("mixed_greedy1", GREEDY_PROMPTS[1], temperature=0.0, max_tokens=24),
        _req("mixed_seed_b", GREEDY_PROMPTS[3], temperature=1.0, max_tokens=16, seed=1234),
    ]


# draft_length="entropy" with a steep fit so that the draft length really varies:
# alpha = 1 - 0.25 H gives 3 drafts below ~1 nat and none above ~3.6 nats.
ENTROPY_POLICY = {"draft_length": "entropy", "acceptance_fit": [1.0, -0.25], "draft_token_cost": 0.1,
                  "metrics": "detailed"}


# a draft vocabulary far smaller than the model's: the tokens of this text
VOCAB_TEXT = " ".join([*GREEDY_PROMPTS, DIST_PROMPT]) + (
    " there lived an old man who had a little house by the river and every day he went to the"
    " market to sell his bread, and the people of the town loved him because he was kind.")


def _write_test_draft_vocab(heads: str, out: Path) -> tuple[str, int]:
    """A copy of ``heads`` with a draft vocabulary made of VOCAB_TEXT's tokens."""
    import shutil

    import numpy as np
    from transformers import AutoTokenizer

    from bebop_vllm.draft_vocab import write_draft_vocab

    shutil.copytree(heads, out)
    tok = AutoTokenizer.from_pretrained(str(_model_dir()))
    counts = np.bincount(tok(VOCAB_TEXT)["input_ids"], minlength=tok.vocab_size).astype(np.int64)
    write_draft_vocab(out, counts, np.zeros_like(counts), {"text": "tests/test_exactness.py VOCAB_TEXT"})
    return str(out), int((counts > 0).sum())


def _dist_cases(engine: str) -> dict[str, dict]:
    if engine in ("bebop_entropy_vocab", "bebop_auto"):
        return {"t1": {"temperature": 1.0}}
    cases = {
        "t1": {"temperature": 1.0},
        "t07p": {"temperature": 0.7, "top_p": 0.9},
    }
    if engine == "plain":
        cases["t085"] = {"temperature": 0.85}  # power check: must be told apart from t1
    return cases


def _worker(engine: str, heads: str, out_path: str, only: str = "") -> None:
    """Subprocess body: one engine, every request, results as JSON.

    ``only`` (diagnostics): comma-separated distribution cases to run instead of everything,
    e.g. ``t1`` to re-check the T=1 case with a patch disabled.
    """
    from vllm import LLM, SamplingParams

    spec = None
    if engine in ("bebop", "bebop_entropy_vocab", "bebop_auto"):
        spec = {"method": "bebop", "model": heads, "num_speculative_tokens": NUM_SPEC}
    if engine == "bebop":
        spec.update(draft_length="fixed")  # every step verifies k drafts: the verifier's own tests
    if engine == "bebop_auto":
        spec.update(metrics="detailed")  # the default draft_length ("auto"); per-step draft counts
    if engine == "bebop_entropy_vocab":
        spec.update(ENTROPY_POLICY)
        spec.update(draft_vocab_size=len(json.loads((Path(heads) / "draft_vocab.json").read_text())["ids"]))
    # float32 on every engine: T = 0 comparisons need the argmax to be the same function of the
    # context whatever the forward's shape (verify steps batch k + 1 tokens per request, and the
    # auto policy varies k); in bf16 a near-tie flipped between a 1-token and a 4-token forward
    llm = LLM(
        model=str(_model_dir()), max_model_len=MAX_MODEL_LEN, enforce_eager=True, seed=0,
        speculative_config=spec, max_num_seqs=256, dtype="float32",
    )
    result: dict = {"runner": llm.collective_rpc(_runner_info)[0], "seconds": {}}
    t0 = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t0
        result["seconds"][name] = round(time.perf_counter() - t0, 1)
        print(f"[{engine}] {name}: {result['seconds'][name]} s", file=sys.stderr, flush=True)
        t0 = time.perf_counter()

    lap("start")

    def run(reqs: list[dict]) -> None:
        outs = llm.generate([r["prompt"] for r in reqs], [SamplingParams(**r["params"]) for r in reqs], use_tqdm=False)
        for r, o in zip(reqs, outs, strict=True):
            result[r["id"]] = [
                {
                    "token_ids": list(c.token_ids),
                    "text": c.text,
                    "finish_reason": c.finish_reason,
                    "spec": None if c.spec_decode_metrics is None else c.spec_decode_metrics.to_dict(),
                    "logprobs": None if c.logprobs is None else [
                        {str(t): lp.logprob for t, lp in step.items()} for step in c.logprobs
                    ],
                }
                for c in o.outputs
            ]

    cases = _dist_cases(engine)
    if only:
        cases = {k: v for k, v in cases.items() if k in only.split(",")}
    elif engine == "bebop_entropy_vocab":
        run([r for r in _requests() if r["id"].startswith("greedy")])
        lap("requests")
    elif engine == "bebop_auto":
        for r in _requests():  # one at a time: the policy's batch-1 regime
            if r["id"].startswith("greedy"):
                run([r])
        lap("requests")
        run(_crowd())
        lap("crowd")
    else:
        run(_requests())
        lap("requests")
        run(_mixed_batch())
        lap("mixed")
        if engine == "plain":
            run(_crowd())
            lap("crowd")
    chunk = AUTO_DIST_CONCURRENCY if engine == "bebop_auto" else DIST_SAMPLES
    for name, params in cases.items():
        params = {**params, "max_tokens": DIST_TOKENS, "ignore_eos": True}
        samples = []
        for start in range(0, DIST_SAMPLES, chunk):
            n = min(chunk, DIST_SAMPLES - start)
            outs = llm.generate([DIST_PROMPT] * n, SamplingParams(**params), use_tqdm=False)
            samples += [list(o.outputs[0].token_ids) for o in outs]
        result[f"dist_{name}"] = samples
        lap(f"dist_{name}")
    result["runner_after"] = llm.collective_rpc(_runner_info)[0]
    Path(out_path).write_text(json.dumps(result))
    llm.llm_engine.engine_core.shutdown()  # the next engine of a group starts in this process


def _runner_info(worker) -> dict:
    runner = worker.model_runner
    rs = getattr(runner, "rejection_sampler", None)
    ent = getattr(rs, "last_target_entropy", None)
    drafter = getattr(runner, "drafter", None)
    return {
        "rejection_sampler": type(rs).__name__ if rs is not None else None,
        "drafter": type(drafter).__name__ if drafter is not None else None,
        "draft_model": type(getattr(drafter, "model", None)).__name__ if drafter is not None else None,
        "bebop_drafts": bool(getattr(drafter, "_bebop_request_distribution_drafts", False)),
        "entropy_shape": None if ent is None else list(ent.shape),
        "entropy_dtype": None if ent is None else str(ent.dtype),
        "entropy_finite_nonneg": None if ent is None else bool(((ent >= -1e-4) & ent.isfinite()).all()),
    }


def _model_dir() -> Path:
    from bebop_vllm.paths import default_model_dir

    return default_model_dir()


def _heads_dir(tmp: Path) -> str:
    return heads_under_test(tmp, NUM_SPEC)


def _run_engines(engines: dict[str, str], tmp: Path) -> dict[str, dict]:
    """Engines (name -> heads) one after the other in one child process; their results by name."""
    pairs = [f"{engine}={heads}" for engine, heads in engines.items()]
    last = tmp / f"{list(engines)[-1]}.json"
    run_engine_script(__file__, ["--group", str(tmp), *pairs], last, timeout=2400,
                      label=f"{'+'.join(engines)} engines")
    return {engine: json.loads((tmp / f"{engine}.json").read_text()) for engine in engines}


ALL_ENGINES = ("plain", "bebop", "bebop_auto", "bebop_entropy_vocab")
# Engines that share a child process, one after the other: a process start (interpreter, torch and
# vLLM imports) and its exit cost ~20 s each on 2 cores, an engine start in a warm process a few.
PROCESS_GROUPS = (("plain", "bebop"), ("bebop_auto", "bebop_entropy_vocab"))
# A subset (e.g. "plain,bebop,bebop_auto" in scripts/gpu_check.sh): tests of the others skip.
ENGINES = tuple(os.environ.get("BEBOP_EXACTNESS_ENGINES", ",".join(ALL_ENGINES)).split(","))


class _Results(dict):
    def __missing__(self, engine: str):
        pytest.skip(f"engine {engine} not run (BEBOP_EXACTNESS_ENGINES={','.join(ENGINES)})")


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict]:
    if not (_model_dir() / "config.json").is_file():
        pytest.fail(f"default model missing at {_model_dir()}: run `bebop fetch-model` first")
    tmp = tmp_path_factory.mktemp("exactness")
    heads = _heads_dir(tmp)
    heads_of = {name: heads for name in ENGINES}
    if "bebop_entropy_vocab" in ENGINES:
        heads_of["bebop_entropy_vocab"], _ = _write_test_draft_vocab(heads, tmp / "vocab-heads")
    out = _Results()
    for group in PROCESS_GROUPS:
        if engines := {name: heads_of[name] for name in group if name in ENGINES}:
            out.update(_run_engines(engines, tmp))
    return out


def two_sample_chi2(a: list[int], b: list[int], min_count: int = 10) -> float:
    """p-value of a chi-square homogeneity test; rare categories pooled into one bin."""
    from scipy.stats import chi2_contingency

    ca, cb = Counter(a), Counter(b)
    common = [t for t in set(ca) | set(cb) if ca[t] + cb[t] >= min_count]
    rows = [[ca[t] for t in common], [cb[t] for t in common]]
    rest = (len(a) - sum(rows[0]), len(b) - sum(rows[1]))
    if sum(rest) > 0:
        rows[0].append(rest[0])
        rows[1].append(rest[1])
    if len(rows[0]) < 2:
        return 1.0
    return float(chi2_contingency(rows)[1])


def _verifier_tokens(samples: list[list[int]]) -> dict[int, list]:
    """Per position 2..DIST_TOKENS: that token keyed with its prefix (a joint category)."""
    return {pos: [tuple(s[: pos]) for s in samples] for pos in range(2, DIST_TOKENS + 1)}


def _ids(res: dict, key: str) -> list[list[int]]:
    return [c["token_ids"] for c in res[key]]


def test_bebop_components_are_installed(results):
    info = results["bebop"]["runner_after"]
    assert info["rejection_sampler"] == "BebopRejectionSampler"
    assert info["drafter"] == "EagleProposer" and info["draft_model"] == "BebopMTPModel"
    assert info["bebop_drafts"] is True
    assert info["entropy_dtype"] == "torch.float32" and info["entropy_finite_nonneg"] is True
    assert results["plain"]["runner_after"]["rejection_sampler"] is None


@pytest.mark.parametrize("key", [f"greedy{i}" for i in range(len(GREEDY_PROMPTS))] + ["mixed_greedy0", "mixed_greedy1"])
def test_greedy_token_ids_identical(results, key):
    assert _ids(results["bebop"], key) == _ids(results["plain"], key)


def test_stop_strings(results):
    plain, bebop = results["plain"]["stop"][0], results["bebop"]["stop"][0]
    assert bebop["text"] == plain["text"] and bebop["finish_reason"] == plain["finish_reason"] == "stop"
    assert "return" not in bebop["text"]


def test_logprobs(results):
    plain, bebop = results["plain"]["logprobs"][0], results["bebop"]["logprobs"][0]
    assert bebop["token_ids"] == plain["token_ids"]
    assert len(bebop["logprobs"]) == len(plain["logprobs"]) == len(plain["token_ids"])
    for step_p, step_b in zip(plain["logprobs"], bebop["logprobs"], strict=True):
        assert step_p.keys() == step_b.keys()
        for t in step_p:  # bf16 target: verify-pass and decode-pass logits differ by rounding only
            assert abs(step_p[t] - step_b[t]) < 0.05, (t, step_p[t], step_b[t])


def test_max_tokens_one(results):
    assert _ids(results["bebop"], "one") == _ids(results["plain"], "one")
    assert len(_ids(results["bebop"], "one")[0]) == 1
    assert len(_ids(results["bebop"], "one_random")[0]) == 1


def test_n_greater_than_one(results):
    outs = results["bebop"]["n4"]
    assert len(outs) == 4 and all(len(c["token_ids"]) >= 1 for c in outs)
    assert len({tuple(c["token_ids"]) for c in outs}) > 1  # independent samples, not copies


def test_seeded_requests_reproducible_in_mixed_batch(results):
    for engine in ("plain", "bebop"):
        res = results[engine]
        assert _ids(res, "mixed_seed_a") == _ids(res, "mixed_seed_b"), engine
    assert len(_ids(results["bebop"], "mixed_random")[0]) == 24


def detectable_tv(reference: list, n: int, alpha: float, power: float = 0.9, min_count: int = 10) -> float:
    """Smallest TV distance the two-sample chi-square test detects with probability ``power``.

    ``reference``: one sample (a list of categories) of the distribution under test; ``n``
    samples per side; ``alpha``: the test's level. The alternative moves mass d from the most
    likely category to the second (TV = d), the least detectable of the simple shifts; the
    statistic is then noncentral chi-square with lambda = (n / 2) * sum (p - q)^2 / ((p + q) / 2)
    and df = bins - 1 (bins: categories the test keeps at min_count over both samples, + pooled rest).
    """
    from scipy.stats import chi2, ncx2

    counts = sorted(Counter(reference).values(), reverse=True)
    if len(counts) < 2:
        return 0.0  # a point mass: any change is a new category, seen at once
    a, b = counts[0] / len(reference), counts[1] / len(reference)
    df = max(1, sum(c >= min_count / 2 for c in counts))  # kept bins (+ the pooled rest) - 1
    critical = chi2.ppf(1 - alpha, df)

    def power_at(d: float) -> float:
        lam = (n / 2) * (d * d / (a - d / 2) + d * d / (b + d / 2))
        return float(1 - ncx2.cdf(critical, df, lam))

    lo, hi = 0.0, min(a, 1 - b)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if power_at(mid) < power else (lo, mid)
    return hi


def test_distribution_test_power(results):
    """State the power: the TV distance detected with probability 0.9 at DIST_SAMPLES per engine."""
    plain = _verifier_tokens(results["plain"]["dist_t1"])
    detectable = {pos: round(detectable_tv(plain[pos], DIST_SAMPLES, ALPHA / 3), 3) for pos in plain}
    detectable["marginal2"] = round(detectable_tv([s[1] for s in results["plain"]["dist_t1"]], DIST_SAMPLES,
                                                  ALPHA / 3), 3)
    print(f"chi-square test, {DIST_SAMPLES} samples per engine: detectable TV (power 0.9) {detectable}")
    # the sample size must keep at least this resolution (documented in the module docstring)
    assert min(detectable.values()) < 0.2, detectable


def test_distribution_test_rejects_wrong_temperature(results):
    """Negative control through the same helper: T=0.85 vs T=1 (both plain) must fail it."""
    with pytest.raises(AssertionError):
        _assert_same_verifier_distribution(results["plain"]["dist_t1"], results["plain"]["dist_t085"])


@pytest.mark.parametrize("case", ["t1", "t07p"])
def test_sampling_distribution_matches(results, case):
    plain = results["plain"][f"dist_{case}"]
    bebop = results["bebop"][f"dist_{case}"]
    assert len(plain) == len(bebop) == DIST_SAMPLES
    assert all(len(s) == DIST_TOKENS for s in plain + bebop)
    _assert_same_verifier_distribution(plain, bebop)


def _assert_same_verifier_distribution(plain: list[list[int]], other: list[list[int]]) -> None:
    """Chi-square per verifier position (joint with the prefix) and for the position-2 marginal
    (the verifier's own token with the prefix pooled); Bonferroni over the 3 tests."""
    tp, to = _verifier_tokens(plain), _verifier_tokens(other)
    p_values = {pos: two_sample_chi2(tp[pos], to[pos]) for pos in tp}
    p_values["marginal2"] = two_sample_chi2([s[1] for s in plain], [s[1] for s in other])
    assert min(p_values.values()) > ALPHA / 3, p_values


@pytest.mark.parametrize("key", [f"greedy{i}" for i in range(len(GREEDY_PROMPTS))])
def test_entropy_draft_length_keeps_greedy_outputs(results, key):
    assert _ids(results["bebop_entropy_vocab"], key) == _ids(results["plain"], key)


def test_entropy_draft_length_varies_per_step(results):
    """The policy really chose different draft counts: some steps drafted all 3, some fewer."""
    # a request whose every step chose 0 drafts has no verify step, hence no per-step record
    per_step = [d for i in range(len(GREEDY_PROMPTS))
                for d in (results["bebop_entropy_vocab"][f"greedy{i}"][0]["spec"] or {}).get("per_step_drafted", [])]
    assert per_step and max(per_step) == NUM_SPEC and min(per_step) < NUM_SPEC, per_step
    full = [d for i in range(len(GREEDY_PROMPTS))
            for d in (results["bebop"][f"greedy{i}"][0]["spec"] or {}).get("per_step_drafted", [])]
    assert not full or min(full) == NUM_SPEC  # fixed length (summary level may omit per-step data)


def test_entropy_draft_length_keeps_sampling_distribution(results):
    _assert_same_verifier_distribution(results["plain"]["dist_t1"], results["bebop_entropy_vocab"]["dist_t1"])


@pytest.mark.parametrize("key", [f"greedy{i}" for i in range(len(GREEDY_PROMPTS))])
def test_auto_draft_length_keeps_greedy_outputs(results, key):
    assert _ids(results["bebop_auto"], key) == _ids(results["plain"], key)


def test_auto_draft_length_keeps_every_crowd_output(results):
    auto, plain = results["bebop_auto"], results["plain"]
    differ = [i for i in range(CROWD) if _ids(auto, f"crowd{i}") != _ids(plain, f"crowd{i}")]
    assert not differ, differ


def _drafted_per_step(res: dict, keys: list[str]) -> list[int]:
    return [d for k in keys for d in (res[k][0]["spec"] or {}).get("per_step_drafted", [])]


def test_auto_draft_length_drafts_alone_and_mostly_stops_in_a_crowd(results):
    """Batch 1: the policy drafts (on these CPUs a verify token costs little at batch 1). Batch 64:
    verify tokens cost about a plain step each, so most requests draft less than k per step."""
    res = results["bebop_auto"]
    alone = _drafted_per_step(res, [f"greedy{i}" for i in range(len(GREEDY_PROMPTS))])
    assert alone and max(alone) >= 1, alone
    crowd_drafts = sum((res[f"crowd{i}"][0]["spec"] or {}).get("num_draft_tokens", 0) for i in range(CROWD))
    crowd_tokens = sum(len(res[f"crowd{i}"][0]["token_ids"]) for i in range(CROWD))
    assert crowd_drafts < NUM_SPEC * crowd_tokens / 2, (crowd_drafts, crowd_tokens)


def test_auto_draft_length_keeps_sampling_distribution(results):
    _assert_same_verifier_distribution(results["plain"]["dist_t1"], results["bebop_auto"]["dist_t1"])


@pytest.mark.parametrize("key", [f"greedy{i}" for i in range(len(GREEDY_PROMPTS))])
def test_draft_vocab_keeps_greedy_outputs(results, key):
    assert _ids(results["bebop_entropy_vocab"], key) == _ids(results["plain"], key)


def test_draft_vocab_keeps_sampling_distribution(results):
    """Drafts restricted to ~100 tokens (q = 0 elsewhere): rejection sampling stays exact."""
    _assert_same_verifier_distribution(results["plain"]["dist_t1"], results["bebop_entropy_vocab"]["dist_t1"])


def test_draft_vocab_still_drafts_and_accepts(results):
    outs = [results["bebop_entropy_vocab"][f"greedy{i}"][0] for i in range(len(GREEDY_PROMPTS))]
    # a request that ends after its first token (EOS) never reaches a verify step
    longer = [o["spec"] for o in outs if len(o["token_ids"]) > 1]
    assert longer and all(s["num_draft_tokens"] > 0 for s in longer), [o["spec"] for o in outs]
    assert sum(s["num_accepted_draft_tokens"] for s in longer) > 0  # the prompts' own tokens get drafted


if __name__ == "__main__":
    # python tests/test_exactness.py ENGINE HEADS OUT [ONLY]     one engine (diagnostics, see _worker)
    # python tests/test_exactness.py --group DIR ENGINE=HEADS...  engines in turn, DIR/ENGINE.json each
    if sys.argv[1] == "--group":
        for pair in sys.argv[3:]:
            engine, heads = pair.split("=", 1)
            _worker(engine, heads, str(Path(sys.argv[2]) / f"{engine}.json"))
    else:
        _worker(*sys.argv[1:5])
    exit_after_result()
