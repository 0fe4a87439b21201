"""Head checkpoint folder: ``model.safetensors`` + ``config.json`` (vLLM draft config) + ``bebop.json``.

Saving, loading with validation (refusals name what is wrong), and random heads for tests.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from bebop_vllm.errors import BebopError
from bebop_vllm.heads.metadata import (
    FORMAT_VERSION,
    HEAD_ARCHITECTURE,
    DataProvenance,
    HeadMetadata,
    read_metadata,
    tokenizer_fingerprint,
    write_metadata,
)
from bebop_vllm.heads.module import BebopMTPHead, HeadShape, check_aux_layer_ids
from bebop_vllm.heads.target import read_target_config, target_embedding_and_lm_head

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
METADATA_FILE = "bebop.json"
_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}


def expected_tensor_shapes(shape: HeadShape) -> dict[str, tuple[int, ...]]:
    """Every tensor a head checkpoint must hold, with its shape (the fixed format contract)."""
    h, i, d = shape.hidden_size, shape.intermediate_size, shape.head_dim
    nq, nkv = shape.num_attention_heads * d, shape.num_key_value_heads * d
    qwen = {"layer.self_attn.q_norm.weight": (d,), "layer.self_attn.k_norm.weight": (d,)} if shape.is_qwen3_5 else {}
    n = len(shape.aux_layer_ids)
    aux = {f"aux_norms.{k}.weight": (h,) for k in range(n)}
    if n:
        aux |= {"aux_fc.weight": (h, n * h), "target_norm.weight": (h,)}
    return qwen | aux | {
        "enorm.weight": (h,),
        "hnorm.weight": (h,),
        "fc.weight": (h, 2 * h),
        "layer.input_layernorm.weight": (h,),
        "layer.self_attn.q_proj.weight": (2 * nq if shape.is_qwen3_5 else nq, h),  # Qwen3.5: query + gate
        "layer.self_attn.k_proj.weight": (nkv, h),
        "layer.self_attn.v_proj.weight": (nkv, h),
        "layer.self_attn.o_proj.weight": (h, nq),
        "layer.post_attention_layernorm.weight": (h,),
        "layer.mlp.gate_proj.weight": (i, h),
        "layer.mlp.up_proj.weight": (i, h),
        "layer.mlp.down_proj.weight": (h, i),
        "norm.weight": (h,),
    }


def head_config(
    target_config: dict[str, Any],
    num_depths: int,
    intermediate_size: int | None = None,
    aux_layer_ids: tuple[int, ...] = (),
    feedback: str = "residual",
) -> dict[str, Any]:
    """The head's ``config.json``: the target's HF config, as a one-layer ``BebopMTPModel``.
    ``intermediate_size``: the head's MLP width where it differs from the target's (a widened
    head, :func:`widen_mlp`); vLLM builds the draft layer from this config, so it serves as is.
    ``aux_layer_ids``: an aux head's target layers (``bebop.aux_layer_ids``); serving captures
    them plus the final layer's output (``eagle_aux_hidden_state_layer_ids``, the key vLLM's
    runner reads, gpu_model_runner.py:5251 ``_get_eagle3_aux_layers_from_config``, vLLM 0.32).
    ``feedback``: ``"normed"`` heads feed norm(r) to the next depth (``bebop.feedback``; absent
    means ``"residual"``, so older folders keep their meaning)."""
    num_layers = int(target_config["num_hidden_layers"])
    aux_layer_ids = check_aux_layer_ids(aux_layer_ids, num_layers)
    cfg = copy.deepcopy(target_config)
    cfg["architectures"] = [HEAD_ARCHITECTURE]
    cfg["num_hidden_layers"] = 1
    if intermediate_size is not None:
        cfg["intermediate_size"] = int(intermediate_size)
    cfg["bebop"] = {
        "num_depths": int(num_depths),
        "format_version": FORMAT_VERSION,
        "target_architecture": (target_config.get("architectures") or ["?"])[0],
    }
    if aux_layer_ids:
        cfg["bebop"]["aux_layer_ids"] = list(aux_layer_ids)
        cfg["eagle_aux_hidden_state_layer_ids"] = [*aux_layer_ids, num_layers]
    if feedback != "residual":
        cfg["bebop"]["feedback"] = feedback
    return cfg


def save_heads(
    head: BebopMTPHead, out_dir: str | Path, target_config: dict[str, Any], metadata: HeadMetadata, dtype: str = "bf16"
) -> Path:
    """Write a head folder. ``dtype``: storage dtype of the weights (bf16 or fp32)."""
    if dtype not in _DTYPES:
        raise BebopError(f"unknown checkpoint dtype {dtype!r}; choose bf16 or fp32")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(_DTYPES[dtype]).contiguous() for k, v in head.state_dict().items()}
    missing = set(expected_tensor_shapes(head.shape)) ^ set(tensors)
    assert not missing, f"head state_dict does not match the format: {sorted(missing)}"
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt", "bebop_format_version": str(FORMAT_VERSION)})
    config = head_config(target_config, metadata.num_depths, head.shape.intermediate_size, head.shape.aux_layer_ids,
                         head.shape.feedback)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    write_metadata(out, metadata)
    return out


def _validate_tensors(path: Path, shape: HeadShape) -> dict[str, torch.Tensor]:
    want = expected_tensor_shapes(shape)
    with safe_open(str(path), framework="pt") as st:
        names = set(st.keys())
        missing, extra = sorted(set(want) - names), sorted(names - set(want))
        if missing:
            raise BebopError(f"{path}: missing tensor(s) {', '.join(missing)}")
        if extra:
            raise BebopError(f"{path}: unexpected tensor(s) {', '.join(extra)} (not part of the head format)")
        tensors = {n: st.get_tensor(n) for n in want}
    for n, t in tensors.items():
        if tuple(t.shape) != want[n]:
            raise BebopError(f"{path}: tensor {n} has shape {tuple(t.shape)}, expected {want[n]}")
        if not torch.isfinite(t.float()).all():
            raise BebopError(f"{path}: tensor {n} has non-finite values (NaN or inf)")
    return tensors


def _check_against_target(meta: HeadMetadata, head_dir: Path, target_model_dir: Path) -> dict[str, Any]:
    tcfg = read_target_config(target_model_dir)
    arch = (tcfg.get("architectures") or ["?"])[0]
    checks = [
        ("hidden size", meta.hidden_size, int(tcfg.get("hidden_size", -1))),
        ("vocab size", meta.vocab_size, int(tcfg.get("vocab_size", -1))),
        ("target architecture", meta.target_architecture, arch),
        ("tokenizer fingerprint", meta.tokenizer_fingerprint, tokenizer_fingerprint(target_model_dir)),
    ]
    for what, head_value, target_value in checks:
        if head_value != target_value:
            raise BebopError(
                f"head {head_dir} was made for another model: its {what} is {head_value}, "
                f"the target {target_model_dir} has {target_value}"
            )
    return tcfg


def load_heads(
    head_dir: str | Path, target_model_dir: str | Path | None = None, dtype: torch.dtype = torch.float32
) -> BebopMTPHead:
    """Load and validate a head folder; with ``target_model_dir``, also check it belongs to that
    target (hidden size, vocab size, architecture, tokenizer) and attach its embedding/lm_head.

    Refuses, naming the problem: a missing file, invalid metadata, a head for another model,
    missing / extra tensors, wrong shapes, non-finite weights. The returned head has
    ``.metadata`` (HeadMetadata) and ``.config`` (its config.json).
    """
    head_dir = Path(head_dir)
    if not head_dir.is_dir():
        raise BebopError(f"head folder {head_dir} does not exist")
    for f in (WEIGHTS_FILE, CONFIG_FILE, METADATA_FILE):
        if not (head_dir / f).is_file():
            raise BebopError(
                f"{head_dir} has no {f}: a head folder needs {WEIGHTS_FILE}, {CONFIG_FILE} and {METADATA_FILE}"
            )
    meta = read_metadata(head_dir)
    if meta.format_version != FORMAT_VERSION:
        raise BebopError(f"{head_dir}: head format_version {meta.format_version}, this bebop reads {FORMAT_VERSION}")
    cfg = json.loads((head_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    if cfg.get("architectures") != [HEAD_ARCHITECTURE]:
        raise BebopError(
            f"{head_dir / CONFIG_FILE}: architectures is {cfg.get('architectures')}, expected ['{HEAD_ARCHITECTURE}']"
        )
    shape = HeadShape.from_hf_config(cfg)
    if (shape.hidden_size, shape.vocab_size) != (meta.hidden_size, meta.vocab_size):
        raise BebopError(
            f"{head_dir}: config.json (hidden {shape.hidden_size}, vocab {shape.vocab_size}) and "
            f"bebop.json (hidden {meta.hidden_size}, vocab {meta.vocab_size}) disagree"
        )
    if target_model_dir is not None:
        _check_against_target(meta, head_dir, Path(target_model_dir))
    tensors = _validate_tensors(head_dir / WEIGHTS_FILE, shape)
    head = BebopMTPHead(shape)
    head.load_state_dict({k: v.to(dtype) for k, v in tensors.items()})
    head.to(dtype)
    if target_model_dir is not None:
        head.attach_target(*target_embedding_and_lm_head(target_model_dir, dtype))
    head.metadata = meta
    head.config = cfg
    return head


def _carry_over(head: BebopMTPHead, new: BebopMTPHead) -> BebopMTPHead:
    """Give a head rebuilt from ``head`` its attached target and its metadata/config."""
    if head.embed_weight.numel():
        new.attach_target(head.embed_weight, head.lm_head_weight)
    for attr in ("metadata", "config"):
        if hasattr(head, attr):
            setattr(new, attr, getattr(head, attr))
    return new


def widen_mlp(head: BebopMTPHead, intermediate_size: int, seed: int = 0) -> BebopMTPHead:
    """A copy of ``head`` whose MLP has ``intermediate_size`` units, computing the same function.

    Net2Wider-style: the old units keep their weights; each new unit gets random gate/up rows
    (N(0, 0.02)) and a zero ``down_proj`` column, so it adds nothing at first but has gradient
    (d loss / d down_proj column = the unit's activation, nonzero). A trained head thereby gains
    capacity without losing what it learnt. Llama heads only: Qwen3.5 heads are exported into
    the target's native MTP slots, whose shapes are fixed.
    """
    s = head.shape
    if s.is_qwen3_5:
        raise BebopError("Qwen3.5 heads keep the native MTP module's MLP width (its checkpoint slots are fixed)")
    if intermediate_size < s.intermediate_size:
        raise BebopError(
            f"--head-intermediate-size {intermediate_size} is smaller than the head's MLP ({s.intermediate_size}); "
            "a head can only be widened"
        )
    wide = BebopMTPHead(dataclasses.replace(s, intermediate_size=int(intermediate_size)))
    ref = next(head.parameters())
    wide.to(device=ref.device, dtype=ref.dtype)
    old, new = head.layer.mlp, wide.layer.mlp
    n = s.intermediate_size
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        state = {k: v for k, v in head.state_dict().items() if not k.startswith("layer.mlp.")}
        wide.load_state_dict(state, strict=False)
        for name in ("gate_proj", "up_proj"):
            w = getattr(new, name).weight
            w.copy_(torch.randn(w.shape, generator=gen).to(w.dtype) * 0.02)
            w[:n] = getattr(old, name).weight
        new.down_proj.weight.zero_()
        new.down_proj.weight[:, :n] = old.down_proj.weight
    return _carry_over(head, wide)


def add_aux_layers(head: BebopMTPHead, aux_layer_ids: tuple[int, ...], target_model_dir: str | Path) -> BebopMTPHead:
    """A copy of a plain ``head`` that also reads the target's residual stream after
    ``aux_layer_ids`` (EAGLE-3-style features), computing the same function: its ``aux_fc`` is
    zero, so a trained head gains the features' input path without losing what it learnt."""
    from bebop_vllm.heads.target import read_target_tensors

    if head.shape.aux_layer_ids:
        raise BebopError(f"the head already reads aux layers {list(head.shape.aux_layer_ids)}")
    num_layers = int(read_target_config(target_model_dir)["num_hidden_layers"])
    aux = BebopMTPHead(head.shape.with_aux_layers(check_aux_layer_ids(aux_layer_ids, num_layers)))
    ref = next(head.parameters())
    aux.to(device=ref.device, dtype=ref.dtype)
    missing, unexpected = aux.load_state_dict(head.state_dict(), strict=False)
    assert not unexpected and all(k.startswith(("aux_", "target_norm")) for k in missing), (missing, unexpected)
    with torch.no_grad():
        norm_w = read_target_tensors(target_model_dir, ["model.norm.weight"])["model.norm.weight"]
        aux.target_norm.weight.copy_(norm_w.to(ref.dtype))
    return _carry_over(head, aux)


def new_head(
    target_model_dir: str | Path,
    seed: int = 0,
    warm_start: bool = False,
    intermediate_size: int | None = None,
    aux_layer_ids: tuple[int, ...] = (),
) -> BebopMTPHead:
    """A fresh fp32 head for the target. Linear weights ~ N(0, initializer_range), norms = 1.

    ``warm_start`` (Llama targets): an identity start, Medusa style. ``o_proj`` and ``down_proj``
    are zero, so the layer adds nothing yet; fc passes the hidden-state half through (its
    embedding half is zero); ``hnorm`` undoes the target's final-norm weight and ``norm`` puts it
    back, so at step 0 ``norm(r)`` is exactly the target's hidden state h_t and the head predicts
    the target's own next-token distribution at t (shifted by one position: a weak but
    well-conditioned start, alpha > 0 and KL of a few nats, from which every loss has gradient).
    The token embedding and the layer enter through zero-initialised paths, so the hidden state
    stays the backbone of the prediction instead of being drowned by a random layer's update.
    (Copying the target's last layer instead fed that layer an input ~25x smaller than the
    residual it was trained on: KL ~50 nats and alpha = 0 at step 0.)

    Qwen3.5 targets ship a trained MTP module: ``warm_start`` starts from it.
    ``intermediate_size``: the head's MLP width (default: the target's); a wider MLP starts as
    the identity too (``down_proj`` is zero). ``aux_layer_ids``: an aux head (EAGLE-3-style
    features, ``BebopMTPHead``); its ``aux_fc`` starts at zero (the plain head's function), its
    ``target_norm`` holds the target's final-norm weight."""
    from bebop_vllm.heads.target import read_target_tensors

    tcfg = read_target_config(target_model_dir)
    shape = HeadShape.from_hf_config(tcfg)
    if intermediate_size is not None and intermediate_size != shape.intermediate_size:
        if shape.is_qwen3_5:
            raise BebopError("Qwen3.5 heads keep the native MTP module's MLP width (its checkpoint slots are fixed)")
        if intermediate_size < 1:
            raise BebopError(f"--head-intermediate-size must be at least 1, got {intermediate_size}")
        shape = dataclasses.replace(shape, intermediate_size=int(intermediate_size))
    if aux_layer_ids:
        shape = shape.with_aux_layers(check_aux_layer_ids(aux_layer_ids, int(tcfg["num_hidden_layers"])))
    head = BebopMTPHead(shape)
    gen = torch.Generator().manual_seed(seed)
    std = float(tcfg.get("initializer_range", 0.02))
    with torch.no_grad():
        for name, p in head.named_parameters():
            if name.endswith("norm.weight") or ".aux_norms." in f".{name}":
                p.fill_(0.0 if head.shape.is_qwen3_5 else 1.0)  # the identity either way
            elif name != "aux_fc.weight":  # aux_fc stays zero: an aux head starts as the plain head
                p.copy_(torch.randn(p.shape, generator=gen) * std)
        if head.shape.aux_layer_ids:
            norm_w = read_target_tensors(target_model_dir, ["model.norm.weight"])["model.norm.weight"].float()
            head.target_norm.weight.copy_(norm_w)
        if warm_start and head.shape.is_qwen3_5:
            # Qwen3.5 ships a trained MTP module: start from it (layer 0, shared fc and norms)
            from bebop_vllm.heads.native_mtp import native_mtp_to_head

            head.load_state_dict(native_mtp_to_head(target_model_dir, head.shape))
        elif warm_start:
            final_norm = read_target_tensors(target_model_dir, ["model.norm.weight"])["model.norm.weight"].float()
            h = head.shape.hidden_size
            head.layer.self_attn.o_proj.weight.zero_()
            head.layer.mlp.down_proj.weight.zero_()
            head.fc.weight.zero_()
            head.fc.weight[:, h:] = torch.eye(h)
            # h = w * x_hat (w: the final-norm weight, |w| >= 0.87 for SmolLM2-135M): hnorm(h)
            # with weight 1/w is proportional to x_hat, and norm(.) with weight w gives back h
            safe = torch.where(final_norm.abs() < 1e-2, torch.full_like(final_norm, 1e-2), final_norm)
            head.hnorm.weight.copy_(1.0 / safe)
            head.norm.weight.copy_(final_norm)
    head.attach_target(*target_embedding_and_lm_head(target_model_dir))
    return head


def init_random_heads(target_model_dir: str | Path, out_dir: str | Path, num_depths: int = 3, seed: int = 0) -> Path:
    """Write a randomly initialised head folder for ``target_model_dir`` (right shapes, valid
    metadata, untrained: for integration tests)."""
    tcfg = read_target_config(target_model_dir)
    head = new_head(target_model_dir, seed=seed)
    meta = HeadMetadata(
        target_architecture=(tcfg.get("architectures") or ["?"])[0],
        target_model=Path(target_model_dir).name,
        hidden_size=int(tcfg["hidden_size"]),
        vocab_size=int(tcfg["vocab_size"]),
        tokenizer_fingerprint=tokenizer_fingerprint(target_model_dir),
        num_depths=num_depths,
        loss="random-init",
        data=DataProvenance(source="none"),
        seed=seed,
        notes="random weights (init_random_heads); not trained",
    )
    return save_heads(head, out_dir, tcfg, meta)
