"""vLLM plugin entry point (``vllm.general_plugins`` → :func:`register`)."""

from __future__ import annotations

import os
import threading

_lock = threading.Lock()
_registered = False

# Diagnostics only: comma-separated patch names to leave out (e.g. BEBOP_DISABLE_PATCHES=cpu_expand_fix
# re-introduces vLLM's CPU temperature bug so the exactness test can show it catches it).
DISABLE_ENV = "BEBOP_DISABLE_PATCHES"

# The heads' config.json names "BebopMTPModel"; vLLM's EAGLEConfig (method "eagle", which the
# "bebop" method runs under) renames it "EagleBebopMTPModel". Both resolve to the same class.
DRAFT_ARCHITECTURES = ("BebopMTPModel", "EagleBebopMTPModel")


def _register_models() -> None:
    from vllm import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    for arch in DRAFT_ARCHITECTURES:
        if arch not in supported:
            # Lazy "module:Class" form: the model code is imported only where a draft is built.
            ModelRegistry.register_model(arch, "bebop_vllm.plugin.draft_model:BebopMTPModel")


def register() -> None:
    """Register bebop with vLLM. Runs in every vLLM process: idempotent and cheap.

    Checks the vLLM version, registers the draft model class and applies every patch in
    :data:`bebop_vllm.plugin.patches.PATCHES` exactly once.
    """
    global _registered
    if _registered:
        return
    with _lock:
        if _registered:
            return
        from bebop_vllm.plugin.version import check_vllm_version

        check_vllm_version()
        from bebop_vllm.plugin.patches import PATCHES

        _register_models()
        disabled = {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}
        unknown = disabled - {p.name for p in PATCHES}
        if unknown:
            raise ValueError(f"{DISABLE_ENV} names unknown patches {sorted(unknown)}; "
                             f"known: {[p.name for p in PATCHES]}")
        for patch in PATCHES:
            if patch.name in disabled:
                import logging

                logging.getLogger(__name__).warning("bebop patch %r DISABLED via %s", patch.name, DISABLE_ENV)
                continue
            patch.apply()
        _registered = True
