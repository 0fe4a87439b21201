"""A real ``bebop serve`` on 127.0.0.1 under 32 concurrent OpenAI-client requests (method "bebop").

One server start for the module. Every request must complete and carry its own speculative
metrics; a request's counts must be consistent with its own output length (requests differ
wildly in length, temperature, n, endpoint and streaming, so a leak between requests breaks
the bounds); and the OpenAI view must agree with Prometheus ``/metrics`` — bebop's counters
(fed from the same records) and, independently, vLLM's own scheduler-side counters.

The three views on the *same* requests: greedy prompts (deterministic drafts and verification)
sent one at a time to the server (completions, streamed completions, chat) and, in a separate
process, to ``LLM.generate`` / ``LLM.chat`` with the same engine settings — every per-request
record must be the same, and Prometheus must move by exactly their sum.

Heads: ``$BEBOP_TEST_HEADS``, else the shipped heads, else random heads (acceptance is then
low, which is fine: the plumbing is what is under test).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from engine_subprocess import engine_env, exit_after_result
from heads_under_test import heads_under_test

REPO = Path(__file__).resolve().parent.parent
NUM_SPEC = 3
NUM_REQUESTS = 32
START_TIMEOUT_S = 420
REQUEST_TIMEOUT_S = 480

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _heads_dir(tmp: Path) -> str:
    return heads_under_test(tmp, NUM_SPEC)


def _get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    import requests

    r = requests.get(url, timeout=timeout)
    return r.status_code, r.text


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from bebop_vllm.paths import default_model_dir

    tmp = tmp_path_factory.mktemp("server")
    port = _free_port()
    spec = {"method": "bebop", "model": _heads_dir(tmp), "num_speculative_tokens": NUM_SPEC, "draft_length": "fixed"}
    cmd = [sys.executable, "-m", "bebop_vllm.cli", "serve", str(default_model_dir()),
           "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "smol",
           "--max-model-len", str(SERVER_ENGINE["max_model_len"]), "--enforce-eager",
           "--dtype", SERVER_ENGINE["dtype"], "--seed", str(SERVER_ENGINE["seed"]),
           "--speculative-config", json.dumps(spec),
           "--per-request-spec-decode-metrics", "detailed", "--uvicorn-log-level", "warning"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    log_path = tmp / "server.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"bebop serve exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                if _get(f"{base}/health", timeout=2)[0] == 200:
                    break
            except Exception:  # noqa: BLE001 - not listening yet
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not healthy after {START_TIMEOUT_S}s:\n{log_path.read_text()[-4000:]}")
            time.sleep(1.0)
        yield {"base": base, "heads": spec["model"]}
    finally:
        _stop(proc)


SERVER_ENGINE = dict(dtype="bfloat16", max_model_len=512, enforce_eager=True, seed=0)


def _stop(proc: subprocess.Popen) -> None:
    """SIGINT (vLLM shuts its engine down), then SIGKILL the session we started if it lingers."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # our own session: engine-core children included
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def _plan() -> list[dict]:
    """32 requests that differ as much as possible: endpoint, stream, n, temperature, length."""
    temps = [0.0, 0.3, 1.0, 1.6]
    lengths = [1, 2, 6, 13, 21]
    plan = []
    for i in range(NUM_REQUESTS):
        plan.append({
            "i": i,
            "chat": i % 2 == 1,
            "stream": i % 4 in (2, 3),
            "n": 2 if i % 8 == 5 else 1,
            "temperature": temps[i % len(temps)],
            "max_tokens": lengths[(i * 3) % len(lengths)],
            "prompt": f"Request {i}: write a short note about the number {i * 7 + 3}.",
        })
    return plan


