"""A compact GRPO loop on CPU: policy in torch/transformers, rollouts through :class:`RolloutEngine`.

Why not TRL's ``GRPOTrainer`` (1.16.0): docs/rl.md, "TRL". In short, its colocate mode builds its own
``vllm.LLM`` with a fixed keyword list (no ``speculative_config``), pins vLLM 0.22-0.31, and its
server mode syncs weights over NCCL only.

Task: generated integer arithmetic (``a op b``, train split = seeds not used for evaluation) with a
verifiable reward: 1 if the last integer in the completion equals the answer, else 0.

One step: ``prompts_per_step`` prompts x ``group_size`` samples from the engine (the current policy,
exactly: rejection sampling keeps the target distribution whatever the heads draft); group-normalised
advantages; one on-policy gradient step (GRPO's clipped ratio is 1 on the first and only pass, so the
loss is the policy gradient ``-sum A * log pi(token) / tokens``); the new weights are pushed into the
engine(s) every step. Measured on the rollout tokens with full-vocabulary sums: KL(pi_t || pi_0) and
the entropy of pi_t, in nats per token (pi_t = the policy that generated them).
"""

from __future__ import annotations

import math
import random
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

_OPS = ("+", "-", "*")
_INT = re.compile(r"-?\d+")


@dataclass(frozen=True)
class Task:
    prompt: str
    answer: int


def arithmetic_task(rng: random.Random) -> Task:
    op = rng.choice(_OPS)
    a, b = (rng.randint(2, 30), rng.randint(2, 12)) if op == "*" else (rng.randint(10, 99), rng.randint(10, 99))
    answer = a + b if op == "+" else a - b if op == "-" else a * b
    return Task(f"What is {a} {op} {b}? Reply with the number only.", answer)


def reward(completion: str, answer: int) -> float:
    """1.0 when the last integer in the completion is the answer (commas in numbers ignored)."""
    found = _INT.findall(completion.replace(",", ""))
    return 1.0 if found and int(found[-1]) == answer else 0.0


def group_advantages(rewards: list[float], group_size: int, eps: float = 1e-4) -> list[float]:
    """(r - mean) / (std + eps) within each group of ``group_size`` consecutive samples."""
    out = []
    for g in range(0, len(rewards), group_size):
        grp = rewards[g:g + group_size]
        mean = sum(grp) / len(grp)
        std = math.sqrt(sum((r - mean) ** 2 for r in grp) / len(grp))
        out.extend((r - mean) / (std + eps) for r in grp)
    return out


@dataclass
class GRPOConfig:
    model_dir: str | None = None
    prompts_per_step: int = 8
    group_size: int = 4
    max_new_tokens: int = 48
    temperature: float = 1.0
    lr: float = 5e-5
    max_grad_norm: float = 1.0
    micro_batch: int = 8
    seed: int = 0


