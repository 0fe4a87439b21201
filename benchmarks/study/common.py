"""Study configuration, the per-stage result cache (resumability) and head discovery."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bebop_vllm import hardware
from bebop_vllm.paths import REPO_ROOT, SHIPPED_HEADS_DIR

LOSS_ORDER = ("e2e-tv", "ce", "kl", "tv", "hybrid")
# Heads made by fine-tuning (``bebop train --init-from``): CE heads trained further with e2e-TV,
# and the control with the same extra budget spent on CE.
FINETUNE_ORDER = ("ce-then-e2e-tv", "ce-then-ce")
HEADS_ROOT = REPO_ROOT / "heads"
HEAD_PREFIX = "smollm2-135m-"
SHIPPED_HEAD_NAME = SHIPPED_HEADS_DIR.name.removeprefix(HEAD_PREFIX)  # the default primary, e.g. "v5"
MODES = ("probabilistic", "greedy")
# Memory of one CPU engine besides its KV cache (the 135M model, vLLM, torch): ~1.5 GiB resident,
# measured on the 2-core machines (3.5 GiB with a 2 GiB KV cache).
ENGINE_BASE_GIB = 1.5


def engine_memory_warning(kv_gib: float, engines_at_once: int, free_gib: float | None,
                          base_gib: float = ENGINE_BASE_GIB) -> str | None:
    """A warning when ``engines_at_once`` engines, each with ``kv_gib`` of KV cache
    (``VLLM_CPU_KVCACHE_SPACE``), will not fit in ``free_gib`` (None: unknown, no warning).
    On 2026-12-07 an exported ``VLLM_CPU_KVCACHE_SPACE=2`` with four engines at once left 0.4 GiB
    free and two engines of the study failed to start (reported as FAILED rows); the study's own
    default is 1 GiB."""
    if free_gib is None:
        return None
    need = engines_at_once * (kv_gib + base_gib)
    if need <= free_gib:
        return None
    return (f"{engines_at_once} engines at once with VLLM_CPU_KVCACHE_SPACE={kv_gib:g} GiB each need about "
            f"{need:.1f} GiB, but {free_gib:.1f} GiB is free: engines may fail to start. Unset "
            f"VLLM_CPU_KVCACHE_SPACE (the study then uses 1 GiB) or lower --engines-at-once.")


def free_memory_gib() -> float | None:
    """MemFree from /proc/meminfo in GiB (None where there is no such file). Free, not available:
    vLLM's CPU worker refuses to start when its KV cache exceeds the NUMA node's MemFree
    (vllm/utils/cpu_resource_utils.py:218, vLLM 0.32), so page cache counts as used."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemFree:"):
                return int(line.split()[1]) / 2**20  # kB -> GiB
    except (OSError, ValueError, IndexError):
        return None
    return None


