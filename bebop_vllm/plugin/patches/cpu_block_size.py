"""CPU: bebop engines default to 32-token KV cache blocks (vLLM's CPU default is 128).

Wraps ``CpuPlatform.check_and_update_config`` (vllm/platforms/cpu.py:216, vLLM 0.32.0), which
sets ``cache_config.block_size = 128`` when the user did not choose one.

Why: with an EAGLE-style drafter, vLLM reuses a prefix-cache hit one block short ("Need to drop
the last matched block if eagle is enabled", vllm/v1/core/single_type_kv_cache_manager.py): the
drafter's KV entry at a block's last position depends on the token after the block, which another
request may not share. With 128-token blocks a prompt shorter than 256 tokens gets no prefix-cache
hit at all, so the samples of one prompt (an RL group, ``n > 1``, a retried request) each
recompute the whole prompt where a plain engine computes it once. 32 is the smallest block the CPU
attention backend supports (``CPUAttentionBackend.get_supported_kernel_block_sizes``: multiples of
32), so a bebop engine then loses at most 32 tokens of each hit. Measured on 2 AVX2 cores
(benchmarks/results/rollout_v6_cpu_block.md): an RL-shaped rollout (32 prompts x 4 samples) took
147.3 / 150.0 s with 128-token blocks against 115.0 / 121.4 s with 32 (plain: 121.8 / 123.8 s), and decode
speed at 1 and 16 requests in flight was the same or slightly higher with 32.

Effect on engines that are not bebop: none (the wrapper returns after vLLM's own code unless the
config carries bebop's options). A block size the user chose (``block_size=...``,
``--block-size``) is kept, as is any size other than vLLM's CPU default (MLA models, DeepSeek-V4).
GPU hosts do not apply this patch.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from bebop_vllm.plugin.patches.base import Patch, on_cpu_host

UPSTREAM = "vllm/platforms/cpu.py:216 CpuPlatform.check_and_update_config (vLLM 0.32.0)"

# vLLM's CPU default (the value check_and_update_config sets when the user chose none)
VLLM_CPU_DEFAULT_BLOCK_SIZE = 128
# the smallest block the CPU attention backend supports (multiples of 32)
BEBOP_CPU_BLOCK_SIZE = 32

logger = logging.getLogger("vllm.bebop.cpu_block_size")  # shown with vLLM's own log lines


def bebop_cpu_block_size(vllm_config: Any) -> None:
    """After vLLM's CPU config step: a bebop engine with vLLM's default block size gets 32."""
    from bebop_vllm.config import ADDITIONAL_CONFIG_KEY

    cache_config = vllm_config.cache_config
    if ADDITIONAL_CONFIG_KEY not in (vllm_config.additional_config or {}):
        return
    if cache_config.user_specified_block_size or cache_config.block_size != VLLM_CPU_DEFAULT_BLOCK_SIZE:
        return
    cache_config.block_size = BEBOP_CPU_BLOCK_SIZE
    logger.info("bebop: KV cache block size %d on CPU (vLLM's default %d): EAGLE-style engines reuse a "
                "prefix-cache hit one block short; set block_size to override",
                BEBOP_CPU_BLOCK_SIZE, VLLM_CPU_DEFAULT_BLOCK_SIZE)


def _make_replacement(original: Any) -> Any:
    func = original.__func__

    @functools.wraps(func)
    def check_and_update_config(cls: Any, vllm_config: Any) -> None:
        func(cls, vllm_config)
        bebop_cpu_block_size(vllm_config)

    return classmethod(check_and_update_config)


PATCH = Patch(
    name="cpu_block_size",
    upstream=UPSTREAM,
    module="vllm.platforms.cpu",
    owner="CpuPlatform",
    attr="check_and_update_config",
    expected_params=("cls", "vllm_config"),
    make_replacement=_make_replacement,
    applies=on_cpu_host,
)
