"""Do heads trained before RL stay good while GRPO trains the policy? (issue 13)

    .venv/bin/python benchmarks/rl_stability.py            # ~30 GRPO steps, all arms (hours on 2 CPU cores)
    .venv/bin/python benchmarks/rl_stability.py --quick    # 2 steps, 2 arms, tiny batches (CI)

One GRPO run (bebop_vllm.rl.grpo: SmolLM2-135M, generated arithmetic with a checkable answer) trains
the policy from the rollouts of the first arm; after every step the new weights are pushed into every
arm's engine (RolloutEngine.update_policy), and every arm generates the same prompts with the same
seeds, so the arms are compared on the very same policies. Arms:

    bebop   frozen default (shipped) heads + rejection sampling   (the claim under test)
    ce      frozen CE heads (heads/smollm2-135m-ce) + rejection sampling
    greedy  frozen default heads + greedy drafting
    plain   no speculation (rollout time baseline)

Before RL, each speculative arm is calibrated: rollouts of pi_0 at several temperatures give its
acceptance-vs-entropy fit (AcceptanceFit); during RL an AcceptanceMonitor per arm compares each step
with that fit at the step's entropy (raw acceptance is no staleness signal: RL moves entropy).

Per step: reward, KL(pi_t || pi_0) and entropy (nats/token, full vocabulary, on the rollout tokens),
per arm the engine-measured acceptance per position, tokens per verify step, target entropy, rollout
time, the monitor's gap / drift, and the policy sync time. The verdict rule (VERDICT_RULE) is fixed
here, before any run. Outputs: OUT/rl_stability.json, .md and .png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bebop_vllm.paths import REPO_ROOT, SHIPPED_HEADS_DIR  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "results"
KL_MOVED = 0.05  # nats/token: below this the policy did not move enough for the run to say anything
MIN_STEPS_FOR_VERDICT = 10
GAP_TOLERANCE = 0.05

VERDICT_RULE = f"""\
Fixed before the run (issue 13). Arm under test: "bebop" (frozen default heads + rejection sampling).
1. INCONCLUSIVE if the policy did not move: max KL(pi_t || pi_0) over the run < {KL_MOVED} nats/token,
   or fewer than {MIN_STEPS_FOR_VERDICT} RL steps ran (--quick never gives a verdict).
2. Moved steps: the steps with KL >= {KL_MOVED}. On them, gap = acceptance predicted by the pre-RL
   acceptance-vs-entropy fit at the step's entropy - acceptance observed (all positions pooled), and the
   AcceptanceMonitor drift flag (below fit: gap > max({GAP_TOLERANCE}, 3 se); drift: 2 steps in a row).
   HOLDS  if drift is never flagged on a moved step and the mean gap over moved steps <= {GAP_TOLERANCE};
   FAILS  if drift is flagged on a moved step and the mean gap over moved steps > {GAP_TOLERANCE};
   MIXED  otherwise.
