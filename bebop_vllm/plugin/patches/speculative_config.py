"""Method "bebop": translate it into vLLM's EAGLE method before vLLM validates the config.

Replaces ``EngineArgs.create_speculative_config`` (vllm/engine/arg_utils.py:2060, vLLM 0.32.0).
``SpeculativeMethod`` is a pydantic Literal and the runners reject unknown methods, so "bebop"
never reaches vLLM: the options are validated (pydantic, heads folder checked against the target)
and become ``method="eagle"`` + ``draft_sample_method``; the validated options travel to the
workers in ``additional_config["bebop"]`` and set ``per_request_spec_decode_metrics``;
``draft_length`` "auto"/"entropy" switch on vLLM's dynamic speculative decoding (see the
``draft_length`` patch; synchronous and asynchronous scheduling both work). The same
code path serves ``LLM(...)`` and the OpenAI server (both build an ``EngineArgs``).

Lossy verification modes are refused: method "bebop" is exact rejection sampling, and vLLM
0.33's ``rejection_sample_method="fly"`` (FLy: entropy-gated loose acceptance) or
``"synthetic"`` would change what is emitted. The options model already forbids unknown keys;
:func:`refuse_lossy_verification` names the reason, and the translated config states
``rejection_sample_method="standard"`` explicitly so no default can switch it.

Effect on engines that are not bebop: none. Configs whose method is not "bebop" reach vLLM's
function untouched (``translate`` returns before reading anything else).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

from bebop_vllm.plugin.patches.base import Patch

UPSTREAM = "vllm/engine/arg_utils.py:2060 EngineArgs.create_speculative_config (vLLM 0.32.0)"

logger = logging.getLogger("bebop_vllm.plugin")


def _is_default_target(target_model_config: Any) -> bool:
    from bebop_vllm.paths import default_model_dir

    try:
        return Path(str(target_model_config.model)).expanduser().resolve() == default_model_dir().resolve()
    except OSError:
        return False


def _resolve_heads_dir(opts: Any, target_model_config: Any) -> str:
    from bebop_vllm.config import BebopSpecError
    from bebop_vllm.paths import SHIPPED_HEADS_DIR

    if opts.model is not None:
        return str(Path(opts.model).expanduser())
    if _is_default_target(target_model_config):
        return str(SHIPPED_HEADS_DIR)
    raise BebopSpecError(
        "speculative_config['model'] (the heads folder) is required: shipped heads exist only "
        f"for the default model, and the target is {target_model_config.model}")


def translate(engine_args: Any, target_model_config: Any) -> None:
    """Rewrite ``engine_args.speculative_config`` in place when its method is "bebop"."""
    from bebop_vllm.config import (
        ADDITIONAL_CONFIG_KEY,
        METHOD_NAME,
        UNDERLYING_METHOD,
        parse_options,
        validate_heads_dir,
    )

    spec = engine_args.speculative_config
    if getattr(engine_args, "spec_method", None) == METHOD_NAME:
        # `--spec-method bebop` on the CLI: fold the flags in so they are validated together.
        spec = dict(spec or {})
        spec["method"] = METHOD_NAME
        for flag, key in (("spec_model", "model"), ("spec_tokens", "num_speculative_tokens")):
            if getattr(engine_args, flag, None) is not None:
                spec[key] = getattr(engine_args, flag)
                setattr(engine_args, flag, None)
        engine_args.spec_method = None
    if not isinstance(spec, dict) or spec.get("method") != METHOD_NAME:
        return
    refuse_lossy_verification(spec)
    from bebop_vllm.plugin.patches.runner_v2_guard import check_not_forced_v2

    opts = parse_options(spec)
    check_not_forced_v2()
    heads_dir = _resolve_heads_dir(opts, target_model_config)
    num_depths = validate_heads_dir(heads_dir, target_model_config.hf_config, str(target_model_config.model))
    k = opts.num_speculative_tokens or num_depths
    if opts.draft_vocab_size is None:
        # heads trained on a draft vocabulary are served on it by default: outside it their
        # logits were never trained
        from bebop_vllm.draft_vocab import trained_draft_vocab_size

        size = trained_draft_vocab_size(heads_dir)
        if size is not None and int(getattr(engine_args, "tensor_parallel_size", 1) or 1) > 1:
            # a draft vocabulary needs tensor_parallel_size=1; not asked for, so not an error
            logger.warning("bebop: the heads' draft vocabulary (%d tokens) is not used with tensor_parallel_size > 1; "
                           "drafting over the full vocabulary", size)
            size = None
        opts = opts.model_copy(update={"draft_vocab_size": size})
    if opts.draft_vocab_size is not None and opts.draft_vocab_size >= int(target_model_config.hf_config.vocab_size):
        opts = opts.model_copy(update={"draft_vocab_size": None})  # the whole vocabulary: no restriction
    if opts.draft_vocab_size is not None:
        _check_draft_vocab(opts.draft_vocab_size, heads_dir, target_model_config, engine_args)
    opts = opts.model_copy(update={"model": heads_dir, "num_speculative_tokens": k})

    engine_args.speculative_config = {
        "method": UNDERLYING_METHOD,
        "model": heads_dir,
        "num_speculative_tokens": k,
        "draft_sample_method": opts.draft_sampling,
        # exact rejection sampling only (never vLLM 0.33's lossy "fly" nor "synthetic")
        "rejection_sample_method": "standard",
    }
    if opts.draft_length in ("auto", "entropy"):
        # vLLM's dynamic speculative decoding: K varies per step (the scheduler patch in
        # draft_length sets it per step; this one-range schedule only switches the machinery on:
        # no uniform-decode padding of new requests, PIECEWISE instead of FULL CUDA graphs).
        from bebop_vllm.plugin.patches.draft_length import DYNAMIC_SCHEDULE_END

        engine_args.speculative_config["num_speculative_tokens_per_batch_size"] = [(1, DYNAMIC_SCHEDULE_END, k)]
    additional = dict(engine_args.additional_config or {})
    additional[ADDITIONAL_CONFIG_KEY] = opts.to_additional_config()
    engine_args.additional_config = additional
    if getattr(engine_args, "per_request_spec_decode_metrics", "none") == "none":
        engine_args.per_request_spec_decode_metrics = opts.metrics


# vLLM speculative-config keys that only exist to make verification lossy.
LOSSY_KEYS = ("fly_window_size", "fly_entropy_threshold", "fly_entropy_top_k", "synthetic_acceptance_rates")
LOSSY_METHODS = ("fly", "synthetic")


def refuse_lossy_verification(spec: dict[str, Any]) -> None:
    """Refuse verification settings that make speculative decoding lossy (FLy, synthetic).

    Any other vLLM-only key (e.g. ``rejection_sample_method="block"``) is then refused by the
    options model as an unknown key.
    """
    from bebop_vllm.config import BebopSpecError

    cleaned = {str(k).replace("-", "_"): v for k, v in spec.items()}
    method = cleaned.get("rejection_sample_method")
    keys = [k for k in cleaned if k in LOSSY_KEYS]
    if method in LOSSY_METHODS or keys:
        what = ", ".join([f"rejection_sample_method={method!r}"] * (method in LOSSY_METHODS) + keys)
        raise BebopSpecError(
            f"method 'bebop' verifies with exact rejection sampling; {what} would make it lossy "
            "(vLLM's 'fly' mode accepts drafts the target would not have sampled) and is not "
            "supported. Drop it, or use vLLM's own method 'eagle' / 'mtp' for lossy verification.")


def _check_draft_vocab(size: int, heads_dir: str, target_model_config: Any, engine_args: Any) -> None:
    """Fail at start-up, not in the worker, when the draft vocabulary cannot be used."""
    from bebop_vllm.config import BebopSpecError
    from bebop_vllm.draft_vocab import read_draft_vocab
    from bebop_vllm.errors import BebopError

    if int(getattr(engine_args, "tensor_parallel_size", 1) or 1) > 1:
        raise BebopSpecError("draft_vocab_size works with tensor_parallel_size=1 only (the draft logits "
                             "are computed on the local vocabulary rows)")
    try:
        read_draft_vocab(heads_dir, size, int(target_model_config.hf_config.vocab_size))
    except BebopError as exc:
        raise BebopSpecError(f"invalid speculative_config for method 'bebop': {exc}") from None


def _make_replacement(original: Any) -> Any:
    @functools.wraps(original)
    def create_speculative_config(self: Any, target_model_config: Any, target_parallel_config: Any) -> Any:
        translate(self, target_model_config)
        return original(self, target_model_config, target_parallel_config)

    return create_speculative_config


PATCH = Patch(
    name="speculative_config",
    upstream=UPSTREAM,
    module="vllm.engine.arg_utils",
    owner="EngineArgs",
    attr="create_speculative_config",
    expected_params=("self", "target_model_config", "target_parallel_config"),
    make_replacement=_make_replacement,
)
