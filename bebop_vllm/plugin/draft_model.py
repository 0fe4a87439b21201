"""``BebopMTPModel``: our MTP heads as a vLLM draft model, driven by vLLM's EAGLE proposer.

Checkpoint (contract with bebop_vllm.heads): ``enorm``, ``hnorm``, ``fc`` [H, 2H] on
cat([enorm(embed(x_{t+1})), hnorm(h_t)]), one Llama decoder layer under ``layer.``, and ``norm``
before the target's lm_head. Embedding and lm_head are the target's: the proposer shares them
(``has_own_embed_tokens``/``has_own_lm_head`` = False, llm_base_proposer.py:1416/1508).

The EAGLE proposer (vllm/v1/spec_decode/llm_base_proposer.py:512) calls ``forward`` with the
target's post-norm hidden states at depth 1 and with the second element we return (the layer's
residual stream, *before* ``norm``) at depths > 1; it computes logits from the first element,
which is therefore ``norm(layer_out)``. The decoder layer has its own KV cache slot (prefix
``model.layers.<num_target_layers>``) and RoPE at the target's positions.

Heads with EAGLE-3-style features (``bebop.aux_layer_ids`` in their config.json) also hold
``aux_norms.*``, ``aux_fc`` and ``target_norm``: the runner then captures the target's residual
stream after those layers and after its last layer (``eagle_aux_hidden_state_layer_ids``; the
``model_runner`` patch switches the capture on) and the ``aux_features`` patch hands it to
:meth:`BebopMTPModel.combine_hidden_states` before the proposer's first pass, which rebuilds
the head's depth-1 input exactly as ``BebopMTPHead.combine`` does in training.

vLLM registers this class twice: as ``BebopMTPModel`` (the heads' ``architectures``) and as
``EagleBebopMTPModel`` (the name vLLM's EAGLEConfig derives for method "eagle").
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch
import torch.nn as nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import ReplicatedLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import (
    ParallelLMHead,
    VocabParallelEmbedding,
)
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.llama import LlamaDecoderLayer
from vllm.model_executor.models.utils import maybe_prefix

from bebop_vllm.plugin.deferred_kv import PendingDraftKV

logger = logging.getLogger(__name__)

# Rows of the draft lm_head compared with the target's on every draft step to notice a policy
# update that loaded new values into the same Parameter (see BebopMTPModel._draft_lm_head_rows).
_PROBE_ROWS = 16

# HF names of the decoder layer's projections -> vLLM's fused parameters.
_STACKED = (
    (".qkv_proj", ".q_proj", "q"),
    (".qkv_proj", ".k_proj", "k"),
    (".qkv_proj", ".v_proj", "v"),
    (".gate_up_proj", ".gate_proj", 0),
    (".gate_up_proj", ".up_proj", 1),
)


def aux_layer_ids(config: object) -> tuple[int, ...]:
    """The aux layer ids a heads config.json declares (``bebop.aux_layer_ids``), () if none."""
    bebop = getattr(config, "bebop", None) or {}
    return tuple(int(i) for i in (bebop.get("aux_layer_ids") or ()))


def rows_matmul(rows: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x [T, H] -> x @ rows.T [T, S]`` for the draft vocabulary's lm_head ``rows [S, H]``.

    On CPU through vLLM's oneDNN GEMM with the rows packed once - what vLLM's own CPU linears use
    (``dispatch_cpu_unquantized_gemm``, vllm/model_executor/layers/utils.py, vLLM 0.32). Measured
    on a 2-core Xeon (AMX), bf16 [8192, 576], 1 / 16 / 64 tokens: 0.44 / 0.36 / 0.67 ms with
    torch's matmul, 0.24 / 0.24 / 0.34 ms packed. Elsewhere, or when oneDNN is missing or refuses
    the rows, torch's matmul.
    """
    if rows.device.type == "cpu":
        from vllm import _custom_ops as ops

        if ops._supports_onednn:
            try:
                handler = ops.create_onednn_mm(rows.t(), 32)  # packs a copy; freed with the handler
            except RuntimeError as exc:
                logger.warning("oneDNN refused the draft lm_head (%s): using torch's matmul", exc)
            else:
                return lambda x: ops.onednn_mm(handler, x, None)
    return lambda x: x @ rows.T


