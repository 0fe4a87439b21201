"""Reading what the head needs from its (frozen) target model folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from bebop_vllm.errors import BebopError
from bebop_vllm.heads.module import check_aux_layer_ids


def read_target_config(target_model_dir: str | Path) -> dict[str, Any]:
    path = Path(target_model_dir) / "config.json"
    if not path.is_file():
        raise BebopError(f"{path} not found: expected a Hugging Face model folder (config.json + *.safetensors)")
    return json.loads(path.read_text(encoding="utf-8"))


def read_target_tensors(target_model_dir: str | Path, names: list[str]) -> dict[str, torch.Tensor]:
    """The named tensors from the target's safetensors file(s); missing names are absent."""
    files = sorted(Path(target_model_dir).glob("*.safetensors"))
    if not files:
        raise BebopError(f"no *.safetensors in {target_model_dir}: the target must be a safetensors HF folder")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in set(names) & set(st.keys()):
                out[name] = st.get_tensor(name)
    return out


def target_embedding_and_lm_head(
    target_model_dir: str | Path, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """(embedding [V, H], lm_head [V, H]) of a Llama-family target; tied lm_head = embedding."""
    t = read_target_tensors(target_model_dir, ["model.embed_tokens.weight", "lm_head.weight"])
    if "model.embed_tokens.weight" not in t:
        raise BebopError(f"{target_model_dir} has no tensor model.embed_tokens.weight (not a Llama-family checkpoint?)")
    embed = t["model.embed_tokens.weight"].to(dtype)
    lm_head = t["lm_head.weight"].to(dtype) if "lm_head.weight" in t else embed
    return embed, lm_head


def load_target_model(target_model_dir: str | Path, dtype: torch.dtype = torch.float32) -> Any:
    """The frozen target as a transformers causal LM in eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(target_model_dir), dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    return model


@torch.no_grad()
def final_hidden_states(model: Any, token_ids: torch.Tensor) -> torch.Tensor:
    """The target's final hidden states AFTER its final RMSNorm, [B, L] -> [B, L, H].

    This is the tensor vLLM 0.32's LlamaModel.forward returns (llama.py:452, ``self.norm``
    applied before returning) and what the EAGLE/MTP proposer hands the drafter;
    ``last_hidden_state`` of transformers' LlamaModel is the same (post-norm) tensor.
    """
    return model.model(input_ids=token_ids).last_hidden_state


@torch.no_grad()
def target_states(
    model: Any, token_ids: torch.Tensor, aux_layer_ids: tuple[int, ...] = (), attention_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One target pass: (post-norm final hidden states [B, L, H], aux features [B, L, n H] or None).

    The aux features are the residual stream after the layers of ``aux_layer_ids`` in vLLM's
    aux-hidden-state numbering (id i = the output of layer i - 1, before any norm; vLLM's
    LlamaModel.forward, llama.py:432-441, vLLM 0.32), which equals transformers'
    ``hidden_states[i]`` for i < num_layers (its last entry is post-norm, so id num_layers is
    refused here). :func:`head_features` lays the two out as an aux head reads them. With right
    padding (``attention_mask``), real positions are exact.
    """
    aux_layer_ids = check_aux_layer_ids(aux_layer_ids, len(model.model.layers))
    out = model.model(input_ids=token_ids, attention_mask=attention_mask, output_hidden_states=bool(aux_layer_ids))
    if not aux_layer_ids:
        return out.last_hidden_state, None
    return out.last_hidden_state, torch.cat(aux_streams(out, aux_layer_ids), dim=-1)


def aux_streams(model_output: Any, aux_layer_ids: tuple[int, ...]) -> list[torch.Tensor]:
    """The residual streams of ``aux_layer_ids`` (vLLM's numbering, see :func:`target_states`) from
    a transformers forward run with ``output_hidden_states=True``: id i is ``hidden_states[i]``.
    The one place that maps the ids to transformers' outputs (also used by the acceptance study,
    which runs its target with a KV cache)."""
    return [model_output.hidden_states[i] for i in aux_layer_ids]


def head_features(hidden: torch.Tensor, aux: torch.Tensor | None) -> torch.Tensor:
    """What a head reads at depth 1: [..., H] = h for a plain head, [..., (n + 1) H] = [aux, h]
    for a head with aux layers (``BebopMTPHead.combine``'s layout, vLLM's capture order)."""
    return hidden if aux is None else torch.cat([aux, hidden], dim=-1)
