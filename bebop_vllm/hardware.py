"""What the machine computes fast: used to pick defaults that do not crawl on small CPUs."""

from __future__ import annotations

from pathlib import Path

# CPU flags (Linux /proc/cpuinfo) with native bf16 matrix math; without them (e.g. AVX2-only
# x86) vLLM's CPU path emulates bf16 and decodes ~3x slower than float32 (measured, README).
_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[-1].split())
            break
    return any(f in flags for f in _BF16_CPU_FLAGS)


def fast_engine_dtype() -> str:
    """``bfloat16`` on CUDA or on CPUs with bf16 instructions, else ``float32``."""
    import torch

    if torch.cuda.is_available() or cpu_has_bf16():
        return "bfloat16"
    return "float32"
