"""vLLM plugin entry point (``vllm.general_plugins`` → :func:`register`)."""

from __future__ import annotations

import threading

_lock = threading.Lock()
_registered = False


DRAFT_ARCHITECTURE = "BebopMTPModel"


def _register_models() -> None:
    from vllm import ModelRegistry

    # Lazy "module:Class" form: the module (and torch model code) is imported only where a
    # draft model is actually built.
    if DRAFT_ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(DRAFT_ARCHITECTURE, "bebop_vllm.plugin.draft_model:BebopMTPModel")


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
