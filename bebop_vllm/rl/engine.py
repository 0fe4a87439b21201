"""``RolloutEngine``: the object an RL rollout worker holds (a vLLM ``LLM`` with frozen bebop heads).

    engine = RolloutEngine(model_dir)                       # shipped heads for the default model
    outputs, stats = engine.generate(prompts, SamplingParams(n=8, temperature=1.0))
    engine.update_policy(policy.state_dict(), version=step)  # or a safetensors file / folder
    assert engine.heads_fingerprint() == fp0                 # the heads never change

The heads share the target's embedding and lm_head *by reference* (vLLM's EAGLE proposer,
``llm_base_proposer.py`` ``_maybe_share_embeddings`` / ``_maybe_share_lm_head``), and vLLM's
in-place reload writes new values into those same Parameters: a policy update reaches the drafter
through them, while the heads' own layers stay as trained before RL. Rejection sampling keeps every
sample exactly from the new policy whatever the heads propose; only acceptance can move
(:class:`~bebop_vllm.rl.monitor.AcceptanceMonitor` watches it). docs/rl.md has the whole story.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bebop_vllm.errors import BebopError
from bebop_vllm.rl.stats import RolloutStats, rollout_stats
from bebop_vllm.rl.weights import (
    ExpectedPolicy,
    PolicyWeightsError,
    check_finite,
    read_policy_specs,
    safetensors_files,
    tensor_specs,
)

logger = logging.getLogger(__name__)

WORKER_EXTENSION = "bebop_vllm.rl.worker.BebopRLWorkerExtension"
# vLLM names draft-private parameters "draft.<name>" for sleep retention (gpu_worker.py
# _get_sleep_parameters); the shared embedding / lm_head are the target's and are not matched.
KEEP_HEADS_PATTERN = "draft.*"


class RolloutEngineError(BebopError, RuntimeError):
    """The rollout engine cannot do what was asked (the message says why and what to do)."""


@dataclass(frozen=True)
class PolicyUpdate:
    """What one :meth:`RolloutEngine.update_policy` call did and how long it took."""

    version: str
    num_tensors: int
    seconds: float  # wall time of the whole call (validation + staging + load + cache reset)
    validate_seconds: float
    stage_seconds: float  # writing a mapping to a safetensors file the workers read (0 for a path)
    load_seconds: float  # the workers' in-place reload (slowest worker)


def _staging_dir() -> str | None:
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() else None


class RolloutEngine:
    """A vLLM ``LLM`` with method "bebop" plus policy sync, sleep/wake that keep the heads, and stats.

    Args:
        model: the policy's model folder (default: the fetched SmolLM2-135M-Instruct). Policy updates
            are checked against its safetensors (names and shapes) and the engine's dtype.
        heads: heads folder (default: the shipped heads; required for other targets).
        num_speculative_tokens: drafts per verify step; 0 builds a plain engine (no speculation), which
            benchmarks use as the baseline with the same API.
        speculative_options: other ``speculative_config`` keys of method "bebop" (``draft_sampling``,
            ``draft_vocab_size``, ``verifier``, ``metrics``...).
        **engine_kwargs: any other ``vllm.LLM`` keyword (``dtype``, ``max_model_len``, ``seed``,
            ``enable_sleep_mode``, ``data_parallel_size``...).
    """

    def __init__(
        self,
        model: str | Path | None = None,
        heads: str | Path | None = None,
        num_speculative_tokens: int = 3,
        *,
        speculative_options: Mapping[str, Any] | None = None,
        **engine_kwargs: Any,
    ) -> None:
        from bebop_vllm.paths import default_model_dir

        self.model_dir = Path(model).expanduser() if model is not None else default_model_dir()
        if "speculative_config" in engine_kwargs:
            raise RolloutEngineError("RolloutEngine builds speculative_config itself: pass heads=, "
                                     "num_speculative_tokens= and speculative_options= instead")
        ext = engine_kwargs.pop("worker_extension_cls", None)
        if ext not in (None, WORKER_EXTENSION):
            raise RolloutEngineError(f"RolloutEngine needs worker_extension_cls={WORKER_EXTENSION!r} "
                                     f"(got {ext!r}); subclass BebopRLWorkerExtension and extend it instead")
        self.speculative_config: dict[str, Any] | None = None
        if num_speculative_tokens:
            spec: dict[str, Any] = {"method": "bebop", "num_speculative_tokens": int(num_speculative_tokens)}
            if heads is not None:
                spec["model"] = str(Path(heads).expanduser())
            spec.update(speculative_options or {})
            self.speculative_config = spec
        elif heads is not None or speculative_options:
            raise RolloutEngineError("num_speculative_tokens=0 builds a plain engine: heads and "
                                     "speculative_options do not apply")
        self._sleep_enabled = bool(engine_kwargs.get("enable_sleep_mode", False))
        if self._sleep_enabled and self.speculative_config is not None:
            keep = list(engine_kwargs.get("sleep_preserve_parameter_names") or [])
            if KEEP_HEADS_PATTERN not in keep:
                keep.append(KEEP_HEADS_PATTERN)
            engine_kwargs["sleep_preserve_parameter_names"] = keep

        from vllm import LLM

        self.llm = LLM(model=str(self.model_dir), speculative_config=self.speculative_config,
                       worker_extension_cls=WORKER_EXTENSION, **engine_kwargs)
        self.engine_dtype: torch.dtype = self.llm.llm_engine.model_config.dtype
        self.expected = ExpectedPolicy.from_model_dir(self.model_dir, self.engine_dtype)
        self._heads_fp = self.heads_fingerprint()
        self.policy_version: str | None = None
        self._num_updates = 0
        self._asleep_level: int | None = None
        self._needs_policy = False  # after a level-2 sleep the target's weights are gone
        self.last_update: PolicyUpdate | None = None

    # -- rollouts -----------------------------------------------------------------------------------
    def generate(self, prompts: Any, sampling_params: Any = None, **kwargs: Any) -> tuple[list[Any], RolloutStats]:
        """``LLM.generate`` (outputs unchanged) plus this call's :class:`RolloutStats`."""
        if self._asleep_level is not None:
            raise RolloutEngineError("the engine is asleep: call wake_up() first")
        if self._needs_policy:
            raise RolloutEngineError("a level-2 sleep discarded the policy weights: call update_policy() "
                                     "after wake_up() before generating")
        kwargs.setdefault("use_tqdm", False)
        t0 = time.perf_counter()
        outputs = self.llm.generate(prompts, sampling_params, **kwargs)
        seconds = time.perf_counter() - t0
        return outputs, rollout_stats(outputs, seconds, self.policy_version)

    # -- policy sync --------------------------------------------------------------------------------
    def update_policy(self, weights: Mapping[str, torch.Tensor] | str | Path, version: Any = None) -> PolicyUpdate:
        """Load new policy weights into the running engine; every later request samples from them.

        ``weights``: ``{name: tensor}`` with the checkpoint's names (an HF ``state_dict()``), or a
        safetensors file or folder. Every tensor is checked first (known name, the engine's shape and
        dtype, finite values for a mapping); on any problem a :class:`PolicyWeightsError` names the
        tensor and the engine keeps serving the old policy. Then vLLM's in-place reload runs in every
        worker, the drafter's caches derived from the lm_head are dropped, the prefix cache is reset
        (cached KV was computed by the old policy) and the heads are checked bit-identical.
        Call it between ``generate`` calls (``LLM.generate`` returns only when its requests finish).
        """
        t0 = time.perf_counter()
        tmpdir: str | None = None
        if isinstance(weights, (str, Path)):
            files = safetensors_files(weights)
            names = self.expected.validate(read_policy_specs(files))
        elif isinstance(weights, Mapping):
            names = self.expected.validate(tensor_specs(weights))
            check_finite(weights, names)
        else:
            raise PolicyWeightsError(
                f"update_policy takes a {{name: tensor}} mapping or a safetensors path, got {type(weights).__name__}")
        t_valid = time.perf_counter()
        if isinstance(weights, Mapping):
            from safetensors.torch import save_file

            tmpdir = tempfile.mkdtemp(prefix="bebop-policy-", dir=_staging_dir())
            path = Path(tmpdir) / "policy.safetensors"
            save_file({n: weights[n].detach().to("cpu").contiguous() for n in names}, str(path))
            files = [path]
        t_staged = time.perf_counter()
        try:
            results = self.llm.collective_rpc("bebop_load_policy",
                                              kwargs={"files": [str(f) for f in files], "names": names})
        finally:
            if tmpdir is not None:
                shutil.rmtree(tmpdir, ignore_errors=True)
        if not self.llm.reset_prefix_cache():
            raise RolloutEngineError("the prefix cache could not be reset after the policy update (requests "
                                     "still running?): cached KV of the old policy could be reused")
        for r in results:
            if self._heads_fp is not None and r["heads_after"] is not None and r["heads_after"] != self._heads_fp:
                raise RolloutEngineError("the heads changed during a policy update (fingerprint "
                                         f"{r['heads_after'][:12]} != {self._heads_fp[:12]}); they must stay frozen")
        self._num_updates += 1
        self.policy_version = str(version) if version is not None else str(self._num_updates)
        self.llm.update_weight_version(self.policy_version)
        self._needs_policy = False
        done = time.perf_counter()
        self.last_update = PolicyUpdate(
            version=self.policy_version, num_tensors=len(names), seconds=done - t0,
            validate_seconds=t_valid - t0, stage_seconds=t_staged - t_valid,
            load_seconds=max((float(r["seconds"]) for r in results), default=0.0))
        logger.info("bebop rl: policy %s loaded (%d tensors) in %.2f s", self.policy_version, len(names),
                    self.last_update.seconds)
        return self.last_update

    # -- heads --------------------------------------------------------------------------------------
    def heads_fingerprint(self) -> str | None:
        """sha256 of the heads' own tensors in every worker (None for a plain engine)."""
        fps = self.llm.collective_rpc("bebop_heads_fingerprint")
        if not fps or fps[0] is None:
            return None
        return fps[0] if len(fps) == 1 else hashlib.sha256("|".join(fps).encode()).hexdigest()

    def policy_fingerprint(self) -> str:
        """sha256 of the target's parameters as the engine holds them (reads every weight: slow-ish)."""
        fps = self.llm.collective_rpc("bebop_policy_fingerprint")
        return fps[0] if len(fps) == 1 else hashlib.sha256("|".join(fps).encode()).hexdigest()

    # -- sleep / wake -------------------------------------------------------------------------------
    def sleep(self, level: int = 1) -> None:
        """Free accelerator memory (vLLM sleep mode) while keeping the heads.

        Level 1 offloads weights to host memory; level 2 discards the target's weights (the next
        ``update_policy`` brings them back) but keeps the heads: RolloutEngine adds ``"draft.*"`` to
        ``sleep_preserve_parameter_names``, without which level 2 silently zeroes drafters (acceptance
        0, outputs still correct). Needs ``enable_sleep_mode=True``, which vLLM offers on CUDA, ROCm and
        XPU only: on CPU vLLM refuses the flag and ``CPUWorker.sleep`` is a logged no-op, so this raises.
        """
        if level not in (1, 2):
            raise RolloutEngineError(f"sleep level must be 1 or 2, got {level}")
        if not self._sleep_enabled:
            from vllm.platforms import current_platform

            where = "vLLM has no sleep mode on CPU (CPUWorker.sleep only logs a warning)" if \
                current_platform.is_cpu() else "build the engine with enable_sleep_mode=True"
            raise RolloutEngineError(f"sleep() needs vLLM sleep mode: {where}")
        self.llm.sleep(level=level)
        self._asleep_level = level

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """Wake the engine; once fully awake, check the heads are bit-identical to before."""
        if self._asleep_level is None:
            return
        awake = self.llm.wake_up(list(tags) if tags is not None else None)
        if awake is False:  # partial wake-up (tags): nothing to check yet
            return
        level, self._asleep_level = self._asleep_level, None
        if level == 2:
            self._needs_policy = True
        fp = self.heads_fingerprint()
        if fp != self._heads_fp:
            raise RolloutEngineError(f"the heads changed across sleep({level})/wake_up (fingerprint "
                                     f"{str(fp)[:12]} != {str(self._heads_fp)[:12]}): is 'draft.*' in "
                                     "sleep_preserve_parameter_names?")

    # -- lifetime -----------------------------------------------------------------------------------
    def close(self) -> None:
        core = getattr(getattr(self, "llm", None), "llm_engine", None)
        core = getattr(core, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()

    def __enter__(self) -> RolloutEngine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