class GRPO:
    """Holds the trainable policy, the frozen pi_0 (for KL) and the optimizer."""

    def __init__(self, cfg: GRPOConfig) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from bebop_vllm.paths import default_model_dir

        self.cfg = cfg
        model_dir = Path(cfg.model_dir) if cfg.model_dir else default_model_dir()
        torch.manual_seed(cfg.seed)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        for p in self.ref.parameters():
            p.requires_grad_(False)
        self.opt = torch.optim.AdamW(self.policy.parameters(), lr=cfg.lr, weight_decay=0.0)

    # -- rollouts -----------------------------------------------------------------------------------
    def tasks(self, step: int) -> list[Task]:
        rng = random.Random(f"train-{self.cfg.seed}-{step}")
        return [arithmetic_task(rng) for _ in range(self.cfg.prompts_per_step)]

    def prompt_ids(self, tasks: list[Task]) -> list[list[int]]:
        return [self.tokenizer.apply_chat_template([{"role": "user", "content": t.prompt}],
                                                   add_generation_prompt=True, tokenize=True, return_dict=False)
                for t in tasks]

    def sampling_params(self, step: int, temperature: float | None = None) -> Any:
        from vllm import SamplingParams

        return SamplingParams(n=self.cfg.group_size, temperature=self.cfg.temperature if temperature is None
                              else temperature, max_tokens=self.cfg.max_new_tokens, seed=self.cfg.seed * 100003 + step)

    def rollout(self, engine: Any, tasks: list[Task], step: int, temperature: float | None = None):
        prompts = [{"prompt_token_ids": ids} for ids in self.prompt_ids(tasks)]
        return engine.generate(prompts, self.sampling_params(step, temperature))

    # -- training -----------------------------------------------------------------------------------
    def train_step(self, tasks: list[Task], outputs: list[Any]) -> dict[str, float]:
        """One policy-gradient step on the rollouts; KL to pi_0 and entropy of the rollout policy."""
        seqs, rewards = [], []
        for task, out in zip(tasks, outputs, strict=True):
            for c in out.outputs:
                seqs.append((list(out.prompt_token_ids), list(c.token_ids)))
                rewards.append(reward(c.text, task.answer))
        adv = group_advantages(rewards, self.cfg.group_size)
        n_tokens = sum(len(c) for _, c in seqs)
        self.policy.train()
        self.opt.zero_grad(set_to_none=True)
        kl_sum = ent_sum = loss_sum = 0.0
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        for lo in range(0, len(seqs), self.cfg.micro_batch):
            batch = seqs[lo:lo + self.cfg.micro_batch]
            width = max(len(p) + len(c) for p, c in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            attn = torch.zeros_like(ids)
            mask = torch.zeros((len(batch), width), dtype=torch.bool)  # positions predicting a completion token
            for j, (p, c) in enumerate(batch):
                ids[j, :len(p) + len(c)] = torch.tensor(p + c)
                attn[j, :len(p) + len(c)] = 1
                mask[j, len(p) - 1:len(p) + len(c) - 1] = True
            a = torch.tensor(adv[lo:lo + len(batch)], dtype=torch.float32)[:, None].expand(-1, width)
            targets = torch.roll(ids, -1, dims=1)
            logits = self.policy(input_ids=ids, attention_mask=attn).logits.float()
            logp = F.log_softmax(logits, dim=-1)
            tok_logp = logp.gather(-1, targets[..., None]).squeeze(-1)
            loss = -(a * tok_logp)[mask].sum() / max(n_tokens, 1)
            loss.backward()
            loss_sum += float(loss.detach())
            with torch.no_grad():
                ref_logp = F.log_softmax(self.ref(input_ids=ids, attention_mask=attn).logits.float(), dim=-1)
                p = logp.detach().exp()
                kl_sum += float((p * (logp.detach() - ref_logp)).sum(-1)[mask].sum())
                ent_sum += float(-(p * logp.detach()).sum(-1)[mask].sum())
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.cfg.max_grad_norm))
        self.opt.step()
        groups = [rewards[g:g + self.cfg.group_size] for g in range(0, len(rewards), self.cfg.group_size)]
        return {
            "reward": sum(rewards) / max(len(rewards), 1),
            "kl": kl_sum / max(n_tokens, 1),  # KL(pi_t || pi_0), nats/token, on pi_t's own samples
            "entropy": ent_sum / max(n_tokens, 1),
            "loss": loss_sum,
            "grad_norm": grad_norm,
            "completion_tokens": n_tokens,
            "groups_with_signal": sum(len(set(g)) > 1 for g in groups) / max(len(groups), 1),
        }

    def policy_weights(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The policy's state dict in the engine's dtype (names as in the HF checkpoint)."""
        return {k: v.detach().to(dtype) for k, v in self.policy.state_dict().items()}

    def sync(self, engines: list[Any], version: int) -> list[Any]:
        """Push the current policy into every engine (validated, in place, prefix cache reset)."""
        updates = []
        for e in engines:
            updates.append(e.update_policy(self.policy_weights(e.engine_dtype), version=version))
        return updates


@dataclass
class StepRecord:
    step: int
    train: dict[str, float]
    rollout_seconds: float
    train_seconds: float
    sync_seconds: float
    rollout: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_grpo(engine: Any, cfg: GRPOConfig, steps: int) -> list[StepRecord]:
    """The plain loop: rollout -> train -> sync, ``steps`` times, on one engine."""
    grpo = GRPO(cfg)
    grpo.sync([engine], version=0)  # the engine starts from the same weights; this also times one sync
    records = []
    for step in range(steps):
        tasks = grpo.tasks(step)
        t0 = time.perf_counter()
        outputs, stats = grpo.rollout(engine, tasks, step)
        t1 = time.perf_counter()
        train = grpo.train_step(tasks, outputs)
        t2 = time.perf_counter()
        grpo.sync([engine], version=step + 1)
        t3 = time.perf_counter()
        records.append(StepRecord(step, train, t1 - t0, t2 - t1, t3 - t2, stats.to_dict()))
    return records
