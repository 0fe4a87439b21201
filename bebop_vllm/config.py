"""User-facing options of the ``"bebop"`` speculative method, validated before the engine starts.

``speculative_config={"method": "bebop", "model": HEADS_DIR, "num_speculative_tokens": 3,
"draft_sampling": "probabilistic", "verifier": "bebop", "metrics": "summary"}`` is checked here
and translated (by :mod:`bebop_vllm.plugin.patches.speculative_config`) into vLLM's own EAGLE
method. The validated options travel to every worker in ``additional_config["bebop"]``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from bebop_vllm.errors import BebopError
from bebop_vllm.safetensors_header import read_header

METHOD_NAME = "bebop"
# Key under VllmConfig.additional_config that carries BebopOptions to the workers.
ADDITIONAL_CONFIG_KEY = "bebop"
# vLLM method our heads run under: EAGLE's proposer feeds (token, hidden state) pairs with the
# target's post-norm hidden state, has a KV-cached draft layer and drafts depths recursively.
UNDERLYING_METHOD = "eagle"
MAX_SPECULATIVE_TOKENS = 16

DraftSampling = Literal["probabilistic", "greedy"]
Verifier = Literal["bebop", "vllm"]
MetricsLevel = Literal["summary", "detailed"]
DraftLength = Literal["auto", "fixed", "entropy"]


class BebopSpecError(BebopError, ValueError):
    """Invalid ``speculative_config`` for method ``"bebop"`` (a ValueError so vLLM's CLI shows it)."""


class BebopOptions(BaseModel):
    """The ``speculative_config`` keys accepted when ``method == "bebop"``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["bebop"] = Field(description='Always "bebop".')
    model: str | None = Field(
        default=None,
        description="Heads folder (model.safetensors + config.json + bebop.json). Defaults to "
        "the shipped heads when the target is the default model.",
    )
    num_speculative_tokens: int | None = Field(
        default=None,
        ge=1,
        le=MAX_SPECULATIVE_TOKENS,
        description="Draft tokens per verify step (default: the heads' trained depth g).",
    )
    draft_sampling: DraftSampling = Field(
        default="probabilistic",
        description="probabilistic: draft from the request's own sampling distribution "
        "(temperature/top-k/top-p) and verify with the draft probabilities; greedy: argmax drafts.",
    )
    verifier: Verifier = Field(
        default="bebop", description="bebop: our rejection-sampling kernels; vllm: vLLM's own."
    )
    metrics: MetricsLevel = Field(
        default="summary", description="Per-request speculative metrics level."
    )
    draft_length: DraftLength = Field(
        default="auto",
        description="auto: per request and step, 0..num_speculative_tokens drafts maximising the batch's "
        "expected tokens per second (acceptance from the request's recent verify steps, blended with "
        "acceptance_fit when given; step costs measured at engine start, see step_cost_file); when no "
        "request should draft the step runs no draft depth. fixed: always num_speculative_tokens drafts. "
        "entropy: drafts from the target entropy of the request's last step (needs acceptance_fit).",
    )
    acceptance_fit: tuple[float, float] | None = Field(
        default=None,
        description="[a, b] of the acceptance fit alpha = a + b * entropy (nats): the prior of "
        "draft_length='auto' and the rule of draft_length='entropy' (benchmarks/acceptance_study.py "
        "reports it).",
    )
    draft_token_cost: float = Field(
        default=0.1,
        ge=0.0,
        le=10.0,
        description="draft_length='entropy': cost of one more draft token relative to a verify "
        "step without drafts.",
    )
    draft_min_gain: float = Field(
        default=0.03,
        ge=0.0,
        le=1.0,
        description="draft_length='auto': draft only when the predicted tokens/s beat drafting nothing "
        "by this fraction (a margin for cost-model error).",
    )
    step_cost_file: str | None = Field(
        default=None,
        description="draft_length='auto': JSON step-cost model (bebop_vllm/step_cost.py format) instead of "
        "the calibration at engine start (cached under $BEBOP_HOME/step_cost/).",
    )

    draft_vocab_size: int | None = Field(
        default=None,
        ge=1,
        description="Draft only among the first N tokens of the heads' draft vocabulary "
        "(draft_vocab.json in the heads folder, ranked by target probability mass by `bebop train`, "
        "or by frequency by `bebop draft-vocab`): the draft lm_head shrinks by V/N; sampling stays "
        "exact. Default: the size the heads were trained on (trained_size in draft_vocab.json), "
        "else the full vocabulary; N >= the vocabulary size means the full vocabulary.",
    )

    @model_validator(mode="after")
    def _entropy_policy_needs_fit(self) -> BebopOptions:
        if self.draft_length == "entropy" and self.acceptance_fit is None:
            raise ValueError("draft_length='entropy' needs acceptance_fit=[a, b] (alpha = a + b * "
                             "entropy in nats; benchmarks/acceptance_study.py reports a and b)")
        return self

    @model_validator(mode="after")
    def _step_cost_file_exists(self) -> BebopOptions:
        if self.step_cost_file is not None and not Path(self.step_cost_file).expanduser().is_file():
            raise ValueError(f"step_cost_file={self.step_cost_file!r} does not exist")
        return self

    def to_additional_config(self) -> dict[str, Any]:
        return self.model_dump()


def _format_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "speculative_config"
        if err["type"] == "extra_forbidden":
            valid = ", ".join(BebopOptions.model_fields)
            lines.append(f"unknown key {loc!r}; valid keys: {valid}")
        elif not err["loc"]:  # a whole-model rule (model_validator)
            lines.append(str(err["msg"]).removeprefix("Value error, "))
        else:
            field = BebopOptions.model_fields.get(str(err["loc"][0])) if err["loc"] else None
            hint = f" ({field.description})" if field is not None and field.description else ""
            lines.append(f"{loc}={err.get('input')!r}: {err['msg']}{hint}")
    return "invalid speculative_config for method 'bebop': " + "; ".join(lines)


def parse_options(raw: dict[str, Any]) -> BebopOptions:
    """Validate a raw ``speculative_config`` dict (``-`` in keys accepted as ``_``)."""
    if not isinstance(raw, dict):
        raise BebopSpecError(f"speculative_config must be a dict, got {type(raw).__name__}")
    cleaned = {str(k).replace("-", "_"): v for k, v in raw.items()}
    try:
        return BebopOptions(**cleaned)
    except ValidationError as exc:
        raise BebopSpecError(_format_validation_error(exc)) from None


def options_from_additional_config(additional_config: dict[str, Any] | None) -> BebopOptions | None:
    """The options a worker received, or None when the engine does not run bebop."""
    if not additional_config or ADDITIONAL_CONFIG_KEY not in additional_config:
        return None
    return BebopOptions(**additional_config[ADDITIONAL_CONFIG_KEY])


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise BebopSpecError(f"heads folder {path.parent} has no {path.name} ({what})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BebopSpecError(f"heads file {path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise BebopSpecError(f"heads file {path} must hold a JSON object")
    return data


def _safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor shapes from a safetensors header, without reading the weights."""
    try:
        header = read_header(path)
    except FileNotFoundError:
        raise BebopSpecError(f"heads folder {path.parent} has no {path.name}") from None
    except (OSError, ValueError) as exc:
        raise BebopSpecError(f"heads weights {path} are not a valid safetensors file ({exc})") from None
    return {k: v["shape"] for k, v in header.items()}


def _check_feedback(path: Path, config: dict) -> None:
    """``bebop.feedback`` (optional): what a depth hands the next, "residual" or "normed"."""
    from bebop_vllm.heads.module import FEEDBACK_KINDS

    feedback = (config.get("bebop") or {}).get("feedback", "residual")
    if feedback not in FEEDBACK_KINDS:
        raise BebopSpecError(f"{path / 'config.json'}: bebop.feedback is {feedback!r}, expected one of "
                             f"{', '.join(FEEDBACK_KINDS)}")


def _check_aux_layers(path: Path, config: dict, target_hf_config: Any) -> None:
    """Heads with aux layers: ids inside the target, and the capture list vLLM reads
    (``eagle_aux_hidden_state_layer_ids``) = those ids + the target's last layer."""
    ids = (config.get("bebop") or {}).get("aux_layer_ids") or []
    if not ids:
        return
    from bebop_vllm.heads.module import check_aux_layer_ids

    layers = int(getattr(target_hf_config, "num_hidden_layers", -1))
    try:
        check_aux_layer_ids(ids, layers)
    except BebopError as exc:
        raise BebopSpecError(f"{path / 'config.json'}: bebop.aux_layer_ids: {exc}") from None
    capture = config.get("eagle_aux_hidden_state_layer_ids")
    if capture != [*ids, layers]:
        raise BebopSpecError(f"{path / 'config.json'}: eagle_aux_hidden_state_layer_ids is {capture}, expected "
                             f"{[*ids, layers]} (the aux layers, then the target's last layer)")


def validate_heads_dir(heads_dir: str | Path, target_hf_config: Any, target_model_dir: str | None = None) -> int:
    """Check a heads folder against the target model; return its trained depth g.

    Catches what would otherwise surface as a deep vLLM traceback (or, worse, silently wrong
    drafts): a missing folder, missing/corrupt files, heads trained for another model. With a
    local ``target_model_dir`` the heads are also fully loaded by ``bebop_vllm.heads.load_heads``
    (tokenizer fingerprint, architecture, every tensor's shape, finite weights).
    """
    path = Path(heads_dir).expanduser()
    if not path.is_dir():
        raise BebopSpecError(
            f"heads folder {path} does not exist; pass the folder written by `bebop train` "
            "(model.safetensors, config.json, bebop.json) as speculative_config['model']")
    config = _read_json(path / "config.json", "the draft model's HF config")
    if "BebopMTPModel" not in (config.get("architectures") or []):
        raise BebopSpecError(
            f"{path / 'config.json'} has architectures={config.get('architectures')!r}, expected "
            "['BebopMTPModel']: this is not a bebop heads folder")
    meta = config.get("bebop") or {}
    num_depths = meta.get("num_depths")
    if not isinstance(num_depths, int) or num_depths < 1:
        raise BebopSpecError(f"{path / 'config.json'} lacks bebop.num_depths (a positive integer)")
    _read_json(path / "bebop.json", "the heads metadata")
    from bebop_vllm.heads.module import QWEN3_5_MODEL_TYPES

    if config.get("model_type") in QWEN3_5_MODEL_TYPES:
        raise BebopSpecError(
            f"heads in {path} are Qwen3.5 MTP layers: they replace the target's native MTP weights. Run "
            f"`bebop export-mtp --heads {path} --target TARGET --out DIR`, then serve DIR with "
            '{"method": "mtp"} (method "bebop" serves Llama-family targets)')

    hidden = int(getattr(target_hf_config, "hidden_size", -1))
    vocab = int(getattr(target_hf_config, "vocab_size", -1))
    for key, want in (("hidden_size", hidden), ("vocab_size", vocab)):
        if config.get(key) != want:
            raise BebopSpecError(
                f"heads in {path} were made for a model with {key}={config.get(key)}, "
                f"but the target model has {key}={want}: use heads trained for this model")
    target_type = getattr(target_hf_config, "model_type", None)
    if config.get("model_type") not in (None, target_type):
        raise BebopSpecError(
            f"heads in {path} were made for model_type={config.get('model_type')!r}, "
            f"the target is {target_type!r}")

    shapes = _safetensors_shapes(path / "model.safetensors")
    expected = {
        "fc.weight": [hidden, 2 * hidden],
        "enorm.weight": [hidden],
        "hnorm.weight": [hidden],
        "norm.weight": [hidden],
        "layer.self_attn.o_proj.weight": None,
        "layer.mlp.down_proj.weight": None,
    }
    for name, shape in expected.items():
        if name not in shapes:
            raise BebopSpecError(f"heads weights {path / 'model.safetensors'} lack tensor {name!r}")
        if shape is not None and shapes[name] != shape:
            raise BebopSpecError(
                f"heads tensor {name!r} has shape {shapes[name]}, expected {shape} for a target "
                f"with hidden_size={hidden}")
    _check_aux_layers(path, config, target_hf_config)
    _check_feedback(path, config)
    if target_model_dir is not None and Path(target_model_dir).is_dir():
        from bebop_vllm.heads import load_heads

        try:
            load_heads(path, target_model_dir)
        except BebopError as exc:
            raise BebopSpecError(f"heads folder {path} cannot be used with {target_model_dir}: {exc}") from None
    return num_depths
