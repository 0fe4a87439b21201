"""A proposer pass with K = 0 writes the heads' KV cache bit for bit as the full pass does.

``draft_length="auto"`` drafts nothing in a crowded batch; the proposer's pass over the step's
tokens then only keeps the drafter's KV cache complete, and the draft_kv_only patch defers it
(holds its inputs until the next pass that drafts, then writes them in one batched KV-only pass)
or, where deferral does not apply, runs the layer's KV part alone
(``BebopHeadModel.write_kv_cache``). If either differed from the full layer in any bit (a
missed norm or aux combine, rotary at the wrong positions, another slot, input ids shifted
wrongly), drafting resumed later would attend to wrong keys: never inexact (the verifier checks
every draft), but silently worse acceptance. So, on a real engine (one subprocess, in-process
vLLM), a hook on the proposer replays every propose call of the run from the same KV state
several ways, K = 0 each:

- deferred: the K = 0 call writes nothing, and the flush then writes what the full layer does;
- KV-only (deferral off) and the full layer (the patch switched off): caches must be equal;
- the full layer twice: equal (the replay is deterministic, so the check can trust it);
- a KV-only variant without rotary embedding (negative control): must differ.

The engine's heads read aux layers (the shipped heads do), so the deferred path's aux combine
is covered. The order of many deferred passes (a slot written twice keeps its last write) is
checked without an engine in tests/test_deferred_kv.py.

Prefill passes (many tokens per request) and decode passes (1 + accepted tokens) both occur.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from engine_subprocess import exit_after_result, run_engine_script

pytestmark = pytest.mark.slow  # starts a vLLM engine (subprocess)

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "List three prime numbers:"]


def _install_hook(worker) -> None:
    import torch

    drafter = worker.model_runner.drafter
    head = drafter.model.model
    cache = head.layer.self_attn.attn.kv_cache
    original = drafter.propose  # the class method, patched by draft_kv_only
    checks: list[dict] = []
    drafter._bebop_kv_checks = checks

    def without_rotary(positions, x):  # negative control: keys left unrotated
        self_attn = head.layer.self_attn
        qkv, _ = self_attn.qkv_proj(head.layer.input_layernorm(x))
        _, k, v = qkv.split([self_attn.q_size, self_attn.kv_size, self_attn.kv_size], dim=-1)
        from vllm.model_executor.layers.attention.attention import unified_kv_cache_update

        attn = self_attn.attn
        unified_kv_cache_update(k.reshape(-1, attn.num_kv_heads, attn.head_size),
                                v.reshape(-1, attn.num_kv_heads, attn.head_size_v), attn.layer_name)

    def replay(args, kwargs, before, mode):
        cache.copy_(before)
        head._bebop_kv_only_ok = mode != "full"
        head._bebop_defer_kv_ok = mode == "deferred"
        if mode == "control":
            head.write_kv_cache = without_rotary
        try:
            out = original(*args, **{**kwargs, "num_speculative_tokens": 0})
            held = drafter.model.deferred_kv.tokens
            untouched = bool(torch.equal(cache, before))
            flushed = drafter.model.flush_deferred_kv()
        finally:
            head._bebop_kv_only_ok = None
            head._bebop_defer_kv_ok = None
            head.__dict__.pop("write_kv_cache", None)
        assert out.shape[1] == 0
        return cache.clone(), {"held": held, "untouched_until_flush": untouched, "flushed": flushed}

    def propose(*args, **kwargs):
        before = cache.clone()
        deferred, deferral = replay(args, kwargs, before, "deferred")
        kv_only, direct = replay(args, kwargs, before, "kv_only")
        full, _ = replay(args, kwargs, before, "full")
        full_again, _ = replay(args, kwargs, before, "full")
        control, _ = replay(args, kwargs, before, "control")
        cache.copy_(before)
        tokens = int(kwargs["target_token_ids"].shape[0])
        checks.append({
            "tokens": tokens,
            "deferred_held_every_token": deferral["held"] == tokens and deferral["flushed"] == tokens,
            "deferred_untouched_until_flush": deferral["untouched_until_flush"],
            "direct_held_nothing": direct["held"] == 0 and not direct["untouched_until_flush"],
            "deferred_equals_full": bool(torch.equal(deferred, full)),
            "kv_only_equals_full": bool(torch.equal(kv_only, full)),
            "replay_deterministic": bool(torch.equal(full, full_again)),
            "pass_wrote_cache": not bool(torch.equal(full, before)),
            "control_differs": not bool(torch.equal(control, full)),
        })
        return original(*args, **kwargs)

    drafter.propose = propose


def _take_checks(worker) -> list:
    return list(worker.model_runner.drafter._bebop_kv_checks)


def _worker(heads: str, out_path: str) -> None:
    from vllm import LLM, SamplingParams

    from bebop_vllm.paths import default_model_dir

    llm = LLM(model=str(default_model_dir()), max_model_len=256, enforce_eager=True, seed=0, max_num_seqs=4,
              dtype="bfloat16", speculative_config={"method": "bebop", "model": heads,
                                                    "num_speculative_tokens": 3, "draft_length": "fixed"})
    llm.collective_rpc(_install_hook)
    llm.generate(PROMPTS, SamplingParams(temperature=1.0, max_tokens=6), use_tqdm=False)
    Path(out_path).write_text(json.dumps(llm.collective_rpc(_take_checks)[0]))


def test_kv_only_pass_writes_the_full_pass_cache(tmp_path):
    from bebop_vllm.paths import SHIPPED_HEADS_DIR

    out = tmp_path / "checks.json"
    checks = run_engine_script(__file__, [str(SHIPPED_HEADS_DIR), str(out)], out, timeout=900, label="engine")
    assert len(checks) >= 4, checks  # a prefill pass and several decode passes
    assert any(c["tokens"] > len(PROMPTS) for c in checks), "no prefill pass was checked"
    for c in checks:
        assert c["pass_wrote_cache"] and c["replay_deterministic"], c
        assert c["control_differs"], f"the negative control went unnoticed: {c}"
        assert c["kv_only_equals_full"], f"the KV-only pass wrote a different cache: {c}"
        assert c["deferred_held_every_token"] and c["deferred_untouched_until_flush"], c
        assert c["direct_held_nothing"], c
        assert c["deferred_equals_full"], f"the deferred pass wrote a different cache: {c}"


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
    exit_after_result()
