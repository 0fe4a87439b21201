"""Bebop heads in place of a Qwen3.5 target's native MTP weights (``mtp.*``).

Qwen3.5 checkpoints ship one (or more) MTP layers that vLLM serves with ``method: "mtp"``
(``vllm/model_executor/models/qwen3_5_mtp.py``, ``Qwen3_5MultiTokenPredictor``): ``fc`` over
``cat([pre_fc_norm_embedding(embed(x)), pre_fc_norm_hidden(h)])``, one full-attention Qwen3.5
decoder layer, ``norm``, the target's lm_head. A bebop head with ``layer_kind == "qwen3_5"``
has exactly those tensors under other names, so :func:`export_native_mtp` writes a copy of the
target folder whose ``mtp.*`` tensors are the head's; everything else is copied byte for byte.

Name map (head -> checkpoint)::

    enorm.weight   -> mtp.pre_fc_norm_embedding.weight
    hnorm.weight   -> mtp.pre_fc_norm_hidden.weight
    fc.weight      -> mtp.fc.weight
    norm.weight    -> mtp.norm.weight
    layer.<rest>   -> mtp.layers.<i>.<rest>    for every native MTP layer i

vLLM uses native layer ``spec_step_idx % num_mtp_layers`` at draft depth ``spec_step_idx``; a
bebop head is one layer applied at every depth, so it fills every native layer slot.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from bebop_vllm.errors import BebopError
from bebop_vllm.heads.module import QWEN3_5_MODEL_TYPES, HeadShape
from bebop_vllm.heads.target import read_target_config, read_target_tensors

_SHARED = {
    "enorm.weight": "mtp.pre_fc_norm_embedding.weight",
    "hnorm.weight": "mtp.pre_fc_norm_hidden.weight",
    "fc.weight": "mtp.fc.weight",
    "norm.weight": "mtp.norm.weight",
}
_LAYER = re.compile(r"^mtp\.layers\.(\d+)\.")


def native_name(head_name: str, layer: int) -> str:
    """The checkpoint name of head tensor ``head_name`` in native MTP layer ``layer``."""
    if head_name in _SHARED:
        return _SHARED[head_name]
    if head_name.startswith("layer."):
        return f"mtp.layers.{layer}.{head_name[len('layer.') :]}"
    raise BebopError(f"head tensor {head_name!r} has no native MTP counterpart")


def head_to_native_names(head_names: list[str], num_mtp_layers: int) -> dict[str, list[str]]:
    """Head tensor name -> the checkpoint names it fills (shared tensors once, layer tensors in
    every native layer slot)."""
    return {n: sorted({native_name(n, i) for i in range(num_mtp_layers)}) for n in head_names}


def _target_mtp(target_model_dir: Path) -> tuple[dict[str, Path], dict[str, tuple[int, ...]], int]:
    """The target's native MTP tensors: name -> shard file, name -> shape, number of MTP layers."""
    cfg = read_target_config(target_model_dir)
    if cfg.get("model_type") not in QWEN3_5_MODEL_TYPES:
        raise BebopError(
            f"{target_model_dir} has model_type {cfg.get('model_type')!r}: native MTP replacement supports "
            f"Qwen3.5 targets ({', '.join(QWEN3_5_MODEL_TYPES)})"
        )
    files = sorted(target_model_dir.glob("*.safetensors"))
    where: dict[str, Path] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():  # noqa: SIM118 - safe_open has keys(), not __iter__
                if name.startswith("mtp."):
                    where[name] = f
                    shapes[name] = tuple(st.get_slice(name).get_shape())
    if not where:
        raise BebopError(
            f"{target_model_dir} has no native MTP tensors (mtp.*): nothing to replace. Serve bebop heads on "
            "targets without MTP layers with method 'bebop' (Llama-family targets)"
        )
    layers = {int(m.group(1)) for n in where if (m := _LAYER.match(n))}
    if layers != set(range(len(layers))):
        raise BebopError(f"{target_model_dir}: native MTP layers {sorted(layers)} are not numbered 0..n-1")
    return where, shapes, len(layers)


