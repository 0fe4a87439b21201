"""Is the sampled distribution exact under *any* draft-length schedule? A one-sample check.

The draft-length policies (``draft_length="auto"`` / ``"entropy"``) decide per step and request
how many drafts to propose (0..k), from past observations only; rejection sampling is exact for
any draft proposed independently of the target's coins, so no schedule may change what is
sampled. This script replaces the policy by a *random* schedule (each step: with probability
``--plain-step-prob`` a plain step, K = 0, else k_i uniform in 0..k per request) so that every
path occurs often, including "drafts proposed last step, this step planned plain" and requests
whose drafts are cut to fewer than the step's K, and then tests the engine's samples against the
**exact** target distribution, computed by transformers in float32 for every sampled prefix.

Statistic, per output position: the rank of the sampled token under p(. | prefix), binned
(1, 2, 3, 4, 5-8, 9-32, 33+); expected bin counts are the sums of the per-sample bin
probabilities; Pearson chi-square (conservative: the per-sample variances are below the
multinomial's). Biases of a verifier (mass moved between likely tokens, a wrong temperature)
move mass between ranks. Controls in the same run: the plain engine at T = 1 must pass, the
plain engine at ``--control-temperature`` (default 0.9) against the T = 1 reference must fail.

    python scripts/draft_schedule_exactness.py --samples 6000 --out benchmarks/results/schedule_exactness.json

(``tests/test_schedule_exactness.py`` runs it at 2,000 samples with a T = 0.95 control.)

Runs the engines in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so the schedule can be
replaced; one engine at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

PROMPT = "Once upon a time, in a small village,"
RANK_EDGES = (1, 2, 3, 4, 8, 32)  # bins: rank 1, 2, 3, 4, 5-8, 9-32, 33+


def random_schedule(seed: int, plain_step_prob: float):
    """A DraftPlanner.plan replacement: random per-request draft lengths, some all-plain steps."""
    rng = random.Random(seed)

    def plan(self, scheduler, scheduler_output) -> int:
        plain = rng.random() < plain_step_prob
        lengths = {}
        for req_id in scheduler_output.num_scheduled_tokens:
            request = scheduler.requests.get(req_id)
            decoding = request is not None and not request.is_prefill_chunk
            lengths[req_id] = rng.randint(0, self.max_k) if decoding and not plain else 0
        self.lengths = lengths
        return max(lengths.values(), default=0)

    return plan


def sample(engine: str, args, heads: str) -> tuple[list[list[int]], list[int], dict]:
    from vllm import LLM, SamplingParams

    stats = {"steps": 0, "plain_steps": 0}
    spec = None
    if engine == "bebop-random":
        from bebop_vllm.plugin.patches import draft_length

        plan = random_schedule(args.seed, args.plain_step_prob)

        def counted_plan(self, scheduler, scheduler_output) -> int:
            depths = plan(self, scheduler, scheduler_output)
            stats["steps"] += 1
            stats["plain_steps"] += depths == 0
            return depths

        draft_length.DraftPlanner.plan = counted_plan
        spec = {"method": "bebop", "model": heads, "num_speculative_tokens": args.k, "draft_length": "auto",
                "metrics": "detailed"}
    llm = LLM(model=args.model, max_model_len=256, enforce_eager=True, seed=args.seed,
              speculative_config=spec, max_num_seqs=256, dtype="float32")
    temperature = args.control_temperature if engine == "plain-control" else 1.0
    params = SamplingParams(temperature=temperature, max_tokens=args.tokens, ignore_eos=True)
    chunk = args.concurrency if engine == "bebop-random" else args.samples
    samples, prompt_ids, drafted, accepted = [], [], 0, 0
    t0 = time.perf_counter()
    for start in range(0, args.samples, chunk):
        outs = llm.generate([PROMPT] * min(chunk, args.samples - start), params, use_tqdm=False)
        for o in outs:
            samples.append(list(o.outputs[0].token_ids))
            prompt_ids = list(o.prompt_token_ids)
            m = o.outputs[0].spec_decode_metrics
            if m is not None:
                d = m.to_dict()
                drafted += sum(d.get("num_draft_tokens_per_pos") or [])
                accepted += sum(d.get("num_accepted_tokens_per_pos") or [])
    stats.update(seconds=round(time.perf_counter() - t0, 1), drafted=drafted, accepted=accepted)
    llm.llm_engine.engine_core.shutdown()
    del llm
    return samples, prompt_ids, stats


def rank_bins(model_dir: str, prompt_ids: list[int], samples: list[list[int]]):
    """Per sample and position, under the target's exact T = 1 distribution given the sampled
    prefix (transformers, float32): the sampled token's rank bin, and every bin's probability.

    Returns (bins [N, P] int64, bin_probs [N, P, len(RANK_EDGES) + 1] float64)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)  # an in-process vLLM engine may have pinned fewer
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids + s for s in samples])
    n_prompt, n_out = len(prompt_ids), len(samples[0])
    edges = torch.tensor(RANK_EDGES)
    all_bins, all_probs = [], []
    with torch.no_grad():
        for b in range(0, len(ids), 64):  # batches: [64, n_out, V] float32 is ~50 MB per position
            hidden = model.model(ids[b:b + 64]).last_hidden_state[:, n_prompt - 1:n_prompt - 1 + n_out]
            logits = model.lm_head(hidden).float()  # only the sampled positions: the lm_head dominates
            p = torch.softmax(logits, dim=-1)
            tokens = ids[b:b + 64, n_prompt:]
            p_token = p.gather(-1, tokens.unsqueeze(-1))
            rank = (p > p_token).sum(-1)  # 0-based rank of the sampled token, [B, P]
            all_bins.append(torch.bucketize(rank, edges, right=True))  # rank 0 -> bin 0, ..., >= 32 -> 6
            top = p.topk(RANK_EDGES[-1], dim=-1).values.double().cumsum(-1)  # a full sort is ~10x slower
            upper = torch.stack([top[..., e - 1] for e in RANK_EDGES] + [torch.ones_like(top[..., 0])], dim=-1)
            all_probs.append(torch.diff(upper, dim=-1, prepend=torch.zeros_like(upper[..., :1])))
    return torch.cat(all_bins), torch.cat(all_probs)


