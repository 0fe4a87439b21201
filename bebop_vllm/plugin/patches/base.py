"""A named, version-pinned monkey patch of one vLLM internal.

What a patch replaces is pinned twice: here by its parameter names (checked right before
patching) and in :mod:`bebop_vllm.plugin.upstream` by a fingerprint of the upstream source per
supported vLLM release (checked by ``register()`` for every patch before any is applied).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class PatchError(RuntimeError):
    """A vLLM internal no longer looks like the one a patch was written for."""


@dataclass(eq=False)
class Patch:
    """Replace ``owner.attr`` in ``module`` (``owner`` None = a module-level name).

    ``upstream`` names what is replaced, e.g. ``"vllm/engine/arg_utils.py:2060
    EngineArgs.create_speculative_config (vLLM 0.32.0)"``. ``expected_params`` are the
    parameter names the original must have (checked before patching). ``make_replacement``
    receives the original and returns the replacement. ``also`` lists further
    ``(module, owner, attr)`` places that imported the same object by name and must see
    the replacement too. ``applies`` (default: always) says whether this process needs the
    patch at all (e.g. only on CPU hosts); a patch that does not apply is left out, not failed.
    """

    name: str
    upstream: str
    module: str
    attr: str
    make_replacement: Callable[[Any], Any]
    owner: str | None = None
    expected_params: tuple[str, ...] | None = None
    also: tuple[tuple[str, str | None, str], ...] = ()
    applies: Callable[[], bool] | None = None
    applied: bool = field(default=False, init=False)
    original: Any = field(default=None, init=False)

    def _container(self, module: str, owner: str | None) -> Any:
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            raise PatchError(f"patch {self.name!r}: cannot import {module} ({exc}); "
                             f"it replaces {self.upstream}") from exc
        if owner is None:
            return mod
        if not hasattr(mod, owner):
            raise PatchError(f"patch {self.name!r}: {module}.{owner} not found; "
                             f"it replaces {self.upstream}")
        return getattr(mod, owner)

    def needed(self) -> bool:
        """Whether this process needs the patch (its ``applies`` predicate; default True)."""
        return self.applies is None or bool(self.applies())

    def check(self) -> Any:
        """Raise :class:`PatchError` if the target is missing or its parameters changed.

        Returns the current (static) attribute. Changes nothing, so ``register()`` can check
        every patch before applying any.
        """
        container = self._container(self.module, self.owner)
        where = f"{self.module}.{self.owner + '.' if self.owner else ''}{self.attr}"
        if not hasattr(container, self.attr):
            raise PatchError(f"patch {self.name!r}: {where} not found; it replaces {self.upstream}")
        original = inspect.getattr_static(container, self.attr)
        if getattr(original, "__bebop_patch__", None) == self.name:
            return original
        if self.expected_params is not None:
            func = original.__func__ if isinstance(original, (staticmethod, classmethod)) else original
            target = func.__init__ if inspect.isclass(func) else func
            params = tuple(inspect.signature(target).parameters)
            if params != self.expected_params:
                raise PatchError(
                    f"patch {self.name!r}: {where} has parameters {params}, expected "
                    f"{self.expected_params} (written for {self.upstream})")
        for module, owner, attr in self.also:
            if getattr(self._container(module, owner), attr, None) is not original:
                raise PatchError(f"patch {self.name!r}: {module}.{attr} is not the object "
                                 f"{where}; it replaces {self.upstream}")
        return original

    def apply(self) -> None:
        """Check the target, then swap in the replacement (idempotent)."""
        if self.applied:
            return
        original = self.check()
        if getattr(original, "__bebop_patch__", None) == self.name:
            self.applied = True
            return
        container = self._container(self.module, self.owner)
        replacement = self.make_replacement(original)
        try:
            replacement.__bebop_patch__ = self.name
        except (AttributeError, TypeError):
            pass
        setattr(container, self.attr, replacement)
        for module, owner, attr in self.also:
            setattr(self._container(module, owner), attr, replacement)
        self.original = original
        self.applied = True


def on_cpu_host() -> bool:
    """Whether vLLM runs on its CPU platform in this process (an ``applies`` predicate)."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())