async def _one(client, req: dict) -> dict:
    """Send one request; return its choices as {index: {len, finish, spec}} plus response-level metrics."""
    common = dict(model="smol", max_tokens=req["max_tokens"], temperature=req["temperature"],
                  n=req["n"], seed=1000 + req["i"])
    extra = {"ignore_eos": True}
    choices: dict[int, dict] = {}
    top_metrics = None
    if req["stream"]:
        stream_opts = {"include_usage": True}
        if req["chat"]:
            stream = await client.chat.completions.create(
                messages=[{"role": "user", "content": req["prompt"]}], stream=True,
                stream_options=stream_opts, extra_body={**extra, "return_token_ids": True}, **common)
        else:
            stream = await client.completions.create(
                prompt=req["prompt"], stream=True, stream_options=stream_opts,
                extra_body={**extra, "return_token_ids": True}, **common)
        async for chunk in stream:
            data = chunk.model_dump()
            if data.get("metrics"):
                top_metrics = data["metrics"].get("speculative_decoding")
            for c in data.get("choices") or []:
                slot = choices.setdefault(c["index"], {"len": None, "finish": None, "spec": None})
                ids = c.get("token_ids")
                if ids is not None:  # per-chunk delta ids (return_token_ids), where vLLM sends them
                    slot["len"] = (slot["len"] or 0) + len(ids)
                if c.get("finish_reason") is not None:
                    slot["finish"] = c["finish_reason"]
                    slot["spec"] = c.get("speculative_decoding")
    else:
        if req["chat"]:
            resp = await client.chat.completions.create(
                messages=[{"role": "user", "content": req["prompt"]}], extra_body=extra, **common)
        else:
            resp = await client.completions.create(prompt=req["prompt"], extra_body=extra, **common)
        data = resp.model_dump()
        top_metrics = (data.get("metrics") or {}).get("speculative_decoding")
        for c in data["choices"]:
            choices[c["index"]] = {"len": None, "finish": c["finish_reason"],
                                   "spec": c.get("speculative_decoding")}
        if req["n"] == 1:
            choices[0]["len"] = data["usage"]["completion_tokens"]
    return {"choices": choices, "top": top_metrics}


def _scrape(base: str) -> dict[str, float]:
    status, text = _get(f"{base}/metrics", timeout=10)
    assert status == 200
    values: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r'^((?:vllm|bebop):[a-z_:]+)(\{[^}]*\})?\s+([-+0-9.eEinfNa]+)$', line)
        if m:
            labels = m.group(2) or ""
            if "spec_decode" not in m.group(1):
                continue
            pos = re.search(r'position="(\d+)"', labels)
            values[m.group(1) + (f"[{pos.group(1)}]" if pos else "")] = float(m.group(3))
    return values


@pytest.fixture(scope="module")
def load_run(server):
    from openai import AsyncOpenAI

    server = server["base"]
    async def run_all() -> tuple[list[dict], float]:
        client = AsyncOpenAI(base_url=f"{server}/v1", api_key="none", timeout=REQUEST_TIMEOUT_S,
                             max_retries=0)
        await client.completions.create(model="smol", prompt="warm up", max_tokens=4)
        before = _scrape(server)
        t0 = time.monotonic()
        results = await asyncio.gather(*(_one(client, r) for r in _plan()))
        await client.close()
        return results, before, time.monotonic() - t0

    results, before, elapsed = asyncio.run(run_all())
    print(f"\n{NUM_REQUESTS} concurrent requests finished in {elapsed:.1f}s")
    return {"results": results, "before": before, "plan": _plan()}


def test_every_request_completes_with_its_own_metrics(load_run):
    for req, res in zip(load_run["plan"], load_run["results"], strict=True):
        assert sorted(res["choices"]) == list(range(req["n"])), req
        if req["n"] == 1:
            # vLLM's own single-sequence view (streaming: final usage chunk) = our per-choice view.
            assert _set(res["top"]) == _set(res["choices"][0]["spec"]), req
        for idx, choice in res["choices"].items():
            assert choice["finish"] == "length", (req, idx)
            spec = choice["spec"]
            assert spec is not None, f"request {req['i']} choice {idx} has no speculative_decoding"
            _check_consistent(spec, req["max_tokens"], choice["len"], req)


