"""vLLM plugin entry point (``vllm.general_plugins`` → :func:`register`).

:func:`register` runs in *every* vLLM process of an environment where bebop-vllm is installed,
whether or not an engine asks for method "bebop". So nothing that concerns bebop alone may
break vLLM there:

- vLLM release not supported (:mod:`.version`), upstream source not the recorded one
  (:mod:`.upstream` fingerprints) or a patch target failing its check: one warning, *no* patch
  applied, no model registered. Only a request for method "bebop" is refused, with that
  reason (:mod:`.refusal`: a version-agnostic wrapper that touches nothing else).
- otherwise every patch of :data:`bebop_vllm.plugin.patches.PATCHES` is checked first, then
  applied, all or none; patches whose ``applies`` predicate says this process does not need
  them (``cpu_expand_fix`` off CPU hosts) are left out.

:func:`verify` is the strict form (raises instead of warning) for scripts and tests.
"""

from __future__ import annotations

import logging
import os
import threading

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_registered = False
# Why bebop is switched off in this process (None: patches applied, or register() not run yet).
disabled_reason: str | None = None

# Diagnostics only: comma-separated patch names to leave out (e.g. BEBOP_DISABLE_PATCHES=cpu_expand_fix
# re-introduces vLLM's CPU temperature bug so the exactness test can show it catches it).
DISABLE_ENV = "BEBOP_DISABLE_PATCHES"

# The heads' config.json names "BebopMTPModel"; vLLM's EAGLEConfig (method "eagle", which the
# "bebop" method runs under) renames it "EagleBebopMTPModel". Both resolve to the same class.
DRAFT_ARCHITECTURES = ("BebopMTPModel", "EagleBebopMTPModel")

# Components checked by fingerprint that are not patches: code that copies vLLM's.
COPIED_COMPONENTS = ("verifier", "sampling_operator", "serve")


def _register_models() -> None:
    from vllm import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    for arch in DRAFT_ARCHITECTURES:
        if arch not in supported:
            # Lazy "module:Class" form: the model code is imported only where a draft is built.
            ModelRegistry.register_model(arch, "bebop_vllm.plugin.draft_model:BebopMTPModel")


def compatibility_problems(version: str | None = None) -> list[str]:
    """Why bebop cannot patch the installed vLLM (empty: it can). Changes nothing.

    Checks the release, the fingerprint of every upstream definition a patch replaces or copies
    (for that release) and every patch target's presence and parameters.
    """
    from bebop_vllm.plugin import upstream
    from bebop_vllm.plugin.version import base_version, installed_vllm_version, version_problem

    found = installed_vllm_version() if version is None else version
    problem = version_problem(found)
    if problem is not None:
        return [problem]
    assert found is not None
    from bebop_vllm.plugin.patches import PATCHES, PatchError

    names = [p.name for p in PATCHES] + list(COPIED_COMPONENTS)
    problems = [str(m) for m in upstream.check(base_version(found), names)]
    if problems:
        return problems
    for patch in PATCHES:
        try:
            patch.check()
        except PatchError as exc:
            problems.append(str(exc))
    return problems


def verify() -> None:
    """Raise :class:`~bebop_vllm.plugin.upstream.FingerprintMismatch` unless bebop can patch this vLLM."""
    from bebop_vllm.plugin.upstream import FingerprintMismatch

    problems = compatibility_problems()
    if problems:
        raise FingerprintMismatch("bebop-vllm cannot patch the installed vLLM:\n  " + "\n  ".join(problems))


def _disable(problems: list[str]) -> None:
    global disabled_reason
    from bebop_vllm.plugin.refusal import install_refusal

    disabled_reason = "; ".join(problems)
    logger.warning("bebop-vllm is inactive in this vLLM (no patches applied; method 'bebop' will be "
                   "refused; other engines are unaffected): %s", "\n  ".join(problems))
    install_refusal(disabled_reason)


def register() -> None:
    """Register bebop with vLLM. Runs in every vLLM process: idempotent, cheap, never breaks vLLM.

    On a supported, unmodified vLLM: registers the draft model class and applies every needed
    patch in :data:`bebop_vllm.plugin.patches.PATCHES` exactly once. Otherwise: one warning and
    a refusal of method "bebop" only.
    """
    global _registered
    if _registered:
        return
    with _lock:
        if _registered:
            return
        from bebop_vllm.plugin.patches import PATCHES

        disabled = {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}
        unknown = disabled - {p.name for p in PATCHES}
        if unknown:
            raise ValueError(f"{DISABLE_ENV} names unknown patches {sorted(unknown)}; "
                             f"known: {[p.name for p in PATCHES]}")
        problems = compatibility_problems()
        if problems:
            _disable(problems)
            _registered = True
            return
        _register_models()
        for patch in PATCHES:
            if patch.name in disabled:
                logger.warning("bebop patch %r DISABLED via %s", patch.name, DISABLE_ENV)
                continue
            if not patch.needed():
                logger.debug("bebop patch %r not needed in this process", patch.name)
                continue
            patch.apply()
        _registered = True
