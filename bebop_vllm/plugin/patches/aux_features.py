"""Heads with EAGLE-3-style features: combine the target's captured states before drafting.

For heads whose config.json declares ``bebop.aux_layer_ids`` the runner captures the target's
residual stream after those layers and after its last layer (the ``model_runner`` patch sets
``use_aux_hidden_state_outputs``) and hands the proposer their concatenation [T, (n + 1) H]
as ``target_hidden_states``. vLLM's proposer maps such states to the drafter's width only for
method "eagle3" (``self.model.combine_hidden_states``, llm_base_proposer.py:536-553, behind an
isinstance check against vLLM's own EAGLE-3 classes), and bebop runs as method "eagle". This
wraps ``SpecDecodeBaseProposer.propose`` (llm_base_proposer.py:512, vLLM 0.32.0) so that, for
bebop's aux heads only, ``target_hidden_states`` first goes through
:meth:`BebopMTPModel.combine_hidden_states` (the same math as ``BebopMTPHead.combine`` in
training; tests/test_parity.py checks the drafts against the plain-torch reference). Every other
proposer, and bebop heads without aux layers, are untouched.

Applied before ``draft_kv_only``, which wraps the same method and so runs first: a deferred
K = 0 pass holds the raw captured states (combined, batched, when they are written), while a
KV-only or full pass comes through here and receives the combined states.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from bebop_vllm.plugin.patches.base import Patch
from bebop_vllm.plugin.patches.draft_kv_only import PROPOSE_PARAMS

UPSTREAM = "vllm/v1/spec_decode/llm_base_proposer.py:512 SpecDecodeBaseProposer.propose (vLLM 0.32.0)"


def aux_head(proposer: Any) -> Any:
    """The proposer's :class:`BebopMTPModel` when its heads read aux layers, else None."""
    from bebop_vllm.plugin.draft_model import BebopMTPModel

    model = getattr(proposer, "model", None)
    if isinstance(model, BebopMTPModel) and model.aux_layer_ids:
        return model
    return None


def _make_replacement(original: Any) -> Any:
    params = list(inspect.signature(original).parameters)
    position = params.index("target_hidden_states") - 1  # without self

    @functools.wraps(original)
    def propose(self: Any, *args: Any, **kwargs: Any) -> Any:
        model = aux_head(self)
        if model is not None:
            if "target_hidden_states" in kwargs:
                kwargs["target_hidden_states"] = model.combine_hidden_states(kwargs["target_hidden_states"])
            else:
                args = (*args[:position], model.combine_hidden_states(args[position]), *args[position + 1 :])
        return original(self, *args, **kwargs)

    return propose


PATCH = Patch(
    name="aux_features",
    upstream=UPSTREAM,
    module="vllm.v1.spec_decode.llm_base_proposer",
    owner="SpecDecodeBaseProposer",
    attr="propose",
    expected_params=PROPOSE_PARAMS,
    make_replacement=_make_replacement,
)