def _set(metrics: dict | None) -> dict | None:
    """Drop null fields (vLLM's response model adds per_step_* = null at the summary level)."""
    return None if metrics is None else {k: v for k, v in metrics.items() if v is not None}


def _check_consistent(spec: dict, max_tokens: int, length: int | None, req: dict) -> None:
    """A sequence's counts can only be explained by its own length (no leak between requests)."""
    if length is not None:
        assert length == max_tokens, req
    steps, accepted = spec["num_spec_steps"], spec["num_accepted_draft_tokens"]
    k = spec["num_spec_tokens"]
    # Token 1 comes from prefill; each verify step emits accepted + 1 (the last may overshoot
    # max_tokens by at most k, vLLM counts acceptance before the length stop trims).
    assert max_tokens - 1 <= steps + accepted <= max_tokens - 1 + k, (spec, req)
    assert sum(spec["acceptance_histogram"]) == steps
    assert sum(spec["num_accepted_tokens_per_pos"]) == accepted
    assert sum(spec["num_draft_tokens_per_pos"]) == spec["num_draft_tokens"]
    assert spec.get("per_step_accepted") and len(spec.get("per_step_accepted")) == steps or steps == 0
    decided = sum(min(a + 1, d) for a, d in zip(spec.get("per_step_accepted") or [],
                                                spec.get("per_step_drafted") or [], strict=True))
    assert spec["num_entropy_tokens"] == decided, (spec, req)
    assert len(spec.get("per_step_target_entropy") or []) == steps
    if decided:
        assert 0.0 <= spec["mean_target_entropy"] <= math.log(49152) + 1e-3
    else:
        assert spec["mean_target_entropy"] is None


def test_prometheus_agrees_with_responses(server, load_run):
    server = server["base"]
    specs = [c["spec"] for res in load_run["results"] for c in res["choices"].values()]
    want: dict[str, float] = {
        "bebop:spec_decode_num_sequences_total": len(specs),
        "bebop:spec_decode_target_entropy_nats_count": sum(s["num_entropy_tokens"] for s in specs),
        "vllm:spec_decode_num_draft_tokens_total": sum(s["num_draft_tokens"] for s in specs),
        "vllm:spec_decode_num_accepted_tokens_total": sum(s["num_accepted_draft_tokens"] for s in specs),
    }
    for pos in range(NUM_SPEC):
        accepted = sum(s["num_accepted_tokens_per_pos"][pos] for s in specs)
        want[f"bebop:spec_decode_num_draft_tokens_per_pos_total[{pos}]"] = sum(
            s["num_draft_tokens_per_pos"][pos] for s in specs)
        want[f"bebop:spec_decode_num_accepted_tokens_per_pos_total[{pos}]"] = accepted
        want[f"vllm:spec_decode_num_accepted_tokens_per_pos_total[{pos}]"] = accepted  # vLLM's own path
    entropy_sum = sum((s["mean_target_entropy"] or 0.0) * s["num_entropy_tokens"] for s in specs)
    before = load_run["before"]
    deadline = time.monotonic() + 20  # vLLM records its step stats just after answering
    while True:
        after = _scrape(server)
        delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in want}
        if delta == want or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert delta == want
    got_sum = after["bebop:spec_decode_target_entropy_nats_sum"] - before.get(
        "bebop:spec_decode_target_entropy_nats_sum", 0.0)
    assert got_sum == pytest.approx(entropy_sum, rel=1e-6, abs=1e-6)


# -- the three views on the same requests ------------------------------------------------------
# (kind, text, max_tokens): greedy, so drafts, verification and therefore every count are
# deterministic; one request at a time on both sides, so batching cannot change the numerics.
SAME_REQUESTS = [
    ("completion", "The three primary colours are", 24),
    ("completion-stream", "def fibonacci(n):", 20),
    ("chat", "Name two planets of the solar system.", 16),
]


