"""Worker-side half of :class:`~bebop_vllm.rl.RolloutEngine`: a vLLM ``worker_extension_cls``.

vLLM mixes this class into every worker (``WorkerWrapperBase.init_worker``), so ``LLM.collective_rpc``
can call its methods by name. Arguments and results are plain strings, lists and numbers: across the
engine-core process boundary vLLM encodes RPC arguments with msgspec without types (tensors would not
arrive as tensors; ``vllm/v1/serial_utils.py``), so weights travel as safetensors files.

The policy is loaded with vLLM's own in-place reload (``Worker.reload_weights`` ->
``GPUModelRunner.reload_weights`` -> ``model_loader/reload``), which writes into the same Parameter
objects the drafter shares by reference (embedding, lm_head). The heads' own parameters are never
touched; their fingerprint is taken before and after so the frontend can prove it.
"""

from __future__ import annotations

import time
from typing import Any

import torch

# Parameters of the draft model that belong to the target (shared by reference, or for heads with
# aux layers the copy of its final norm, synced on every policy load): not the heads.
_SHARED_PREFIXES = ("model.embed_tokens.", "lm_head.", "model.target_norm.")


def draft_head_parameters(draft: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The heads' own tensors (parameters minus the target's shared embedding / lm_head)."""
    return [(n, p) for n, p in draft.named_parameters() if not n.startswith(_SHARED_PREFIXES)]


class BebopRLWorkerExtension:
    """Methods callable with ``llm.collective_rpc("bebop_...")`` (names prefixed: vLLM refuses clashes)."""

    def bebop_heads_fingerprint(self) -> str | None:
        from bebop_vllm.rl.weights import fingerprint

        draft = self.get_draft_model()  # type: ignore[attr-defined]
        return None if draft is None else fingerprint(draft_head_parameters(draft))

    def bebop_policy_fingerprint(self) -> str:
        from bebop_vllm.rl.weights import fingerprint

        return fingerprint(self.model_runner.get_model().named_parameters())  # type: ignore[attr-defined]

    def bebop_invalidate_draft_caches(self) -> bool:
        draft = self.get_draft_model()  # type: ignore[attr-defined]
        invalidate = getattr(draft, "invalidate_weight_caches", None)
        if invalidate is not None:
            invalidate()
        return invalidate is not None

    def bebop_load_policy(self, files: list[str], names: list[str] | None = None) -> dict[str, Any]:
        """Reload the target's weights in place from safetensors ``files`` (already validated).

        ``names``: the tensors to load (default: all; a tied ``lm_head.weight`` is left out by the
        frontend). Returns the heads' fingerprint before/after and the load time.
        """
        from vllm.model_executor.model_loader.weight_utils import safetensors_weights_iterator

        before = self.bebop_heads_fingerprint()
        draft = self.get_draft_model()  # type: ignore[attr-defined]
        if draft is not None and hasattr(draft, "flush_deferred_kv"):
            draft.flush_deferred_kv()  # held K = 0 writes use the weights their passes saw
        keep = None if names is None else set(names)
        t0 = time.perf_counter()
        weights = safetensors_weights_iterator(files, False)
        if keep is not None:
            weights = ((n, t) for n, t in weights if n in keep)
        self.reload_weights(weights_iterator=weights, is_checkpoint_format=True)  # type: ignore[attr-defined]
        refresh_cpu_gemm_handles(self.model_runner.get_model())  # type: ignore[attr-defined]
        if draft is not None and hasattr(draft, "sync_target_norm"):
            draft.sync_target_norm(self.model_runner.get_model())  # type: ignore[attr-defined]
        self.bebop_invalidate_draft_caches()
        seconds = time.perf_counter() - t0
        return {"heads_before": before, "heads_after": self.bebop_heads_fingerprint(), "seconds": seconds}


def refresh_cpu_gemm_handles(model: Any) -> int:
    """Rebuild the packed CPU GEMM handles of the vocabulary layers after an in-place reload.

    vLLM 0.32 on CPU (``vllm/model_executor/layers/vocab_parallel_embedding.py:67``
    ``UnquantizedEmbeddingMethod.process_weights_after_loading`` ->
    ``layers/utils.py:470 dispatch_cpu_unquantized_gemm``) packs the embedding / lm_head weight
    into a oneDNN handle at load time and computes the logits with that handle. The in-place
    reload (``model_loader/reload``) writes the new weight into the Parameter but leaves that
    handle alone, so the lm_head kept scoring with the old policy's weights: after an update
    the engine sampled from neither policy. The handle is rebuilt here from the current weight
    with vLLM's own dispatch (the same call as at load). No-op off CPU. Returns the layers redone.
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return 0
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    done = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, VocabParallelEmbedding) and hasattr(module, "cpu_linear") and weight is not None \
                and weight.ndim == 2 and weight.numel():
            dispatch_cpu_unquantized_gemm(module, remove_weight=False)
            done += 1
    return done