def rank_bin_test(bins, bin_probs, level: float = 0.001 / 4) -> list[dict]:
    """Per position: observed vs expected rank-bin counts and the Pearson chi-square p-value."""
    import torch
    from scipy.stats import chi2

    out = []
    for pos in range(bins.shape[1]):
        observed = torch.bincount(bins[:, pos], minlength=len(RANK_EDGES) + 1).double()
        expected = bin_probs[:, pos].sum(0)
        keep = expected >= 5  # pool sparse bins into the last kept one
        if not bool(keep.all()):
            last = int(keep.nonzero().max())
            observed[last] += observed[~keep].sum()
            expected[last] += expected[~keep].sum()
            observed, expected = observed[keep], expected[keep]
        stat = float(((observed - expected) ** 2 / expected).sum())
        out.append({"position": pos + 1, "observed": observed.tolist(),
                    "expected": [round(x, 1) for x in expected.tolist()],
                    "chi2": round(stat, 2), "df": len(observed) - 1,
                    "p": float(chi2.sf(stat, len(observed) - 1)),
                    "detectable_shift": round(detectable_shift(expected.tolist(), level), 4)})
    return out


def detectable_shift(expected: list[float], level: float, power: float = 0.9) -> float:
    """The probability mass moved from rank 1 to rank 2 (averaged over samples) that this
    position's test detects with probability ``power`` at significance ``level`` (noncentral
    chi-square with noncentrality N * sum (delta_i^2 / p_i))."""
    from scipy.optimize import brentq
    from scipy.stats import chi2, ncx2

    n = sum(expected)
    p = [e / n for e in expected]
    df = len(p) - 1
    critical = chi2.isf(level, df)

    def power_at(d: float) -> float:
        return float(ncx2.sf(critical, df, n * d * d * (1 / p[0] + 1 / p[1])))

    top = min(p[0], 0.5)
    return brentq(lambda d: power_at(d) - power, 1e-9, top) if power_at(top) > power else float("nan")


def main() -> int:
    from bebop_vllm.paths import SHIPPED_HEADS_DIR, default_model_dir

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=3000, help="samples per engine (default 3000)")
    ap.add_argument("--tokens", type=int, default=4, help="output tokens per sample (default 4)")
    ap.add_argument("--k", type=int, default=3, help="max drafts per step (default 3)")
    ap.add_argument("--concurrency", type=int, default=4,
                    help="requests per generate call for the bebop engine (default 4)")
    ap.add_argument("--plain-step-prob", type=float, default=0.4,
                    help="probability that a step is planned plain, K = 0 (default 0.4)")
    ap.add_argument("--control-temperature", type=float, default=0.9,
                    help="negative control: the plain engine at this temperature must fail (default 0.9)")
    ap.add_argument("--engines", default="plain,plain-control,bebop-random",
                    help="comma-separated subset of plain, plain-control, bebop-random")
    ap.add_argument("--seed", type=int, default=0, help="engine seed and the random schedule's seed (default 0)")
    ap.add_argument("--model", default=None, help="target model dir (default: bebop's default model)")
    ap.add_argument("--heads", default=str(SHIPPED_HEADS_DIR), help="heads dir (default: shipped heads)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    args.model = args.model or str(default_model_dir())

    from bebop_vllm.hardware import machine_info

    report = {"command": "python " + " ".join(sys.argv), "machine": machine_info(), "args": vars(args), "engines": {}}
    for engine in args.engines.split(","):
        samples, prompt_ids, stats = sample(engine, args, args.heads)
        t0 = time.perf_counter()
        tests = rank_bin_test(*rank_bins(args.model, prompt_ids, samples))
        stats["reference_seconds"] = round(time.perf_counter() - t0, 1)
        report["engines"][engine] = {"stats": stats, "tests": tests, "min_p": min(t["p"] for t in tests)}
        print(json.dumps({engine: report["engines"][engine]}, indent=1), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
