"""The foundation: prompt sets and their split, the model cache checks, the CLI's help."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bebop_vllm.cli import SUBCOMMANDS, build_parser
from bebop_vllm.data import DOMAINS, load_prompts, render, split_of
from bebop_vllm.errors import BebopError
from bebop_vllm.model_fetch import MANIFEST, check_model_dir, fetch_model
from bebop_vllm.paths import default_model_dir


@pytest.mark.parametrize("domain,minimum", [("math", 250), ("code", 160), ("agentic", 1000)])
def test_each_domain_loads_from_its_package(domain: str, minimum: int) -> None:
    prompts = load_prompts([domain])
    assert len(prompts) >= minimum
    assert len({p.id for p in prompts}) == len(prompts), "ids must be unique within a domain"
    for p in prompts[:20]:
        assert p.domain == domain
        assert p.messages[-1]["role"] == "user" and p.messages[-1]["content"].strip()


def test_split_is_deterministic_disjoint_and_about_one_fifth() -> None:
    for d in DOMAINS:
        train = {p.id for p in load_prompts([d], "train")}
        held = {p.id for p in load_prompts([d], "heldout")}
        assert train and held and not (train & held)
        assert train | held == {p.id for p in load_prompts([d])}
        assert 0.12 < len(held) / (len(train) + len(held)) < 0.28
    # the split is a pure function of (domain, id): same answer in any process
    code = "from bebop_vllm.data import split_of; print(split_of('code', 'HumanEval/0'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == split_of("code", "HumanEval/0")


def test_limit_per_domain_is_a_stable_prefix() -> None:
    a = load_prompts(DOMAINS, "heldout", limit_per_domain=3)
    b = load_prompts(DOMAINS, "heldout", limit_per_domain=5)
    assert [p.domain for p in a] == ["math"] * 3 + ["code"] * 3 + ["agentic"] * 3
    assert a[:3] == b[:3]


def test_agentic_prompts_carry_their_tools_into_the_rendered_text() -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir())
    p = load_prompts(["agentic"], limit_per_domain=1)[0]
    text = render(p, tok)
    assert p.tools and p.tools[0]["name"] in text
    assert text.rstrip().endswith("assistant"), "generation prompt must open the assistant turn"


def test_unknown_domain_and_split_are_refused() -> None:
    with pytest.raises(BebopError, match="unknown domain 'poetry'"):
        load_prompts(["poetry"])
    with pytest.raises(BebopError, match="split must be"):
        load_prompts(["math"], split="test")  # type: ignore[arg-type]


def test_default_model_cache_is_complete() -> None:
    assert check_model_dir(default_model_dir(), full=False) is None
    cfg = json.loads((default_model_dir() / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["vocab_size"] == 49152
    assert "quantization_config" not in cfg


def test_corrupt_or_partial_cache_is_detected(tmp_path: Path) -> None:
    copy = tmp_path / "model"
    shutil.copytree(default_model_dir(), copy)
    assert check_model_dir(copy) is None
    with (copy / "model.safetensors").open("r+b") as f:  # truncate: an interrupted copy
        f.truncate(1000)
    assert "model.safetensors has 1000 bytes" in check_model_dir(copy)
    (copy / MANIFEST).unlink()
    assert "partial build" in check_model_dir(copy)
    assert check_model_dir(tmp_path / "nothing") == "not built yet"


def test_flipped_byte_is_caught_by_the_full_check(tmp_path: Path) -> None:
    copy = tmp_path / "model"
    shutil.copytree(default_model_dir(), copy)
    with (copy / "tokenizer.json").open("r+b") as f:
        f.seek(10)
        b = f.read(1)
        f.seek(10)
        f.write(bytes([b[0] ^ 1]))
    assert check_model_dir(copy) is None  # same size: the quick check cannot see it
    assert "does not match its recorded sha256" in check_model_dir(copy, full=True)


def test_unwritable_cache_dir_gives_one_line_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(BebopError, match="set BEBOP_HOME to a writable folder"):
        fetch_model(blocker / "models" / "m")
    out_dir = str(blocker / "m")
    env_code = f"from bebop_vllm.cli import main; raise SystemExit(main(['fetch-model', '--out', {out_dir!r}]))"
    out = subprocess.run([sys.executable, "-c", env_code], capture_output=True, text=True)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr and "bebop fetch-model: error:" in out.stderr


def test_every_subcommand_and_option_has_help() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    assert set(sub.choices) == set(SUBCOMMANDS)
    for name, p in sub.choices.items():
        assert p.description, f"`bebop {name}` has no description"
        for action in p._actions:
            if action.dest != "help":
                assert action.help, f"`bebop {name}` option {action.option_strings or action.dest} has no help text"


def test_bebop_help_runs_as_a_console_script() -> None:
    exe = Path(sys.executable).parent / "bebop"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True)
    for name in SUBCOMMANDS:
        assert name in out.stdout


def test_fast_engine_dtype_follows_the_cpus_bf16_flags() -> None:
    from bebop_vllm.hardware import cpu_has_bf16

    assert cpu_has_bf16("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n")
    assert cpu_has_bf16("flags\t: fpu amx_bf16 amx_tile\n")
    assert not cpu_has_bf16("flags\t: fpu sse avx2 fma\n")  # AVX2-only: bf16 is emulated
    assert not cpu_has_bf16("")


def test_machine_info_records_preloaded_libraries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Benchmarks record LD_PRELOAD (an allocator or OpenMP runtime changes CPU step times)."""
    from bebop_vllm.hardware import describe_machine, machine_info

    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4:/venv/lib/libiomp5.so")
    info = machine_info()
    assert info["ld_preload"] == ["libtcmalloc_minimal.so.4", "libiomp5.so"]
    assert describe_machine(info).endswith("; LD_PRELOAD: libtcmalloc_minimal.so.4, libiomp5.so")
    monkeypatch.delenv("LD_PRELOAD")
    assert machine_info()["ld_preload"] == [] and "LD_PRELOAD" not in describe_machine(machine_info())