def _server_view(base: str, kind: str, text: str, max_tokens: int) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=f"{base}/v1", api_key="none", timeout=REQUEST_TIMEOUT_S, max_retries=0)
    common = dict(model="smol", max_tokens=max_tokens, temperature=0.0,
                  extra_body={"ignore_eos": True, "return_token_ids": True})
    if kind == "chat":
        data = client.chat.completions.create(messages=[{"role": "user", "content": text}], **common).model_dump()
        choice = data["choices"][0]
        return {"ids": choice["token_ids"], "spec": choice["speculative_decoding"]}
    if kind == "completion":
        data = client.completions.create(prompt=text, **common).model_dump()
        choice = data["choices"][0]
        return {"ids": choice["token_ids"], "spec": choice["speculative_decoding"]}
    ids, spec = [], None
    for chunk in client.completions.create(prompt=text, stream=True, **common):
        for c in chunk.model_dump().get("choices") or []:
            ids += c.get("token_ids") or []
            if c.get("finish_reason") is not None:
                spec = c.get("speculative_decoding")
    return {"ids": ids, "spec": spec}


def _llm_view_main(heads: str, out: str) -> None:
    """Run as a script: the same requests through ``LLM.generate`` / ``LLM.chat``."""
    from vllm import LLM, SamplingParams

    from bebop_vllm.paths import default_model_dir

    llm = LLM(model=str(default_model_dir()), per_request_spec_decode_metrics="detailed",
              speculative_config={"method": "bebop", "model": heads, "num_speculative_tokens": NUM_SPEC,
                                  "draft_length": "fixed"},
              **SERVER_ENGINE)
    views = []
    for kind, text, max_tokens in SAME_REQUESTS:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        if kind == "chat":
            (req,) = llm.chat([{"role": "user", "content": text}], params, use_tqdm=False)
        else:
            (req,) = llm.generate([text], params, use_tqdm=False)
        c = req.outputs[0]
        views.append({"ids": list(c.token_ids), "spec": c.spec_decode_metrics.to_dict()})
    Path(out).write_text(json.dumps(views))


def test_llm_openai_and_prometheus_agree_on_the_same_requests(server, load_run, tmp_path):
    base = server["base"]
    out = tmp_path / "llm_view.json"
    env = engine_env()  # the engine core in the child process: one interpreter start fewer
    llm_proc = subprocess.Popen([sys.executable, __file__, server["heads"], str(out)], env=env, cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # the server side, meanwhile (load_run is a dependency so its Prometheus deltas stay its own)
    before = _scrape(base)
    served = [_server_view(base, *req) for req in SAME_REQUESTS]
    time.sleep(1.0)  # vLLM records its step stats just after answering
    after = _scrape(base)
    log, _ = llm_proc.communicate(timeout=900)
    assert llm_proc.returncode == 0, log[-5000:]
    offline = json.loads(out.read_text())
    for req, srv, llm in zip(SAME_REQUESTS, served, offline, strict=True):
        assert srv["ids"] == llm["ids"], req  # same greedy tokens first, else counts could not match
        s, o = _set(srv["spec"]), _set(llm["spec"])
        assert s.keys() == o.keys(), (req, s.keys() ^ o.keys())
        for key in s:
            if "entropy" in key and s[key] is not None:
                assert s[key] == pytest.approx(o[key], rel=1e-5, abs=1e-6), (req, key)
            else:
                assert s[key] == o[key], (req, key)
        assert s["num_spec_steps"] > 0 and len(s["per_step_accepted"]) == s["num_spec_steps"], req
    specs = [_set(v["spec"]) for v in served]
    for pos in range(NUM_SPEC):
        for name, field in (("accepted", "num_accepted_tokens_per_pos"), ("draft", "num_draft_tokens_per_pos")):
            metric = f"bebop:spec_decode_num_{name}_tokens_per_pos_total[{pos}]"
            assert after[metric] - before.get(metric, 0.0) == sum(s[field][pos] for s in specs), metric
    count = "bebop:spec_decode_target_entropy_nats_count"
    assert after[count] - before.get(count, 0.0) == sum(s["num_entropy_tokens"] for s in specs)


if __name__ == "__main__":
    _llm_view_main(sys.argv[1], sys.argv[2])
    exit_after_result()