def native_mtp_to_head(target_model_dir: str | Path, shape: HeadShape, layer: int = 0) -> dict[str, torch.Tensor]:
    """The target's native MTP weights as a head state dict (fp32; native layer ``layer``).

    Used to warm-start a Qwen3.5 head from the MTP module the target was trained with."""
    target_model_dir = Path(target_model_dir)
    _, _, num_layers = _target_mtp(target_model_dir)
    if not 0 <= layer < num_layers:
        raise BebopError(f"{target_model_dir} has {num_layers} native MTP layer(s); layer {layer} does not exist")
    from bebop_vllm.heads.checkpoint import expected_tensor_shapes

    wanted = {head_name: native_name(head_name, layer) for head_name in expected_tensor_shapes(shape)}
    tensors = read_target_tensors(target_model_dir, list(wanted.values()))  # one pass over the shards
    out: dict[str, torch.Tensor] = {}
    for head_name, want in expected_tensor_shapes(shape).items():
        native = wanted[head_name]
        if native not in tensors:
            raise BebopError(f"{target_model_dir} lacks native MTP tensor {native!r} (for head tensor {head_name!r})")
        t = tensors[native]
        if tuple(t.shape) != want:
            raise BebopError(f"native MTP tensor {native!r} has shape {tuple(t.shape)}, the head expects {want}")
        out[head_name] = t.float()
    return out


def export_native_mtp(heads_dir: str | Path, target_model_dir: str | Path, out_dir: str | Path) -> Path:
    """Write ``out_dir``: the target folder with its ``mtp.*`` tensors replaced by the heads'.

    Refuses (BebopError): heads for another model (``load_heads`` checks), Llama-kind heads, a
    target without native MTP tensors, any native MTP tensor the heads do not fill or a shape
    that differs, an existing non-empty ``out_dir``. Replaced tensors keep the native dtype.
    Serve the result with ``--speculative-config '{"method": "mtp", "num_speculative_tokens": K}'``.
    """
    from bebop_vllm.heads.checkpoint import load_heads

    heads_dir, target_model_dir, out_dir = Path(heads_dir), Path(target_model_dir), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise BebopError(f"{out_dir} exists and is not empty: choose a new output folder")
    if out_dir.resolve() == target_model_dir.resolve():
        raise BebopError("the output folder must differ from the target folder")
    where, shapes, num_layers = _target_mtp(target_model_dir)
    head = load_heads(heads_dir, target_model_dir)
    if not head.shape.is_qwen3_5:
        raise BebopError(f"{heads_dir} holds {head.shape.layer_kind} heads; native MTP replacement needs qwen3_5 heads")
    state = head.state_dict()
    replacement: dict[str, torch.Tensor] = {}
    for head_name, natives in head_to_native_names(list(state), num_layers).items():
        for native in natives:
            if native not in shapes:
                raise BebopError(
                    f"{target_model_dir} has no native MTP tensor {native!r} for head tensor {head_name!r}"
                )
            if tuple(state[head_name].shape) != shapes[native]:
                raise BebopError(
                    f"head tensor {head_name!r} {tuple(state[head_name].shape)} does not fit native "
                    f"{native!r} {shapes[native]}"
                )
            replacement[native] = state[head_name]
    unfilled = sorted(set(shapes) - set(replacement))
    if unfilled:
        raise BebopError(f"the heads do not fill these native MTP tensors of {target_model_dir}: {unfilled}")

    out_dir.mkdir(parents=True, exist_ok=True)
    for f in sorted(target_model_dir.iterdir()):
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy2(f, out_dir / f.name)
    for f in sorted(target_model_dir.glob("*.safetensors")):
        if f not in where.values():
            shutil.copy2(f, out_dir / f.name)
            continue
        with safe_open(str(f), framework="pt") as st:
            meta = st.metadata() or {}
            tensors = {n: st.get_tensor(n) for n in st.keys()}  # noqa: SIM118
        for n in set(tensors) & set(replacement):
            # one copy per slot: safetensors refuses tensors that share memory
            tensors[n] = replacement[n].to(tensors[n].dtype).clone()
        save_file({n: t.contiguous() for n, t in tensors.items()}, str(out_dir / f.name), metadata=meta or None)
    (out_dir / "bebop-export.json").write_text(
        json.dumps(
            {
                "heads": str(heads_dir.resolve()),
                "heads_metadata": head.metadata.model_dump(mode="json"),
                "target": str(target_model_dir.resolve()),
                "replaced_tensors": sorted(replacement),
                "num_mtp_layers": num_layers,
            },
            indent=2,
        )
        + "\n"
    )
    return out_dir
