"""Seeded requests with a chunked prefill on a bebop CPU engine (the cpu_seeded_chunks patch).

vLLM 0.32 rewinds a seeded generator after a discarded partial-prefill draw with
``gen.set_offset``, which CPU generators do not have: the engine dies. bebop engines on CPU keep
those generators out of the discarded steps instead. Checked here:

- the helper takes out exactly the discarded rows' generators (no engine);
- on a real bebop engine (fp32, k = 3, 128-token prefill chunks) a seeded request behind a
  ~330-token prompt completes, repeats exactly when rerun (the rerun hits the prefix cache, so it
  has fewer partial chunks) and gives the same tokens when another long prompt shares its steps
  and shifts its chunk boundaries; another seed gives other tokens (the seed is used at all). A
  fix that only skipped the rewind, letting discarded steps draw from the generator, fails the
  rerun check (measured: "a seeded request did not repeat"); without the patch the engine dies.

That plain engines are left alone (the runner flag is unset there) is checked in
tests/test_plain_engine.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_subprocess import exit_after_result, run_engine_script

from bebop_vllm.plugin.patches.cpu_seeded_chunks import held_out_generators

STORY = (
    "Once upon a time in a small village by the sea there lived an old fisherman who told stories "
    "about the storms he had seen, the ships he had lost and the friends who had sailed with him. "
)
CHUNK_TOKENS = 128


def test_held_out_generators_takes_exactly_the_discarded_seeded_rows():
    gens = {0: torch.Generator(), 2: torch.Generator(), 3: torch.Generator()}
    kept = {i: g for i, g in gens.items()}
    held = held_out_generators(np.array([True, True, False, True, False]), gens)
    assert held == {0: kept[0], 3: kept[3]}
    assert gens == {2: kept[2]}
    assert held_out_generators(np.zeros(4, dtype=bool), gens) == {} and gens == {2: kept[2]}


def _worker(heads: str, out_path: str) -> None:
    from vllm import LLM, SamplingParams

    from bebop_vllm.paths import default_model_dir
    from bebop_vllm.plugin.patches.cpu_seeded_chunks import BEBOP_FLAG

    llm = LLM(model=str(default_model_dir()), max_model_len=1024, enforce_eager=True, seed=0, max_num_seqs=4,
              dtype="float32", enable_chunked_prefill=True, max_num_batched_tokens=CHUNK_TOKENS,
              speculative_config={"method": "bebop", "model": heads, "num_speculative_tokens": 3,
                                  "draft_length": "fixed"})
    tokenizer = llm.get_tokenizer()
    long_prompt = STORY * 9 + "One evening he began:"
    other_prompt = STORY * 7 + "The next morning"

    def run(prompts: list[str], seeds: list[int]) -> list[list[int]]:
        params = [SamplingParams(temperature=1.0, max_tokens=24, seed=s) for s in seeds]
        return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]

    result = {
        "flag": llm.collective_rpc(lambda w: bool(getattr(w.model_runner, BEBOP_FLAG, False)))[0],
        "prompt_tokens": len(tokenizer.encode(long_prompt)),
        "alone": run([long_prompt], [11])[0],
        "alone_again": run([long_prompt], [11])[0],
        "shared": run([other_prompt, long_prompt], [5, 11])[1],
        "other_seed": run([long_prompt], [12])[0],
    }
    Path(out_path).write_text(json.dumps(result))


@pytest.mark.slow  # starts a vLLM engine (subprocess)
def test_seeded_request_with_chunked_prefill_completes_and_repeats(tmp_path):
    from bebop_vllm.paths import SHIPPED_HEADS_DIR

    out = tmp_path / "seeded.json"
    r = run_engine_script(__file__, [str(SHIPPED_HEADS_DIR), str(out)], out, timeout=900, label="bebop engine")
    assert r["flag"] is True
    assert r["prompt_tokens"] > 2 * CHUNK_TOKENS, r["prompt_tokens"]  # at least two discarded partial chunks
    assert len(r["alone"]) == 24
    assert r["alone_again"] == r["alone"], "a seeded request did not repeat"
    assert r["shared"] == r["alone"], "the seeded output depended on where its prefill chunks fell"
    assert r["other_seed"] != r["alone"], "another seed gave the same tokens: the seed was not used"


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
    exit_after_result()
