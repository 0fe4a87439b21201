"""Install bebop's verifier (and draft-sampling flag) in the V1 model runner.

The V1 runner (used on CPU, and on GPU because the ``runner_v2_guard`` patch routes bebop engines
to V1) constructs vLLM's ``RejectionSampler`` in ``GPUModelRunner.__init__``
(vllm/v1/worker/gpu_model_runner.py:471, construction at :663, call at :3459-3465; vLLM 0.32.0;
``CPUModelRunner`` inherits it). We wrap ``__init__``: when ``additional_config["bebop"]`` says
verifier="bebop" the runner's ``rejection_sampler`` becomes :class:`BebopRejectionSampler`; when
it says draft_sampling="probabilistic" the drafter drafts from the request's own distribution
(see ``draft_sampling``); draft_length "auto"/"entropy" with an acceptance fit makes the runner
report each request's step entropy to the scheduler's policy (see ``draft_length`` and ``metrics``);
heads with aux layers make the runner capture the target's aux hidden states
(``use_aux_hidden_state_outputs``, which vLLM itself sets for method "eagle3" only,
gpu_model_runner.py:645; ``load_model`` then reads the layer ids from the heads' config.json,
``_setup_eagle3_aux_hidden_state_outputs`` :5230). Engines without bebop options are left exactly
as vLLM built them.
"""

from __future__ import annotations

import functools
from typing import Any

from bebop_vllm.plugin.patches.base import Patch

UPSTREAM = (
    "vllm/v1/worker/gpu_model_runner.py:471 GPUModelRunner.__init__ (RejectionSampler built at :663, "
    "called at :3459-3465) (vLLM 0.32.0)"
)


def install(runner: Any) -> None:
    """Swap in bebop's verifier / drafting mode on a freshly built runner."""
    from bebop_vllm.config import options_from_additional_config
    from bebop_vllm.plugin.patches.draft_sampling import BEBOP_FLAG

    opts = options_from_additional_config(runner.vllm_config.additional_config)
    if opts is None:
        return
    if getattr(runner.device, "type", None) == "cpu":
        # vLLM's rewind of a discarded chunk's seeded draw fails on CPU generators (cpu_seeded_chunks).
        from bebop_vllm.plugin.patches.cpu_seeded_chunks import BEBOP_FLAG as SEEDED_CHUNKS_FLAG

        setattr(runner, SEEDED_CHUNKS_FLAG, True)
    if opts.verifier == "bebop" and getattr(runner, "rejection_sampler", None) is not None:
        from bebop_vllm.plugin.verifier import BebopRejectionSampler

        runner.rejection_sampler = BebopRejectionSampler(
            runner.sampler, runner.speculative_config, runner.device
        )
    if opts.draft_length in ("auto", "entropy") and opts.acceptance_fit is not None:
        # The scheduler's draft-length policy reads each request's step entropy (see draft_length).
        from bebop_vllm.plugin.patches.metrics import POLICY_ENTROPY_FLAG

        setattr(runner, POLICY_ENTROPY_FLAG, True)
    drafter = getattr(runner, "drafter", None)
    spec = runner.speculative_config
    if drafter is not None and spec is not None and spec.draft_model_config is not None:
        from bebop_vllm.plugin.draft_model import aux_layer_ids

        if aux_layer_ids(spec.draft_model_config.hf_config):
            runner.use_aux_hidden_state_outputs = True  # the aux_features patch combines them
    if drafter is not None and opts.draft_sampling == "probabilistic":
        setattr(drafter, BEBOP_FLAG, True)


def _make_replacement(original: Any) -> Any:
    @functools.wraps(original)
    def __init__(self: Any, vllm_config: Any, device: Any) -> None:
        original(self, vllm_config, device)
        install(self)

    return __init__


PATCH = Patch(
    name="model_runner",
    upstream=UPSTREAM,
    module="vllm.v1.worker.gpu_model_runner",
    owner="GPUModelRunner",
    attr="__init__",
    expected_params=("self", "vllm_config", "device"),
    make_replacement=_make_replacement,
)
