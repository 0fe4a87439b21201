"""Policy weights for :meth:`RolloutEngine.update_policy`: what the engine expects, checked before loading.

The expected tensors are the engine's own checkpoint (the model folder it was built from): every
update must carry the same names with the same shapes, in the dtype the engine runs (vLLM's loaders
would silently cast a float32 tensor into a bfloat16 Parameter, or silently skip an unknown name).
Everything here runs in the frontend process and reads no weights it does not have to: a path is
checked from its safetensors headers, a ``{name: tensor}`` mapping from the tensors' metadata (plus
one pass for non-finite values, the usual sign of a diverged policy).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from bebop_vllm.errors import BebopError
from bebop_vllm.safetensors_header import read_header

# safetensors header dtype names -> torch dtypes
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_LISTED = 5


class PolicyWeightsError(BebopError, ValueError):
    """Policy weights the engine refuses (the message names the tensor); the old policy is kept."""


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype


def read_safetensors_header(path: str | Path) -> dict[str, TensorSpec]:
    """Names, shapes and dtypes of one safetensors file, from its header only."""
    path = Path(path)
    try:
        header = read_header(path)
    except (OSError, ValueError) as exc:
        raise PolicyWeightsError(f"{path} is not a readable safetensors file ({exc})") from None
    out = {}
    for name, meta in header.items():
        dtype = _ST_DTYPES.get(meta.get("dtype"))
        if dtype is None:
            raise PolicyWeightsError(f"tensor {name!r} in {path} has unsupported dtype {meta.get('dtype')!r}")
        out[name] = TensorSpec(tuple(int(d) for d in meta["shape"]), dtype)
    return out


def safetensors_files(path: str | Path) -> list[Path]:
    """The safetensors files of a policy: the file itself, or every ``*.safetensors`` of a folder."""
    path = Path(path).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if files:
            return files
        raise PolicyWeightsError(f"policy folder {path} holds no *.safetensors file")
    raise PolicyWeightsError(f"policy weights {path} do not exist (pass a safetensors file, a folder, or a mapping)")


def read_policy_specs(files: Iterable[Path]) -> dict[str, TensorSpec]:
    specs: dict[str, TensorSpec] = {}
    for f in files:
        for name, spec in read_safetensors_header(f).items():
            if name in specs:
                raise PolicyWeightsError(f"tensor {name!r} appears in more than one file of the policy ({f})")
            specs[name] = spec
    return specs


@dataclass(frozen=True)
class ExpectedPolicy:
    """The tensors an update must carry: the engine checkpoint's names and shapes, the engine's dtype."""

    tensors: dict[str, TensorSpec]
    engine_dtype: torch.dtype
    tied_lm_head: bool  # lm_head.weight is the embedding: accepted, checked, then dropped

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, engine_dtype: torch.dtype) -> ExpectedPolicy:
        model_dir = Path(model_dir).expanduser()
        if not model_dir.is_dir():
            raise PolicyWeightsError(
                f"RolloutEngine needs a local model folder to check policy updates against, got {model_dir}")
        specs = read_policy_specs(safetensors_files(model_dir))
        try:
            config = json.loads((model_dir / "config.json").read_text())
        except (OSError, ValueError):
            config = {}
        tied = bool(config.get("tie_word_embeddings", False)) and "lm_head.weight" not in specs
        return cls(specs, engine_dtype, tied)

    def want_dtype(self, spec: TensorSpec) -> torch.dtype:
        return self.engine_dtype if spec.dtype.is_floating_point else spec.dtype

    def validate(self, got: Mapping[str, TensorSpec]) -> list[str]:
        """Check names, shapes and dtypes; return the names to load (a tied lm_head is dropped)."""
        unknown = [n for n in got if n not in self.tensors and not (self.tied_lm_head and n == "lm_head.weight")]
        if unknown:
            example = next(iter(self.tensors))
            more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
            raise PolicyWeightsError(f"unknown policy tensor {unknown[0]!r}{more}: the engine's checkpoint has "
                                     f"no such name (its names look like {example!r})")
        missing = [n for n in self.tensors if n not in got]
        if missing:
            listed = ", ".join(repr(n) for n in missing[:_MAX_LISTED])
            more = f" and {len(missing) - _MAX_LISTED} more" if len(missing) > _MAX_LISTED else ""
            raise PolicyWeightsError(
                f"policy update lacks tensor {listed}{more}: update_policy takes the whole policy")
        for name, spec in got.items():
            ref = self.tensors.get(name) or self.tensors["model.embed_tokens.weight"]
            if tuple(spec.shape) != ref.shape:
                raise PolicyWeightsError(
                    f"policy tensor {name!r} has shape {list(spec.shape)}, the engine's has {list(ref.shape)}")
            want = self.want_dtype(ref)
            if spec.dtype != want:
                raise PolicyWeightsError(
                    f"policy tensor {name!r} has dtype {spec.dtype}, the engine runs {want}: cast it "
                    f"(tensor.to({want})) before update_policy; vLLM would cast it silently")
        return [n for n in got if n in self.tensors]


def tensor_specs(weights: Mapping[str, torch.Tensor]) -> dict[str, TensorSpec]:
    out = {}
    for name, t in weights.items():
        if not isinstance(t, torch.Tensor):
            raise PolicyWeightsError(f"policy tensor {name!r} is a {type(t).__name__}, not a torch.Tensor")
        out[name] = TensorSpec(tuple(t.shape), t.dtype)
    return out


def check_finite(weights: Mapping[str, torch.Tensor], names: Iterable[str]) -> None:
    for name in names:
        t = weights[name]
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise PolicyWeightsError(f"policy tensor {name!r} holds NaN or inf values")


def fingerprint(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over names, dtypes, shapes and bytes, in name order (bit-exact identity of a set of tensors)."""
    h = hashlib.sha256()
    for name, t in sorted(named, key=lambda kv: kv[0]):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
