"""An RL rollout worker with frozen bebop heads: generate, receive a policy update, generate again.

    python examples/rl_rollout_worker.py                          # default model, shipped heads
    python examples/rl_rollout_worker.py --policy NEW_POLICY_DIR --out result.json

Run two of these (e.g. two data-parallel rollout workers, or two Ray actors) with the same --policy
and --seed: they sample identical tokens (tests/test_rl_engine.py does exactly that). Everything
bebop needs travels in the speculative config RolloutEngine builds; no BEBOP_* variable is read.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

PROMPTS = ["What is 17 + 25? Reply with the number only.", "Name three prime numbers.",
           "Write a haiku about gradient descent."]
DEFAULT_SEED = 1234
DEFAULT_MAX_TOKENS = 32


def sampling_params(seed: int, max_tokens: int):
    """Two seeded samples per prompt at T = 1 (what every worker with the same seed draws)."""
    from vllm import SamplingParams

    return SamplingParams(n=2, temperature=1.0, max_tokens=max_tokens, seed=seed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="policy model folder (default: the fetched SmolLM2-135M)")
    p.add_argument("--heads", default=None, help="heads folder (default: the shipped heads)")
    p.add_argument("--policy", default=None, help="new policy weights: a safetensors file or folder")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="sampling seed (same seed, same tokens)")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="tokens per sample")
    p.add_argument("--out", type=Path, default=None, help="write token ids and fingerprints as JSON")
    p.add_argument("--draft-length", default="auto", choices=["auto", "fixed", "entropy"],
                   help="bebop draft_length (default auto). Seeded requests reproduce across engines only with a "
                        "fixed draft length: auto decides from each engine's own timing calibration, and the number "
                        "of drafts changes how many random numbers a step draws")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="engine dtype (default auto: vLLM's choice for the model and host)")
    args = p.parse_args()

    from bebop_vllm.rl import RolloutEngine

    engine = RolloutEngine(args.model, heads=args.heads, num_speculative_tokens=3,
                           speculative_options={"draft_length": args.draft_length},
                           max_model_len=512, enforce_eager=True, seed=0, dtype=args.dtype)
    heads_fp = engine.heads_fingerprint()
    params = sampling_params(args.seed, args.max_tokens)
    _, before = engine.generate(PROMPTS, params)
    print(f"policy v0: {before.tokens_per_s:.1f} tok/s, acceptance per position "
          f"{[round(a, 3) for a in before.acceptance_per_position]}, "
          f"{before.mean_tokens_per_verify_step} tokens per verify step")
    update = None
    if args.policy:
        update = engine.update_policy(args.policy, version="v1")
        print(f"policy v1 loaded in {update.seconds:.2f} s (load {update.load_seconds:.2f} s)")
    outputs, after = engine.generate(PROMPTS, params)
    assert engine.heads_fingerprint() == heads_fp, "the heads changed"
    print(f"policy {engine.policy_version or 'v0'}: acceptance per position "
          f"{[round(a, 3) for a in after.acceptance_per_position]}")
    if args.out:
        args.out.write_text(json.dumps({
            "token_ids": [[list(c.token_ids) for c in o.outputs] for o in outputs],
            "weight_versions": [[getattr(c, "weight_versions", None) for c in o.outputs] for o in outputs],
            "heads_fingerprint": heads_fp, "policy_fingerprint": engine.policy_fingerprint(),
            "update_seconds": None if update is None else update.seconds, "stats": after.to_dict()}, default=str))
    engine.close()


if __name__ == "__main__":
    main()
