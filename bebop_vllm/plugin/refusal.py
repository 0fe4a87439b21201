"""Refuse method "bebop" — and nothing else — where bebop cannot patch vLLM.

When ``register()`` finds a vLLM release it does not support (or whose source differs from the
recorded one), it applies no patch. vLLM would then reject ``{"method": "bebop"}`` itself, but
with a pydantic list of valid methods that does not say why. This wrapper around
``EngineArgs.create_speculative_config`` (the place both ``LLM(...)`` and the OpenAI server
turn ``speculative_config`` into vLLM's config, in the main process, before any engine starts)
raises a :class:`~bebop_vllm.config.BebopSpecError` with the reason for configs whose method
is "bebop" and calls vLLM's function unchanged for every other config. It takes ``*args,
**kwargs`` and reads only ``speculative_config`` / ``spec_method`` so that it works on any
release that still has the method; where it is gone, vLLM's own rejection remains.
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Any

logger = logging.getLogger(__name__)

_MARK = "__bebop_refusal__"


def asks_for_bebop(engine_args: Any) -> bool:
    """Whether these engine arguments request method "bebop" (dict config or ``--spec-method``)."""
    from bebop_vllm.config import METHOD_NAME

    spec = getattr(engine_args, "speculative_config", None)
    if isinstance(spec, dict) and spec.get("method") == METHOD_NAME:
        return True
    return getattr(engine_args, "spec_method", None) == METHOD_NAME


def refusal_message(reason: str) -> str:
    return f"method 'bebop' is unavailable in this vLLM: {reason}"


def install_refusal(reason: str) -> bool:
    """Make ``EngineArgs.create_speculative_config`` refuse method "bebop" with ``reason``.

    Returns False (and logs) where the hook point does not exist; never raises.
    """
    try:
        from vllm.engine.arg_utils import EngineArgs
    except Exception as exc:  # noqa: BLE001 - an unknown vLLM: never break it
        logger.warning("bebop-vllm: cannot install the method 'bebop' refusal (%s)", exc)
        return False
    original = inspect.getattr_static(EngineArgs, "create_speculative_config", None)
    if not callable(original):
        logger.warning("bebop-vllm: vLLM has no EngineArgs.create_speculative_config; method 'bebop' "
                       "is rejected by vLLM itself")
        return False
    if getattr(original, _MARK, False):
        original.__bebop_reason__ = reason
        return True

    @functools.wraps(original)
    def create_speculative_config(self: Any, *args: Any, **kwargs: Any) -> Any:
        if asks_for_bebop(self):
            from bebop_vllm.config import BebopSpecError

            raise BebopSpecError(refusal_message(create_speculative_config.__bebop_reason__))
        return original(self, *args, **kwargs)

    setattr(create_speculative_config, _MARK, True)
    create_speculative_config.__bebop_reason__ = reason  # type: ignore[attr-defined]
    EngineArgs.create_speculative_config = create_speculative_config
    return True