3. Reported, not part of the verdict: the same numbers for the CE heads and greedy drafting, tokens per
   verify step at the first vs last step, and the RL step time of each arm vs plain decoding."""

# The acceptance arms draft a fixed k: they measure acceptance per position at k drafts, which the
# default draft_length="auto" would vary per step (and, with a full batch on a CPU, switch off).
# "auto" is the product's default config, measured for rollout and RL step time only.
FIXED = {"draft_length": "fixed"}
ARMS: dict[str, dict[str, Any]] = {
    "bebop": {"heads": str(SHIPPED_HEADS_DIR), "options": FIXED},
    "ce": {"heads": str(REPO_ROOT / "heads" / "smollm2-135m-ce"), "options": FIXED},
    "greedy": {"heads": str(SHIPPED_HEADS_DIR), "options": {**FIXED, "draft_sampling": "greedy"}},
    "auto": {"heads": str(SHIPPED_HEADS_DIR), "options": {}, "timing_only": True},
    "plain": {"heads": None, "options": None},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--arms", default="bebop,ce,greedy,auto,plain",
                   help="comma list; the first one drives training (bebop/ce/greedy: fixed k, acceptance arms; "
                   "auto: default heads with the default draft_length=auto, rollout time only; plain: no speculation)")
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=1.0, help="rollout temperature during RL")
    p.add_argument("--lr", type=float, default=3e-5,
                   help="Adam learning rate: high enough that KL(pi_t||pi_0) reaches 0.05 nats/token, low enough "
                   "to move gradually (1e-4 gave KL 0.16 after one step and 0.5 after two)")
    p.add_argument("--k", type=int, default=3, help="num_speculative_tokens")
    p.add_argument("--calib-temperatures", default="0.6,1.0,1.4")
    p.add_argument("--calib-prompts", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help="policy model folder (default: the fetched SmolLM2-135M)")
    p.add_argument("--out", type=Path, default=None, help=f"output folder (default {DEFAULT_OUT}, "
                   "or a rl_stability_quick subfolder with --quick)")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                   help="engine dtype; auto: bfloat16 on CUDA or CPUs with bf16 instructions, else float32 "
                   "(emulated bf16 decodes several times slower)")
    p.add_argument("--quick", action="store_true", help="2 steps, arms bebop+plain, tiny batches (CI)")
    args = p.parse_args(argv)
    if args.dtype == "auto":
        from bebop_vllm.hardware import fast_engine_dtype

        args.dtype = fast_engine_dtype()
    if args.quick:
        args.steps, args.prompts_per_step, args.group_size, args.max_new_tokens = 2, 2, 2, 16
        args.calib_temperatures, args.calib_prompts = "0.7,1.3", 2
        if args.arms == p.get_default("arms"):
            args.arms = "bebop,plain"
    if args.out is None:
        args.out = DEFAULT_OUT / "rl_stability_quick" if args.quick else DEFAULT_OUT
    return args


def build_engines(args: argparse.Namespace, arms: list[str]) -> dict[str, Any]:
    from bebop_vllm.rl import RolloutEngine

    engines = {}
    for arm in arms:
        spec = ARMS[arm]
        t0 = time.perf_counter()
        engines[arm] = RolloutEngine(
            args.model, heads=spec["heads"], num_speculative_tokens=args.k if spec["heads"] else 0,
            speculative_options=spec["options"] or None, dtype=args.dtype, max_model_len=512,
            enforce_eager=True, seed=args.seed, max_num_seqs=max(args.prompts_per_step * args.group_size, 8))
        print(f"[rl_stability] engine {arm}: {time.perf_counter() - t0:.0f} s to start", flush=True)
    return engines


def calibrate(grpo: Any, engines: dict[str, Any], temps: list[float], n_prompts: int) -> dict[str, Any]:
    """Pre-RL acceptance-vs-entropy fit per speculative arm, from pi_0 rollouts at several temperatures."""
    import random

    from bebop_vllm.rl import AcceptanceFit
    from bebop_vllm.rl.grpo import arithmetic_task

    rng = random.Random(f"calib-{grpo.cfg.seed}")
    tasks = [arithmetic_task(rng) for _ in range(n_prompts)]
    fits = {}
    for arm, eng in engines.items():
        if eng.speculative_config is None or ARMS[arm].get("timing_only"):
            continue
        stats = [grpo.rollout(eng, tasks, step=-1 - i, temperature=t)[1] for i, t in enumerate(temps)]
        fits[arm] = AcceptanceFit.fit(stats, label=f"{arm} pre-RL")
    return fits


def verdict(steps: list[dict[str, Any]], arm: str = "bebop") -> dict[str, Any]:
    kls = [s["train"]["kl"] for s in steps]
    out: dict[str, Any] = {"arm": arm, "rule": VERDICT_RULE, "max_kl": max(kls, default=0.0), "steps": len(steps)}
    if len(steps) < MIN_STEPS_FOR_VERDICT or out["max_kl"] < KL_MOVED:
        why = (f"only {len(steps)} steps" if len(steps) < MIN_STEPS_FOR_VERDICT
               else f"max KL {out['max_kl']:.4f} < {KL_MOVED} nats/token: the policy did not move enough")
        return {**out, "verdict": "INCONCLUSIVE", "why": why}
    moved = [s for s in steps if s["train"]["kl"] >= KL_MOVED and arm in s["arms"]]
    gaps = [s["arms"][arm]["monitor"]["gap"] for s in moved]
    drift = any(s["arms"][arm]["monitor"]["drift"] for s in moved)
    mean_gap = sum(gaps) / len(gaps)
    v = ("HOLDS" if not drift and mean_gap <= GAP_TOLERANCE else
         "FAILS" if drift and mean_gap > GAP_TOLERANCE else "MIXED")
    why = (f"{len(moved)} moved steps (KL >= {KL_MOVED}); mean gap {mean_gap:+.3f} (fit - observed), "
           f"drift flagged: {drift}")
    return {**out, "verdict": v, "why": why, "moved_steps": len(moved), "mean_gap": mean_gap, "drift": drift}


def summarize(steps: list[dict[str, Any]], arms: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    train_s = [s["train_seconds"] for s in steps]
    for arm in arms:
        rows = [s["arms"][arm] for s in steps]
        step_s = [r["rollout_seconds"] + t + r["sync_seconds"] for r, t in zip(rows, train_s, strict=True)]
        tau = [r["stats"]["mean_tokens_per_verify_step"] for r in rows]
        out[arm] = {
            "mean_rollout_seconds": sum(r["rollout_seconds"] for r in rows) / len(rows),
            "mean_sync_seconds": sum(r["sync_seconds"] for r in rows) / len(rows),
            "mean_rl_step_seconds": sum(step_s) / len(step_s),
            "tokens_per_verify_step_first": tau[0], "tokens_per_verify_step_last": tau[-1],
            "drift_steps": sum(bool(r.get("monitor", {}).get("drift")) for r in rows),
        }
    if "plain" in out:
        for arm in arms:
            base, mine = out["plain"], out[arm]
            mine["rollout_speedup_vs_plain"] = base["mean_rollout_seconds"] / mine["mean_rollout_seconds"]
            mine["rl_step_speedup_vs_plain"] = base["mean_rl_step_seconds"] / mine["mean_rl_step_seconds"]
    out["mean_train_seconds"] = sum(train_s) / len(train_s)
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = result["steps"]
    x = [s["step"] for s in steps]
    fig, ax = plt.subplots(2, 2, figsize=(11, 7.5))
    a = ax[0][0]
    a.plot(x, [s["train"]["reward"] for s in steps], "o-", label="reward")
    a.set_xlabel("GRPO step")
    a.set_ylabel("reward")
    b = a.twinx()
    b.plot(x, [s["train"]["kl"] for s in steps], "s--", color="tab:red", label="KL(pi_t||pi_0)")
    b.axhline(KL_MOVED, color="tab:red", lw=0.6, ls=":")
    b.set_ylabel("KL nats/token")
    a.set_title("policy: reward and KL to pi_0")
    for arm in result["arms"]:
        rows = [s["arms"][arm] for s in steps]
        if "monitor" in rows[0]:
            (line,) = ax[0][1].plot(x, [r["monitor"]["observed"] for r in rows], "o-", label=f"{arm} observed")
            ax[0][1].plot(x, [r["monitor"]["predicted"] for r in rows], "--", color=line.get_color(),
                          label=f"{arm} pre-RL fit")
            ax[1][0].plot(x, [r["stats"]["mean_tokens_per_verify_step"] for r in rows], "o-", label=arm)
        ax[1][1].plot(x, [r["rollout_seconds"] for r in rows], "o-", label=arm)
    ax[0][1].set_title("draft acceptance (pooled) vs pre-RL fit at the step's entropy")
    ax[1][0].set_title("tokens per verify step (engine)")
    ax[1][1].set_title("rollout seconds per step")
    for a in (ax[0][1], ax[1][0], ax[1][1]):
        a.set_xlabel("GRPO step")
        a.legend(fontsize=7)
    fig.suptitle(f"RL stability of frozen heads - verdict: {result['verdict']['verdict']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_md(result: dict[str, Any], path: Path) -> None:
    from bebop_vllm.hardware import describe_machine

    v, summ = result["verdict"], result["summary"]
    lines = ["# RL stability of frozen heads (issue 13)\n", f"Command: `{result['meta']['command']}`  ",
             f"Started {result['meta']['started']}, {result['meta']['wall_seconds']:.0f} s wall, "
             f"{describe_machine(result['meta']['machine'])}"
             + ("" if result["meta"].get("complete", True) else " (PARTIAL: the run was stopped before its last step)")
             + "\n", f"## Verdict: {v['verdict']}\n", v["why"] + "\n",
             "```", v["rule"], "```\n", "## Arms\n",
             "| arm | rollout s/step | sync s | RL step s | rollout speedup | RL step speedup "
             "| tokens/verify first -> last | drift steps |", "|---|---|---|---|---|---|---|---|"]
    for arm in result["arms"]:
        s = summ[arm]
        tau0, tau1 = s["tokens_per_verify_step_first"], s["tokens_per_verify_step_last"]
        taus = " -> ".join("-" if t is None else f"{t:.3f}" for t in (tau0, tau1))
        lines.append(f"| {arm} | {s['mean_rollout_seconds']:.2f} | {s['mean_sync_seconds']:.2f} | "
                     f"{s['mean_rl_step_seconds']:.2f} | {s.get('rollout_speedup_vs_plain', math.nan):.2f} | "
                     f"{s.get('rl_step_speedup_vs_plain', math.nan):.2f} | {taus} | {s['drift_steps']} |")
    lines += ["", f"Mean train time per step: {summ['mean_train_seconds']:.1f} s. Sync = validation + staging + "
              "in-place reload + prefix-cache reset.\n", "## Pre-RL fits (acceptance = a + b * entropy)\n"]
    for arm, fit in result["fits"].items():
        pos = ", ".join(f"pos {i}: {p['intercept']:.3f} {p['slope']:+.3f} H" for i, p in enumerate(fit["positions"]))
        lines.append(f"- {arm}: {pos} (entropy {fit['entropy_range'][0]:.2f}-{fit['entropy_range'][1]:.2f})")
    if result.get("greedy_crossover"):
        lines.append("\nGreedy drafting vs rejection sampling (bebop heads): " + "; ".join(
            f"pos {c['position']}: greedy better {c['greedy_better']} H* = "
            f"{'-' if c['entropy'] is None else format(c['entropy'], '.2f')}" for c in result["greedy_crossover"]))
    monitored = [a for a in result["arms"] if a in result["fits"]]
    lines += ["\n## Per step\n", "| step | reward | KL | entropy | " + " | ".join(
        f"{a} acc (fit) | {a} tok/verify" for a in monitored) + " |", "|---" * (4 + 2 * len(monitored)) + "|"]
    for s in result["steps"]:
        tr = s["train"]
        cells = [str(s["step"]), f"{tr['reward']:.2f}", f"{tr['kl']:.4f}", f"{tr['entropy']:.3f}"]
        for a in monitored:
            m, st = s["arms"][a]["monitor"], s["arms"][a]["stats"]
            flag = " DRIFT" if m["drift"] else (" below" if m["below_fit"] else "")
            cells += [f"{m['observed']:.3f} ({m['predicted']:.3f}){flag}", f"{st['mean_tokens_per_verify_step']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"\n![plot]({result['figure']})\n")
    path.write_text("\n".join(lines))


def write_results(args: argparse.Namespace, argv: list[str] | None, arms: list[str], fits: dict[str, Any],
                  cross: Any, steps: list[dict[str, Any]], started: str, t_start: float,
                  initial_sync: dict[str, float], complete: bool) -> dict[str, Any]:
    """Writes OUT/rl_stability.{json,png,md}; called after every step (complete=False) so a run
    stopped early still leaves every finished step on disk."""
    from bebop_vllm.hardware import machine_info

    result = {
        "meta": {"command": "python benchmarks/rl_stability.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                 "started": started, "wall_seconds": time.perf_counter() - t_start, "complete": complete,
                 "machine": machine_info(), "initial_sync_seconds": initial_sync,
                 "heads_fingerprints_unchanged": True},
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "arms": arms, "fits": {a: f.to_dict() for a, f in fits.items()},
        "greedy_crossover": None if cross is None else [c.__dict__ for c in cross],
        "steps": steps, "summary": summarize(steps, arms),
        "verdict": verdict(steps) if not args.quick else {**verdict([]), "why": "--quick: no verdict"},
        "figure": "rl_stability.png",
    }
    (args.out / "rl_stability.json").write_text(json.dumps(result, indent=1, default=str))
    plot(result, args.out / "rl_stability.png")
    write_md(result, args.out / "rl_stability.md")
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from bebop_vllm.rl import AcceptanceMonitor
    from bebop_vllm.rl.grpo import GRPO, GRPOConfig

    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise SystemExit(f"unknown arm(s) {unknown}; choose from {list(ARMS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    started, t_start = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), time.perf_counter()
    cfg = GRPOConfig(model_dir=args.model, prompts_per_step=args.prompts_per_step, group_size=args.group_size,
                     max_new_tokens=args.max_new_tokens, temperature=args.temperature, lr=args.lr, seed=args.seed)
    grpo = GRPO(cfg)
    engines = build_engines(args, arms)
    initial_sync = {arm: u.seconds for arm, u in zip(arms, grpo.sync(list(engines.values()), 0), strict=True)}
    heads_fp = {arm: e.heads_fingerprint() for arm, e in engines.items()}
    fits = calibrate(grpo, engines, [float(t) for t in args.calib_temperatures.split(",")], args.calib_prompts)
    monitors = {arm: AcceptanceMonitor(fit, fits.get("greedy") if arm == "bebop" else None)
                for arm, fit in fits.items()}
    driver = arms[0]
    steps: list[dict[str, Any]] = []
    for step in range(args.steps):
        tasks = grpo.tasks(step)
        row: dict[str, Any] = {"step": step, "arms": {}}
        driver_outputs = None
        for arm, eng in engines.items():
            outputs, stats = grpo.rollout(eng, tasks, step)
            rec: dict[str, Any] = {"rollout_seconds": stats.seconds, "stats": stats.to_dict()}
            if arm in monitors:
                rec["monitor"] = monitors[arm].observe(stats, step=step).to_dict()
            row["arms"][arm] = rec
            if arm == driver:
                driver_outputs = outputs
        t0 = time.perf_counter()
        row["train"] = grpo.train_step(tasks, driver_outputs)
        row["train_seconds"] = time.perf_counter() - t0
        for arm, upd in zip(engines, grpo.sync(list(engines.values()), step + 1), strict=True):
            row["arms"][arm]["sync_seconds"] = upd.seconds
            row["arms"][arm]["sync"] = {"validate": upd.validate_seconds, "stage": upd.stage_seconds,
                                        "load": upd.load_seconds}
        steps.append(row)
        write_results(args, argv, arms, fits, None, steps, started, t_start, initial_sync, complete=False)
        d = row["arms"][driver]
        print(f"[rl_stability] step {step}: reward {row['train']['reward']:.2f} KL {row['train']['kl']:.4f} "
              f"H {row['train']['entropy']:.3f} | {driver}: rollout {d['rollout_seconds']:.1f} s, acc "
              f"{d['stats']['acceptance']}, sync {d['sync_seconds']:.2f} s", flush=True)
    for arm, e in engines.items():
        if e.heads_fingerprint() != heads_fp[arm]:
            raise SystemExit(f"the heads of arm {arm} changed during RL: they must stay frozen")
    cross = monitors["bebop"].greedy_crossover() if "bebop" in monitors else None
    result = write_results(args, argv, arms, fits, cross, steps, started, t_start, initial_sync, complete=True)
    print(f"[rl_stability] verdict: {result['verdict']['verdict']} - {result['verdict']['why']}")
    print(f"[rl_stability] wrote {args.out / 'rl_stability.md'}")
    for e in engines.values():
        e.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
