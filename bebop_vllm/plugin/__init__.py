"""vLLM plugin entry point (``vllm.general_plugins`` → :func:`register`)."""

from __future__ import annotations

import threading

_lock = threading.Lock()
_registered = False

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
        for patch in PATCHES:
            patch.apply()
        _registered = True
