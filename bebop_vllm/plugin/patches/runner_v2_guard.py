"""Route bebop engines to the V1 model runner on GPU (where our verifier is installed).

vLLM 0.32 defaults to Model Runner V2 on GPU (vllm/config/vllm.py:703-740 ``use_v2_model_runner``)
and falls back to V1 when ``_get_v2_model_runner_unsupported_features`` (vllm/config/vllm.py:2914,
vLLM 0.32.0) lists something. We add "the bebop speculative method" to that list for engines whose
``additional_config`` carries bebop options, so they run on V1 without any environment variable.
An explicit ``VLLM_USE_V2_MODEL_RUNNER=1`` would bypass that list: we refuse it with a clear
error instead of silently verifying with vLLM's V2 sampler. (On CPU vLLM always uses V1.)

Effect on engines that are not bebop: none. The wrapper returns vLLM's list unchanged unless
``additional_config`` has a "bebop" key, which only the ``speculative_config`` patch writes.
"""

from __future__ import annotations

import functools
from typing import Any

from bebop_vllm.plugin.patches.base import Patch

UPSTREAM = "vllm/config/vllm.py:2914 VllmConfig._get_v2_model_runner_unsupported_features (vLLM 0.32.0)"
FEATURE = "the bebop speculative method (bebop-vllm hooks the V1 runner)"


def _make_replacement(original: Any) -> Any:
    @functools.wraps(original)
    def _get_v2_model_runner_unsupported_features(self: Any) -> list[str]:
        unsupported = list(original(self))
        additional = getattr(self, "additional_config", None) or {}
        if "bebop" in additional:
            unsupported.append(FEATURE)
        return unsupported

    return _get_v2_model_runner_unsupported_features


def check_not_forced_v2() -> None:
    """Raise if the user forces Model Runner V2 (called while translating a bebop config)."""
    import vllm.envs as envs

    from bebop_vllm.config import BebopSpecError

    if envs.VLLM_USE_V2_MODEL_RUNNER is True:
        raise BebopSpecError(
            "method 'bebop' runs on vLLM's V1 model runner, but VLLM_USE_V2_MODEL_RUNNER=1 forces V2; "
            "unset VLLM_USE_V2_MODEL_RUNNER (or set it to 0)")


PATCH = Patch(
    name="runner_v2_guard",
    upstream=UPSTREAM,
    module="vllm.config.vllm",
    owner="VllmConfig",
    attr="_get_v2_model_runner_unsupported_features",
    expected_params=("self",),
    make_replacement=_make_replacement,
)