def _compile_head(vllm_config: VllmConfig) -> bool:
    """Compile the head where vLLM compiles the target on CPU (any mode but NONE, i.e. not
    ``enforce_eager``). Left eager on accelerators: there a compiled drafter would also capture
    CUDA graphs, a path no bebop test has run yet."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


# The shapes as vLLM's LlamaModel declares them (llama.py:337): dim 0 is the token count, one
# symbol for all three. Explicit, since this module's annotations are strings (__future__).
@support_torch_compile(
    dynamic_arg_dims={"input_ids": {0: "b"}, "positions": {0: "b"}, "hidden_states": {0: "b"}},
    enable_if=_compile_head,
)
class BebopHeadModel(nn.Module):
    """enorm/hnorm -> fc -> one decoder layer -> (norm(out), out).

    ``module(...)`` runs the forward through vLLM's ``support_torch_compile`` wrapper
    (vllm/compilation/decorators.py, vLLM 0.32.0), as vLLM's own EAGLE heads do (llama_eagle.py):
    when the engine compiles its target (the default; not with ``enforce_eager``) the head's
    forward is traced once at engine start and compiled with Inductor, which fuses the ~40 small
    ops of a one-token head pass. The forward therefore has no data- or flag-dependent Python
    branches: the KV-only pass (:meth:`write_kv_cache`) is called by :class:`BebopMTPModel`
    outside it.
    """

    def __init__(self, *, vllm_config: VllmConfig, prefix: str, layer_index: int) -> None:
        super().__init__()
        spec = vllm_config.speculative_config
        assert spec is not None and spec.draft_model_config is not None
        config = spec.draft_model_config.hf_config
        hidden, eps = config.hidden_size, config.rms_norm_eps
        # Placeholder: replaced by the target's embedding in the proposer's load_model.
        self.embed_tokens = VocabParallelEmbedding(
            config.vocab_size, hidden, prefix=maybe_prefix(prefix, "embed_tokens")
        )
        self.enorm = RMSNorm(hidden, eps=eps)
        self.hnorm = RMSNorm(hidden, eps=eps)
        self.fc = ReplicatedLinear(
            input_size=2 * hidden,
            output_size=hidden,
            bias=False,
            params_dtype=vllm_config.model_config.dtype,
            prefix=maybe_prefix(prefix, "fc"),
            return_bias=False,
        )
        # Named after the target's layers so its attention gets its own KV-cache slot.
        self.layer = LlamaDecoderLayer(vllm_config, prefix=maybe_prefix(prefix, f"layers.{layer_index}"), config=config)
        self.norm = RMSNorm(hidden, eps=eps)
        aux_ids = aux_layer_ids(config)
        if aux_ids:
            n = len(aux_ids)
            self.aux_norms = nn.ModuleList(RMSNorm(hidden, eps=eps) for _ in range(n))
            self.aux_fc = ReplicatedLinear(
                input_size=n * hidden,
                output_size=hidden,
                bias=False,
                params_dtype=vllm_config.model_config.dtype,
                prefix=maybe_prefix(prefix, "aux_fc"),
                return_bias=False,
            )
            self.target_norm = RMSNorm(hidden, eps=eps)  # the target's final norm (a copy in the heads file)

        self.feedback_normed = ((getattr(config, "bebop", None) or {}).get("feedback") or "residual") == "normed"
        # Set by the draft_kv_only patch around a proposer pass that drafts nothing (K = 0).
        self.kv_only = False

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, hidden_states: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(r), what the next depth reads): r itself, or norm(r) for heads trained with
        ``bebop.feedback = "normed"`` (``BebopMTPHead.next_hidden``). The flag is fixed per
        engine, so the compiled graph specialises on it."""
        x, residual = self.layer(positions, self.fuse_inputs(input_ids, hidden_states), None)
        out = x + residual
        normed = self.norm(out)
        return normed, (normed if self.feedback_normed else out)

    def combine_hidden_states(self, features: torch.Tensor) -> torch.Tensor:
        """The runner's captured target states [T, (n + 1) H] = [a_1, .., a_n, r_last] (the
        residual stream after each aux layer, then the last layer's pre-norm output) -> the head's
        depth-1 input [T, H]: ``target_norm(r_last) + aux_fc(cat(aux_norms_k(a_k)))``, i.e. h_t
        plus the features' projection (``BebopMTPHead.combine`` with h_t rebuilt). Eager."""
        n = len(self.aux_norms)
        h = features.shape[-1] // (n + 1)
        blocks = [features[:, k * h : (k + 1) * h].contiguous() for k in range(n)]
        normed = torch.cat([norm(b) for norm, b in zip(self.aux_norms, blocks, strict=True)], dim=-1)
        return self.target_norm(features[:, n * h :].contiguous()) + self.aux_fc(normed)

    def fuse_inputs(self, input_ids: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        """fc(cat(enorm(embed(x_{t+1})), hnorm(h_t))): the decoder layer's input."""
        embeds = self.enorm(self.embed_tokens(input_ids))
        return self.fc(torch.cat((embeds, self.hnorm(hidden_states)), dim=-1))

    def kv_only_pass(
        self, input_ids: torch.Tensor, positions: torch.Tensor, hidden_states: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The pass with ``kv_only`` set: write the KV cache, return placeholders (at K = 0 the
        proposer discards the pass's outputs). Always eager."""
        x = self.fuse_inputs(input_ids, hidden_states)
        self.write_kv_cache(positions, x)
        return x, x

    def supports_kv_only(self) -> bool:
        """Whether the layer's attention writes its KV cache in a separate op (then
        :meth:`write_kv_cache` can run that op alone; vLLM's CPU and FlashAttention backends do)."""
        attn = self.layer.self_attn.attn
        return (not attn.attn_backend.forward_includes_kv_cache_update
                and attn.kv_sharing_target_layer_name is None)

    def write_kv_cache(self, positions: torch.Tensor, x: torch.Tensor,
                       slot_mapping: torch.Tensor | None = None) -> None:
        """Write this pass's keys and values to the layer's KV cache, and compute nothing else.

        A proposer pass with K = 0 (``draft_length="auto"`` chose no drafts for the next step)
        exists only to keep the drafter's KV cache complete for the step's tokens, so drafting
        can resume later; attention, ``o_proj``, the MLP and the final norm would be thrown away.
        This runs the part of the layer the cache needs, op for op as vLLM does it, so the cache
        holds the same bits as after a full pass (tests/test_draft_kv_only.py):
        ``LlamaDecoderLayer.forward`` (input_layernorm with no residual), ``LlamaAttention.forward``
        (qkv_proj, split, rotary_emb) and ``Attention.forward`` (view to heads, then
        ``unified_kv_cache_update``), vLLM 0.32.0; fingerprinted as the draft_kv_only patch's
        targets in :mod:`bebop_vllm.plugin.upstream`.

        ``slot_mapping`` [T]: where to write, for a write outside a forward context (deferred
        K = 0 passes, :meth:`BebopMTPModel.flush_deferred_kv`); the backend's
        ``do_kv_cache_update`` then gets it directly, as ``unified_kv_cache_update`` passes the
        forward context's. None: the forward context's (a pass run by the proposer).
        """
        from vllm.model_executor.layers.attention.attention import unified_kv_cache_update

        self_attn = self.layer.self_attn
        qkv, _ = self_attn.qkv_proj(self.layer.input_layernorm(x))
        q, k, v = qkv.split([self_attn.q_size, self_attn.kv_size, self_attn.kv_size], dim=-1)
        _, k = self_attn.rotary_emb(positions, q, k)
        attn = self_attn.attn
        keys = k.view(-1, attn.num_kv_heads, attn.head_size)
        values = v.view(-1, attn.num_kv_heads, attn.head_size_v)
        if slot_mapping is None:
            unified_kv_cache_update(keys, values, attn.layer_name)
        else:
            attn.impl.do_kv_cache_update(attn, keys, values, attn.kv_cache, slot_mapping)


class BebopMTPModel(nn.Module):
    """vLLM draft model wrapping :class:`BebopHeadModel` (EAGLE proposer interface)."""

    has_own_embed_tokens = False
    has_own_lm_head = False

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        spec = vllm_config.speculative_config
        assert spec is not None and spec.draft_model_config is not None
        self.config = spec.draft_model_config.hf_config
        if getattr(self.config, "draft_vocab_size", None) is None:
            self.config.draft_vocab_size = self.config.vocab_size
        num_target_layers = vllm_config.model_config.get_num_layers(vllm_config.parallel_config)
        self.model = BebopHeadModel(
            vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"), layer_index=num_target_layers
        )
        # Placeholder: replaced by the target's lm_head in the proposer's load_model.
        self.lm_head = ParallelLMHead(
            self.config.vocab_size, self.config.hidden_size, prefix=maybe_prefix(prefix, "lm_head")
        )
        self.logits_processor = LogitsProcessor(self.config.vocab_size, scale=getattr(self.config, "logit_scale", 1.0))
        self._heads_loaded = False  # set by the first (complete) load_weights
        self._init_draft_vocab(vllm_config, spec.draft_model_config.model)
        # K = 0 passes held by the draft_kv_only patch until the drafter next reads its cache.
        self.deferred_kv = PendingDraftKV()

    def _init_draft_vocab(self, vllm_config: VllmConfig, heads_dir: str) -> None:
        """``draft_vocab_size`` (bebop_vllm.draft_vocab): logits for those token ids only."""
        from bebop_vllm.config import options_from_additional_config
        from bebop_vllm.draft_vocab import read_draft_vocab

        opts = options_from_additional_config(vllm_config.additional_config)
        size = opts.draft_vocab_size if opts is not None else None
        ids = read_draft_vocab(heads_dir, size, self.config.vocab_size) if size else []
        self.register_buffer("draft_vocab_ids", torch.tensor(ids, dtype=torch.long), persistent=False)
        self._draft_lm_head: torch.Tensor | None = None  # lm_head rows of draft_vocab_ids
        self._draft_lm_head_key: tuple | None = None  # what they were taken from (see _draft_lm_head_rows)
        self._draft_lm_head_mm: Callable[[torch.Tensor], torch.Tensor] | None = None  # x -> x @ rows.T
        self._weights_generation = 0  # bumped by invalidate_weight_caches (RolloutEngine.update_policy)
        n = len(ids)
        probe = sorted({(i * (n - 1)) // max(_PROBE_ROWS - 1, 1) for i in range(_PROBE_ROWS)}) if n else []
        self.register_buffer("_probe_rows", torch.tensor(probe, dtype=torch.long), persistent=False)

    def invalidate_weight_caches(self) -> None:
        """Forget everything derived from the target's weights (call after a policy update)."""
        self._weights_generation += 1
        self._draft_lm_head = None
        self._draft_lm_head_key = None
        self._draft_lm_head_mm = None

    def _draft_lm_head_rows(self, weight: torch.Tensor) -> torch.Tensor:
        """The lm_head rows of ``draft_vocab_ids``, cached while the lm_head is unchanged.

        vLLM's in-place reload (and TRL-style ``model.load_weights``) copies new values into the
        *same* Parameter through ``param.data``, which changes neither its identity nor its
        ``_version``. So the cache is also dropped when :meth:`invalidate_weight_caches` ran and,
        on CPU, when any of ``_PROBE_ROWS`` rows spread over the draft vocabulary differ from the
        cached copy (a gradient step through the softmax moves every lm_head row). On accelerators
        the probe would cost a host sync per draft step, so there only the explicit invalidation
        counts (``RolloutEngine.update_policy`` does it; see docs/rl.md for other loaders). A stale
        cache could only cost acceptance, never exactness: the verifier checks the q it drafted from.
        """
        # Inference tensors keep no version counter (accessing it raises).
        version = -1 if weight.is_inference() else weight._version
        key = (id(weight), weight.data_ptr(), version, self._weights_generation)
        cached = self._draft_lm_head
        if cached is not None and key == self._draft_lm_head_key:
            if weight.device.type != "cpu":
                return cached
            probe = self._probe_rows
            rows = self.draft_vocab_ids.index_select(0, probe)
            if torch.equal(weight.index_select(0, rows), cached.index_select(0, probe)):
                return cached
        cached = weight.index_select(0, self.draft_vocab_ids.to(weight.device)).contiguous()
        self._draft_lm_head, self._draft_lm_head_key = cached, key
        self._draft_lm_head_mm = rows_matmul(cached)
        return cached

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    @property
    def aux_layer_ids(self) -> tuple[int, ...]:
        """The target layers whose residual stream the heads read besides h_t (() if none)."""
        return aux_layer_ids(self.config)

    def combine_hidden_states(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[T, (n + 1) H] captured target states -> [T, H] depth-1 input (aux heads only)."""
        return self.model.combine_hidden_states(hidden_states)

    def defer_kv_write(self, input_ids: torch.Tensor, positions: torch.Tensor, target_states: torch.Tensor,
                       slot_mapping: torch.Tensor) -> None:
        """Hold a K = 0 pass's inputs instead of writing its keys and values now
        (:mod:`bebop_vllm.plugin.deferred_kv`); written once enough are held or before the next
        pass that reads the cache. Shapes: [T], [T], [T, D] (before any aux combine), [T]."""
        self.deferred_kv.add(input_ids, positions, target_states, slot_mapping)
        if self.deferred_kv.full:
            self.flush_deferred_kv()

    @torch.inference_mode()
    def flush_deferred_kv(self) -> int:
        """Write the held K = 0 passes' keys and values to the cache in one batched pass, the
        same ops a K = 0 pass runs (aux combine, :meth:`BebopHeadModel.fuse_inputs`,
        :meth:`BebopHeadModel.write_kv_cache`). Returns the rows written (0: nothing held)."""
        taken = self.deferred_kv.take()
        if taken is None:
            return 0
        input_ids, positions, target_states, slot_mapping = taken
        hidden = self.combine_hidden_states(target_states) if self.aux_layer_ids else target_states
        self.model.write_kv_cache(positions, self.model.fuse_inputs(input_ids, hidden), slot_mapping)
        return int(input_ids.shape[0])

    @torch.no_grad()
    def sync_target_norm(self, target: nn.Module) -> None:
        """Heads with aux layers rebuild h_t with a copy of the target's final-norm weight: after a
        policy update (``RolloutEngine.update_policy``) copy the new one, so the heads see the h_t
        the updated policy computes, as heads without aux layers do."""
        if self.aux_layer_ids:
            self.model.target_norm.weight.copy_(target.model.norm.weight)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        inputs_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if inputs_embeds is not None:
            raise NotImplementedError("BebopMTPModel drafts from token ids, not input embeddings")
        if self.model.kv_only:  # set by the draft_kv_only patch; a flag the compiled forward can't see
            return self.model.kv_only_pass(input_ids, positions, hidden_states)
        return self.model(input_ids, positions, hidden_states)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """Draft logits [num_tokens, vocab_size]. With a draft vocabulary, only its rows of the
        lm_head are multiplied and every other token gets -inf, so softmax, top-k/top-p and argmax
        downstream (and the draft probabilities handed to the verifier) see exactly q restricted
        to the vocabulary."""
        if self.draft_vocab_ids.numel() == 0:
            return self.logits_processor(self.lm_head, hidden_states)
        self._draft_lm_head_rows(self.lm_head.weight)  # refreshes _draft_lm_head_mm with the rows
        assert self._draft_lm_head_mm is not None
        sub = self._draft_lm_head_mm(hidden_states)
        scale = getattr(self.config, "logit_scale", 1.0)
        if scale != 1.0:
            sub = sub * scale
        logits = sub.new_full((hidden_states.shape[0], self.config.vocab_size), float("-inf"))
        return logits.index_copy_(1, self.draft_vocab_ids.to(sub.device), sub)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load the heads checkpoint (first call: every head tensor required, nothing else allowed).

        Later calls are weight syncs: some RL frameworks (SkyRL) push the whole policy into the
        drafter on every sync. The heads are frozen and the embedding / lm_head are the target's
        (shared by reference), so tensors that are not head tensors are ignored, with one log line.
        """
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        ignored: list[str] = []
        for name, tensor in weights:
            if name.startswith(("embed_tokens.", "lm_head.", "model.embed_tokens.")):
                continue  # the target's, shared by the proposer
            target = "model." + name
            shard = None
            for fused, part, shard_id in _STACKED:
                if part in target:
                    target, shard = target.replace(part, fused), shard_id
                    break
            if target not in params:
                if self._heads_loaded:
                    ignored.append(name)
                    continue
                raise ValueError(f"unexpected tensor {name!r} in the bebop heads checkpoint")
            param = params[target]
            loader = getattr(param, "weight_loader", default_weight_loader)
            if shard is None:
                loader(param, tensor)
            else:
                loader(param, tensor, shard)
            loaded.add(target)
        own = {n for n in params if not n.startswith(("model.embed_tokens.", "lm_head."))}
        if ignored:
            logger.info("bebop heads: ignored %d tensors that are not head tensors (e.g. %r): the heads are "
                        "frozen and share the target's embedding and lm_head", len(ignored), ignored[0])
        if not self._heads_loaded:
            missing = own - loaded
            if missing:
                raise ValueError(f"bebop heads checkpoint lacks tensors for {sorted(missing)}")
            self._heads_loaded = True
        self.invalidate_weight_caches()
        # Report the shared placeholders as loaded: the proposer swaps in the target's.
        return loaded | (set(params) - own)