@dataclass
class StudyConfig:
    """Everything that determines the study's numbers (hashed into the stage cache keys)."""

    model_dir: str
    heads: dict[str, str]  # loss name -> heads folder
    primary: str  # the head used for claims 1 and 2 (e2e-tv when it exists)
    domains: list[str]
    prompts_per_domain: int
    max_prompt_tokens: int
    max_new_tokens: int
    temperatures: list[float]
    compare_temperatures: list[float]  # claim 3: every head is evaluated at these
    num_depths: int
    seed: int
    # engine part (claim 4 and the cross-check)
    engine: bool
    engine_prompts_per_domain: int
    engine_max_new_tokens: int
    engine_temperatures: list[float]
    engine_configs: list[tuple[str, str, int]]  # (head loss, draft mode, draft tokens k) run in vLLM
    engines_at_once: int = 4
    analytic_prompts_per_domain: int | None = None  # teacher-force only the first N prompts per domain
    source: str = "sampled"  # or "heads-heldout": the heads' T=1 held-out set evaluated at every T
    quick: bool = False
    dtype: str = "bfloat16"  # vLLM engines' dtype (sampling and timed runs)
    extra: dict[str, Any] = field(default_factory=dict)

    def key(self, *names: str) -> str:
        """Hash of the named fields (all fields when none are named): the stage cache key."""
        d = asdict(self)
        d.pop("extra", None)
        # heads are named by path: add their content, so retrained heads never reuse stale stages
        d["heads"] = {name: [path, _heads_fingerprint(path)] for name, path in d["heads"].items()}
        if names:
            d = {n: d[n] for n in names}
        blob = json.dumps(d, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def result_key(stage_key: str, inputs: Any) -> str:
    """Key of a stage computed from another stage's *result*: ``stage_key`` plus a hash of
    ``inputs`` (JSON). A stage keyed on settings alone (the cross-check on ``cfg.key()``) was
    served from the cache of a run whose timed stage had failed engines: its table then covered
    only the engines that ran that time."""
    blob = json.dumps(inputs, sort_keys=True, default=str)
    return hashlib.sha256((stage_key + blob).encode()).hexdigest()[:12]


def _heads_fingerprint(path: str | Path) -> str:
    """sha256 of a heads folder's weights and metadata (empty string when missing)."""
    h = hashlib.sha256()
    for name in ("model.safetensors", "bebop.json"):
        f = Path(path) / name
        if f.is_file():
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


class StageCache:
    """One JSON file per stage under ``<out>/cache``: a stage whose key matches is not recomputed."""

    def __init__(self, out_dir: Path) -> None:
        self.dir = out_dir / "cache"
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.dir / f"{name}.json"

    def get(self, name: str, key: str) -> Any | None:
        p = self.path(name)
        if not p.is_file():
            return None
        try:
            blob = json.loads(p.read_text())
        except json.JSONDecodeError:
            return None
        return blob["result"] if blob.get("key") == key else None

    def put(self, name: str, key: str, result: Any, seconds: float) -> None:
        tmp = self.path(name).with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key, "seconds": round(seconds, 1), "result": result}) + "\n")
        tmp.replace(self.path(name))

    def run(self, name: str, key: str, fn: Callable[[], Any], log: Callable[[str], None] = print) -> Any:
        """The cached result of stage ``name`` for ``key``, or run ``fn`` and cache its result."""
        cached = self.get(name, key)
        if cached is not None:
            log(f"[{name}] cached ({self.path(name).name})")
            return cached
        t0 = time.time()
        result = fn()
        self.put(name, key, result, time.time() - t0)
        log(f"[{name}] done in {time.time() - t0:.0f} s")
        return result

    def seconds(self, name: str) -> float | None:
        p = self.path(name)
        return json.loads(p.read_text()).get("seconds") if p.is_file() else None


def discover_heads(root: Path = HEADS_ROOT) -> dict[str, Path]:
    """The shipped default heads (under their name without the prefix, e.g. ``v5``: the study's
    default primary) and the heads by loss and fine-tune: ``heads/smollm2-135m-<name>/`` folders
    that hold a complete checkpoint."""
    out: dict[str, Path] = {}
    for loss in (SHIPPED_HEAD_NAME, *LOSS_ORDER, *FINETUNE_ORDER):
        d = root / f"{HEAD_PREFIX}{loss}"
        if all((d / f).is_file() for f in ("model.safetensors", "config.json", "bebop.json")):
            out[loss] = d
    return out


def head_metadata(head_dir: str | Path) -> dict[str, Any]:
    p = Path(head_dir) / "bebop.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def machine_info() -> dict[str, Any]:
    """``bebop_vllm.hardware.machine_info()`` (CPU model and flags, cores, load, versions, GPU), plus the
    keys study.json carried before it (``cpus``, ``loadavg_1_5_15``)."""
    info: dict[str, Any] = hardware.machine_info()
    info["cpus"] = info["cpu_count"]
    info["loadavg_1_5_15"] = info["load_average_at_start"]
    return info


def prompt_half(domain: str, prompt_id: str) -> int:
    """0 or 1: a deterministic split of the study's requests into a fit half and an evaluation half."""
    return hashlib.sha256(f"half:{domain}:{prompt_id}".encode()).digest()[0] % 2
