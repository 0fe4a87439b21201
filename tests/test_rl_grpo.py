"""The GRPO loop's pieces without an engine: reward, advantages, one train step on fake rollouts."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from bebop_vllm.rl.grpo import GRPO, GRPOConfig, arithmetic_task, group_advantages, reward


def test_reward_and_tasks():
    rng = random.Random(0)
    for _ in range(50):
        t = arithmetic_task(rng)
        expr = t.prompt.removeprefix("What is ").split("?")[0]
        assert eval(expr) == t.answer  # noqa: S307 - our own generated arithmetic
        assert reward(f"The answer is {t.answer}.", t.answer) == 1.0
        assert reward(f"{t.answer} or maybe {t.answer + 1}", t.answer) == 0.0  # the last number counts
    assert reward("1,234", 1234) == 1.0 and reward("no number", 3) == 0.0 and reward("-7", -7) == 1.0


def test_group_advantages():
    adv = group_advantages([1, 0, 0, 0, 1, 1, 1, 1], 4)
    assert sum(adv[:4]) == pytest.approx(0, abs=1e-6) and adv[0] > 0 > adv[1]
    assert adv[4:] == [0.0] * 4  # no signal in a group where every sample scored the same


def test_train_step_kl_zero_then_positive():
    pytest.importorskip("transformers")
    from bebop_vllm.paths import default_model_dir

    if not (default_model_dir() / "model.safetensors").is_file():
        pytest.skip("default model not fetched")
    grpo = GRPO(GRPOConfig(prompts_per_step=1, group_size=2, lr=1e-4, micro_batch=2))
    tasks = grpo.tasks(0)
    prompt = grpo.prompt_ids(tasks)[0]
    right = grpo.tokenizer.encode(str(tasks[0].answer), add_special_tokens=False)
    wrong = grpo.tokenizer.encode(str(tasks[0].answer + 1), add_special_tokens=False)
    out = SimpleNamespace(prompt_token_ids=prompt, outputs=[
        SimpleNamespace(token_ids=right, text=str(tasks[0].answer)),
        SimpleNamespace(token_ids=wrong, text=str(tasks[0].answer + 1))])
    first = grpo.train_step(tasks, [out])
    assert first["reward"] == 0.5 and first["groups_with_signal"] == 1.0
    assert first["kl"] == pytest.approx(0.0, abs=1e-6) and first["entropy"] > 0  # pi_0 == pi_t before the step
    second = grpo.train_step(tasks, [out])
    assert second["kl"] > 0  # the step moved the policy
    w = grpo.policy_weights(__import__("torch").bfloat16)
    assert "model.embed_tokens.weight" in w and all(t.dtype.is_floating_point for t in w.values())


def _fake_steps(n, kl, gap, drift_from=None):
    steps = []
    for i in range(n):
        mon = {"observed": 0.3 - gap, "predicted": 0.3, "gap": gap, "below_fit": gap > 0.05,
               "drift": drift_from is not None and i >= drift_from}
        spec = {"rollout_seconds": 2.0, "sync_seconds": 0.3, "stats": {"mean_tokens_per_verify_step": 1.6},
                "monitor": mon}
        plain = {"rollout_seconds": 3.0, "sync_seconds": 0.3, "stats": {"mean_tokens_per_verify_step": None}}
        steps.append({"step": i, "train": {"reward": 0.5, "kl": kl * (i + 1) / n, "entropy": 0.8},
                      "train_seconds": 5.0, "arms": {"bebop": spec, "plain": plain}})
    return steps


def test_rl_stability_verdict_and_report(tmp_path):
    import sys

    from bebop_vllm.paths import REPO_ROOT

    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    import rl_stability as rs

    assert rs.verdict(_fake_steps(2, 0.2, 0.0))["verdict"] == "INCONCLUSIVE"  # too few steps
    assert rs.verdict(_fake_steps(12, 0.01, 0.0))["verdict"] == "INCONCLUSIVE"  # policy did not move
    assert rs.verdict(_fake_steps(12, 0.2, 0.01))["verdict"] == "HOLDS"
    assert rs.verdict(_fake_steps(12, 0.2, 0.2, drift_from=4))["verdict"] == "FAILS"
    assert rs.verdict(_fake_steps(12, 0.2, 0.2))["verdict"] == "MIXED"  # big gap, never two in a row flagged
    steps = _fake_steps(12, 0.2, 0.01)
    summ = rs.summarize(steps, ["bebop", "plain"])
    assert summ["bebop"]["rollout_speedup_vs_plain"] == pytest.approx(1.5)
    assert summ["bebop"]["rl_step_speedup_vs_plain"] == pytest.approx(8.3 / 7.3)
    fit = {"label": "x", "entropy_range": [0.1, 2.0],
           "positions": [{"intercept": 0.4, "slope": -0.05, "n": 5, "drafts": 50, "residual_sd": 0.1}]}
    result = {"meta": {"command": "c", "started": "s", "wall_seconds": 1.0, "machine": "m"}, "arms": ["bebop", "plain"],
              "fits": {"bebop": fit}, "greedy_crossover": None, "steps": steps, "summary": summ,
              "verdict": rs.verdict(steps), "figure": "rl_stability.png"}
    rs.write_md(result, tmp_path / "r.md")
    text = (tmp_path / "r.md").read_text()
    assert "## Verdict: HOLDS" in text and "| bebop | 2.00 |" in text
    pytest.importorskip("matplotlib")
    rs.plot(result, tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 1000
