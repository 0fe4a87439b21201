"""Does a compiled RolloutEngine (the CPU default: no ``enforce_eager``) see policy updates?

Too slow for the test suite on 2 cores (every compiled engine start costs ~2 minutes; the suite's
RL engine tests run eager), so run by hand after touching the heads' compilation or the reload:

    VLLM_CPU_KVCACHE_SPACE=1 .venv/bin/python scripts/check_compiled_policy_update.py

Two compiled engines, each in its own process: bebop on the default model, updated to a perturbed
checkpoint (tests/test_rl_engine.py's ``make_other_checkpoint``) and back; and plain decoding built
from that checkpoint. Passes when T = 0 ids after the update differ from before, equal the plain
engine's, and the update back reproduces the first ids. Exit status 0 = pass, 1 = fail.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
ENGINE = dict(max_model_len=512, seed=0, max_num_seqs=16, dtype="float32")  # compiled: no enforce_eager


def _engine(which: str, other: str, out: str) -> None:
    from test_rl_engine import MAX_TOKENS, PROMPTS, float32_weights
    from test_rl_engine import _ids as ids
    from vllm import SamplingParams

    from bebop_vllm.paths import default_model_dir
    from bebop_vllm.rl import RolloutEngine

    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    res: dict[str, object] = {}
    if which == "bebop":
        eng = RolloutEngine(None, num_speculative_tokens=3, speculative_options={"draft_length": "fixed"}, **ENGINE)
        res["compiled"] = eng.llm.llm_engine.vllm_config.compilation_config.mode.name
        res["before"] = ids(eng.generate(PROMPTS, greedy)[0])
        eng.update_policy(other, version="other")
        res["other"] = ids(eng.generate(PROMPTS, greedy)[0])
        eng.update_policy(float32_weights(default_model_dir()), version="orig")
        res["back"] = ids(eng.generate(PROMPTS, greedy)[0])
    else:
        eng = RolloutEngine(other, num_speculative_tokens=0, **ENGINE)
        res["plain_other"] = ids(eng.generate(PROMPTS, greedy)[0])
    eng.close()
    Path(out).write_text(json.dumps(res))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", choices=["bebop", "plain"], help=argparse.SUPPRESS)  # child process
    ap.add_argument("--other", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.engine:
        _engine(args.engine, args.other, args.out)
        return 0
    from test_rl_engine import make_other_checkpoint

    with tempfile.TemporaryDirectory(prefix="bebop-compiled-check-") as tmp:
        other = str(make_other_checkpoint(Path(tmp) / "other"))
        res: dict[str, object] = {}
        for which in ("bebop", "plain"):
            out = Path(tmp) / f"{which}.json"
            subprocess.run([sys.executable, __file__, "--engine", which, "--other", other, "--out", str(out)],
                           check=True, cwd=REPO)
            res.update(json.loads(out.read_text()))
    checks = {
        "engine compiled": res["compiled"] != "NONE",
        "update changed the ids": res["other"] != res["before"],
        "updated ids == plain engine built from the new checkpoint": res["other"] == res["plain_other"],
        "update back reproduces the first ids": res["back"] == res["before"],
    }
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
