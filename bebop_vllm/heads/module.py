"""The Bebop MTP head as a plain PyTorch module (Qwen3.5-MTP style, Llama-family layer).

    x = fc(cat([enorm(embed(token)), hnorm(hidden)], -1))      # embedding FIRST
    r = layer(x, positions)                                      # one Llama decoder layer
    logits = lm_head(norm(r))                                    # target's frozen lm_head

At position p the depth-1 input is (token x_{p+1}, target hidden h_p) and it predicts
x_{p+2}. Depth j > 1 is recursive: the previous depth's ``r`` (before ``norm``; or ``norm(r)``
for heads with ``HeadShape.feedback == "normed"``) replaces the target hidden state and the
drafted token feeds the embedding.

The decoder layer is written out here (not borrowed from transformers) because training needs
a custom attention pattern (``unroll``) that reproduces vLLM's draft KV cache exactly.

Two layer kinds, chosen by the target (``HeadShape.layer_kind``):

- ``llama``: a Llama decoder layer; served by our ``BebopMTPModel`` (method "bebop"), which feeds
  the pre-``norm`` residual ``r`` to the next depth.
- ``qwen3_5``: the layer of Qwen3.5's native MTP module (``mtp.*`` in its checkpoints; vLLM
  ``qwen3_5_mtp.py``): zero-centred RMSNorms (``x̂ · (1 + w)``), a gated attention (``q_proj``
  emits query and gate per head, output ``· sigmoid(gate)``), per-head q/k RMSNorms and RoPE on
  the first ``partial_rotary_factor`` of each head. Such heads replace the target's native MTP
  weights (``bebop export-mtp``) and run under vLLM's own method "mtp", whose proposer feeds the
  *normed* output ``norm(r)`` to the next depth; ``next_hidden`` follows that.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bebop_vllm.errors import BebopError

FEEDBACK_KINDS = ("residual", "normed")


@dataclass(frozen=True)
class HeadShape:
    """The target's shapes the head copies (from the target's HF ``config.json``)."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    layer_kind: str = "llama"  # or "qwen3_5" (see the module docstring)
    partial_rotary_factor: float = 1.0  # RoPE on the first head_dim * factor dims of each head
    # EAGLE-3-style target features the head reads besides h_t (vLLM aux-hidden-state ids: id i
    # is the residual stream after target layer i - 1); () for a head that reads h_t alone
    aux_layer_ids: tuple[int, ...] = ()
    # what depth j hands depth j + 1 in place of the target's hidden state: "residual" (the
    # layer's pre-norm output r, the original bebop heads) or "normed" (norm(r): the space of
    # the target's post-norm h, EAGLE-style; heads trained with a feature loss read it)
    feedback: str = "residual"

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def is_qwen3_5(self) -> bool:
        return self.layer_kind == "qwen3_5"

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> HeadShape:
        arch = (cfg.get("architectures") or ["?"])[0]
        model_type = cfg.get("model_type")
        if model_type == "qwen3_5":
            raise BebopError(
                "this is a composite Qwen3.5 (vision-language) checkpoint; bebop heads need its text model "
                "(a Qwen3_5ForCausalLM folder, model_type 'qwen3_5_text', with the mtp.* tensors)"
            )
        if model_type == "qwen3_5_text":
            if cfg.get("num_experts"):
                raise BebopError("bebop heads support dense Qwen3.5 targets; this config has MoE layers (num_experts)")
            kind, biases = "qwen3_5", cfg.get("attention_bias")
        elif model_type == "llama":
            kind, biases = "llama", cfg.get("attention_bias") or cfg.get("mlp_bias")
        else:
            raise BebopError(
                f"bebop heads support Llama-family targets (model_type 'llama') and dense Qwen3.5 "
                f"text targets (model_type 'qwen3_5_text'); this target has model_type {model_type!r} ({arch})"
            )
        if cfg.get("hidden_act", "silu") != "silu" or biases:
            raise BebopError(f"bebop heads expect a {kind} layer with silu MLP and no attention/MLP biases")
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise BebopError(f"bebop heads support the default RoPE only; the target uses rope_type {rope_type!r}")
        h, n = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        return cls(
            hidden_size=h,
            intermediate_size=int(cfg["intermediate_size"]),
            num_attention_heads=n,
            num_key_value_heads=int(cfg.get("num_key_value_heads", n)),
            head_dim=int(cfg.get("head_dim") or h // n),
            vocab_size=int(cfg["vocab_size"]),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
            layer_kind=kind,
            partial_rotary_factor=float(rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))),
        ).with_aux_layers((cfg.get("bebop") or {}).get("aux_layer_ids") or ()).with_feedback(
            (cfg.get("bebop") or {}).get("feedback") or "residual"
        )

    def with_aux_layers(self, aux_layer_ids: Sequence[int]) -> HeadShape:
        """This shape reading the target layers ``aux_layer_ids`` too (Llama heads only: Qwen3.5
        heads fill the target's native MTP slots, which have no place for them)."""
        ids = tuple(int(i) for i in aux_layer_ids)
        if ids and self.layer_kind != "llama":
            raise BebopError("multi-layer (aux) target features are supported for Llama-family heads only")
        return dataclasses.replace(self, aux_layer_ids=ids)

    def with_feedback(self, feedback: str) -> HeadShape:
        """This shape feeding ``feedback`` ("residual" or "normed") to the next depth. Qwen3.5
        heads always feed back norm(r) (vLLM's method "mtp" does), whatever their config says."""
        if feedback not in FEEDBACK_KINDS:
            raise BebopError(f"bebop.feedback must be one of {', '.join(FEEDBACK_KINDS)}, got {feedback!r}")
        return dataclasses.replace(self, feedback=feedback)

    @property
    def feeds_back_normed(self) -> bool:
        return self.is_qwen3_5 or self.feedback == "normed"


def check_aux_layer_ids(aux_layer_ids: Sequence[int], num_layers: int) -> tuple[int, ...]:
    """The aux layer ids if valid for a ``num_layers``-layer target: ascending, distinct, in
    1..num_layers - 1 (vLLM's numbering: id i = the output of layer i - 1; id num_layers, the
    last layer's output, is what serving adds to rebuild h_t)."""
    ids = list(aux_layer_ids)
    ok = all(isinstance(i, int) and not isinstance(i, bool) and 1 <= i < num_layers for i in ids)
    if not ok or ids != sorted(set(ids)):
        raise BebopError(f"aux layer ids must be ascending, distinct and in 1..{num_layers - 1} for this "
                         f"{num_layers}-layer target, got {ids}")
    return tuple(ids)


QWEN3_5_MODEL_TYPES = ("qwen3_5", "qwen3_5_text")


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, as transformers and vLLM do. Llama: ``w · x̂`` (w starts at 1);
    ``zero_centered`` (Qwen3.5): ``(1 + w) · x̂`` in fp32 (w starts at 0)."""

    def __init__(self, size: int, eps: float, zero_centered: bool = False) -> None:
        super().__init__()
        self.zero_centered = zero_centered
        self.weight = nn.Parameter(torch.zeros(size) if zero_centered else torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.zero_centered:
            return (xf * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * xf.to(x.dtype)


def make_norm(s: HeadShape, size: int | None = None) -> RMSNorm:
    return RMSNorm(size or s.hidden_size, s.rms_norm_eps, zero_centered=s.is_qwen3_5)


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Default (neox-style, rotate-half) RoPE tables for ``positions`` [..., L] -> [..., L, head_dim]."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, L, d]; cos/sin [B, L, r] with r <= d: the first r dims rotate, the rest pass."""
    r = cos.shape[-1]
    x_rot, x_pass = x[..., :r], x[..., r:]
    half = r // 2
    rotated = torch.cat([-x_rot[..., half:], x_rot[..., :half]], dim=-1)
    return torch.cat([x_rot * cos[:, None] + rotated * sin[:, None], x_pass], dim=-1)


class Attention(nn.Module):
    def __init__(self, s: HeadShape) -> None:
        super().__init__()
        self.s = s
        # Qwen3.5: q_proj emits [query | gate] per head (the checkpoint's layout)
        q_out = s.num_attention_heads * s.head_dim * (2 if s.is_qwen3_5 else 1)
        self.q_proj = nn.Linear(s.hidden_size, q_out, bias=False)
        self.k_proj = nn.Linear(s.hidden_size, s.num_key_value_heads * s.head_dim, bias=False)
        self.v_proj = nn.Linear(s.hidden_size, s.num_key_value_heads * s.head_dim, bias=False)
        self.o_proj = nn.Linear(s.num_attention_heads * s.head_dim, s.hidden_size, bias=False)
        if s.is_qwen3_5:
            self.q_norm = make_norm(s, s.head_dim)
            self.k_norm = make_norm(s, s.head_dim)

    def _query_and_gate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Query [B, L, heads, d] and (Qwen3.5) the output gate [B, L, heads * d]."""
        b, n, _ = x.shape
        s = self.s
        if not s.is_qwen3_5:
            return self.q_proj(x).view(b, n, s.num_attention_heads, s.head_dim), None
        q, gate = self.q_proj(x).view(b, n, s.num_attention_heads, 2 * s.head_dim).chunk(2, dim=-1)
        return q, gate.reshape(b, n, -1)

    def gate(self, x: torch.Tensor) -> torch.Tensor | None:
        """The output gate for layer input ``x`` (normed) [B, L, H]; None for Llama."""
        return self._query_and_gate(x)[1]

    def qkv(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated q and k, and v, each [B, num_attention_heads, L, d] (kv heads repeated for GQA)."""
        b, n, _ = x.shape
        s = self.s
        q, _ = self._query_and_gate(x)
        k = self.k_proj(x).view(b, n, s.num_key_value_heads, s.head_dim)
        if s.is_qwen3_5:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x).view(b, n, s.num_key_value_heads, s.head_dim).transpose(1, 2)
        cos, sin = rope_cos_sin(positions, s.rotary_dim, s.rope_theta, x.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        rep = s.num_attention_heads // s.num_key_value_heads
        return q, k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)


class MLP(nn.Module):
    def __init__(self, s: HeadShape) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(s.hidden_size, s.intermediate_size, bias=False)
        self.up_proj = nn.Linear(s.hidden_size, s.intermediate_size, bias=False)
        self.down_proj = nn.Linear(s.intermediate_size, s.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """One decoder layer (Llama or Qwen3.5 full-attention), split around attention so callers
    choose the attention pattern."""

    def __init__(self, s: HeadShape) -> None:
        super().__init__()
        self.input_layernorm = make_norm(s)
        self.self_attn = Attention(s)
        self.post_attention_layernorm = make_norm(s)
        self.mlp = MLP(s)

    def qkv(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.self_attn.qkv(self.input_layernorm(x), positions)

    def finish(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Residual stream after attention output ``attn`` [B, heads, L, d] and the MLP."""
        b, _, n, _ = attn.shape
        out = attn.transpose(1, 2).reshape(b, n, -1)
        gate = self.self_attn.gate(self.input_layernorm(x)) if self.self_attn.s.is_qwen3_5 else None
        if gate is not None:  # recomputed from x (cheap next to attention; keeps qkv's signature)
            out = out * torch.sigmoid(gate)
        x = x + self.self_attn.o_proj(out)
        return x + self.mlp(self.post_attention_layernorm(x))


def _shift_right(x: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """out[..., p, ...] = x[..., p - k, ...] along ``dim``, zeros for p < k."""
    if k == 0:
        return x
    n = x.shape[dim]
    pad = torch.zeros_like(x.narrow(dim, 0, min(k, n)))
    return torch.cat([pad, x.narrow(dim, 0, max(n - k, 0))], dim=dim)


class BebopMTPHead(nn.Module):
    """MTP head: parameters as stored in ``model.safetensors``; the target's embedding and
    lm_head are attached as frozen, non-persistent buffers (never saved).

    With ``shape.aux_layer_ids`` (n ids) the head also reads EAGLE-3-style features: the target's
    residual stream after n of its layers. Its depth-1 input ("target features") is then
    ``[a_1, .., a_n, h_t]`` [..., (n + 1) H], the layers in ascending order and h_t last (vLLM's
    aux-hidden-state layout, whose last block is the final layer's output); :meth:`combine` maps
    it to one H-vector: ``h_t + aux_fc(cat(aux_norms_k(a_k)))``. Each block is RMS-normed (their
    scales differ ~100x across layers); ``aux_fc`` starts at zero, so a new aux head computes
    what the plain head computes. ``target_norm`` holds the target's final-norm weight (frozen):
    serving receives the final layer's pre-norm output and rebuilds h_t with it.
    """

    def __init__(self, shape: HeadShape) -> None:
        super().__init__()
        self.shape = shape
        h = shape.hidden_size
        self.enorm = make_norm(shape)
        self.hnorm = make_norm(shape)
        self.fc = nn.Linear(2 * h, h, bias=False)
        self.layer = DecoderLayer(shape)
        self.norm = make_norm(shape)
        n = len(shape.aux_layer_ids)
        if n:
            self.aux_norms = nn.ModuleList(make_norm(shape) for _ in range(n))
            self.aux_fc = nn.Linear(n * h, h, bias=False)
            nn.init.zeros_(self.aux_fc.weight)
            self.target_norm = make_norm(shape)
            self.target_norm.weight.requires_grad_(False)  # the target's, never trained
        self.register_buffer("embed_weight", torch.empty(0), persistent=False)
        self.register_buffer("lm_head_weight", torch.empty(0), persistent=False)

    # -- target I/O ------------------------------------------------------------------------
    def attach_target(self, embed_weight: torch.Tensor, lm_head_weight: torch.Tensor) -> None:
        """Attach the target's (frozen) embedding [V, H] and lm_head [V, H] weights."""
        want = (self.shape.vocab_size, self.shape.hidden_size)
        for name, w in (("embedding", embed_weight), ("lm_head", lm_head_weight)):
            if tuple(w.shape) != want:
                raise BebopError(f"target {name} has shape {tuple(w.shape)}, the head expects {want}")
        self.embed_weight = embed_weight.detach()
        self.lm_head_weight = lm_head_weight.detach()

    def _need_target(self) -> None:
        if self.embed_weight.numel() == 0:
            raise BebopError(
                "the head has no target attached: call attach_target(...) or load_heads(..., target_model_dir=...)"
            )

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        self._need_target()
        return F.embedding(token_ids, self.embed_weight).to(self.fc.weight.dtype)

    def logits(self, residual: torch.Tensor) -> torch.Tensor:
        """Draft logits = target lm_head(norm(residual)), computed in the head's dtype."""
        self._need_target()
        x = self.norm(residual)
        return x @ self.lm_head_weight.to(x.dtype).T

    def next_hidden(self, residual: torch.Tensor) -> torch.Tensor:
        """What depth j hands depth j + 1 in place of the target's hidden state: the residual
        ``r`` (bebop's proposer, ``shape.feedback == "residual"``) or ``norm(r)`` (heads with
        ``feedback == "normed"``, and Qwen3.5 native MTP: vLLM's method "mtp" feeds back the
        model's single, normed output)."""
        return self.norm(residual) if self.shape.feeds_back_normed else residual

    @property
    def feature_width(self) -> int:
        """Width of the target features the head reads at depth 1: (1 + n aux layers) * H."""
        return (1 + len(self.shape.aux_layer_ids)) * self.shape.hidden_size

    def combine(self, features: torch.Tensor) -> torch.Tensor:
        """Target features [..., (n + 1) H] = [a_1, .., a_n, h_t] -> [..., H], what depth 1 reads
        in place of h_t (the identity for a head without aux layers)."""
        if features.shape[-1] != self.feature_width:
            raise BebopError(
                f"the head reads target features of width {self.feature_width} "
                f"({len(self.shape.aux_layer_ids)} aux layers + h_t), got {features.shape[-1]}"
            )
        h = self.shape.hidden_size
        if not self.shape.aux_layer_ids:
            return features
        blocks = features[..., :-h].unflatten(-1, (len(self.aux_norms), h)).to(self.aux_fc.weight.dtype)
        normed = torch.cat([norm(blocks[..., k, :]) for k, norm in enumerate(self.aux_norms)], dim=-1)
        return features[..., -h:].to(normed.dtype) + self.aux_fc(normed)

    def fuse(self, token_embeds: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.cat([self.enorm(token_embeds), self.hnorm(hidden.to(token_embeds.dtype))], dim=-1))

    # -- training: all chains of a sequence at once, teacher-forced ---------------------------
    def unroll(
        self, next_token_ids: torch.Tensor, target_hidden: torch.Tensor, num_depths: int, first_chain: int = 0
    ) -> list[torch.Tensor]:
        """Teacher-forced residual outputs for every chain and depth, position-indexed.

        Inputs for positions p = 0..L-1 of one batch of sequences: ``next_token_ids`` [B, L]
        = x_{p+1} and ``target_hidden`` [B, L, H] = h_p (target final hidden, post-norm), or
        for an aux head the target features [B, L, (n + 1) H] (see :meth:`combine`).
        Returns ``[r_1, .., r_g]``, each [B, L, H]: r_j[p] is depth j of the chain that starts
        at t = p - j + 1 (it predicts x_{p+2}). Only chains t >= ``first_chain`` are computed
        at depths >= 2 (e.g. the completion's chains; the prompt still serves as depth-1
        context); other entries of r_2.. are zero or meaningless.

        Attention reproduces vLLM's draft KV cache exactly: the depth-j query of chain t (at
        position p = t + j - 1) sees the depth-1 keys of positions <= t (entries computed from
        target hidden states) plus the chain's own depth-2..j keys at t+1..p; all in one softmax.
        """
        b, n = next_token_ids.shape
        s = min(max(first_chain, 0), n)
        emb = self.embed(next_token_ids)
        scale = 1.0 / math.sqrt(self.shape.head_dim)
        # depth 1: ordinary causal attention over every position
        x = self.fuse(emb, self.combine(target_hidden))
        q, k1, v1 = self.layer.qkv(x, torch.arange(n).expand(b, n))
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        probs = torch.softmax(((q @ k1.transpose(-1, -2)) * scale).masked_fill(~causal, float("-inf")).float(), -1)
        outs = [self.layer.finish(x, probs.to(q.dtype) @ v1)]
        # depths >= 2 on the window of positions p >= s (window-local index w = p - s)
        pos = torch.arange(s, n)
        keys: list[torch.Tensor] = []  # depth 2.. keys / values on the window
        values: list[torch.Tensor] = []
        window_outs: list[torch.Tensor] = []
        for j in range(2, num_depths + 1):
            # depth j at p consumes depth j-1 of the same chain, which sits at p-1
            prev = self.next_hidden(outs[0][:, max(s - 1, 0) : n - 1] if j == 2 else window_outs[-1][:, :-1])
            hidden = torch.cat([torch.zeros_like(prev[:, : (n - s) - prev.shape[1]]), prev], dim=1)
            x = self.fuse(emb[:, s:], hidden)
            q, k, v = self.layer.qkv(x, pos.expand(b, n - s))
            keys.append(k)
            values.append(v)
            shared = (q @ k1.transpose(-1, -2)) * scale  # [B, heads, n-s, n] vs depth-1 keys
            visible = torch.arange(n)[None, :] <= (pos[:, None] - (j - 1))  # keys <= t = p - j + 1
            shared = shared.masked_fill(~visible, float("-inf"))
            # chain-own keys: the depth-i entry (i = 2..j) of the same chain sits at p - (j - i)
            own_k = [_shift_right(keys[i - 2], j - i, dim=2) for i in range(2, j + 1)]
            own_v = [_shift_right(values[i - 2], j - i, dim=2) for i in range(2, j + 1)]
            own = [(q * kk).sum(-1, keepdim=True) * scale for kk in own_k]
            probs = torch.softmax(torch.cat([shared, *own], dim=-1).float(), dim=-1).to(q.dtype)
            attn = probs[..., :n] @ v1
            for i, vv in enumerate(own_v):
                attn = attn + probs[..., n + i : n + i + 1] * vv
            window_outs.append(self.layer.finish(x, attn))
        pad = outs[0].new_zeros(b, s, outs[0].shape[-1])
        return outs + [torch.cat([pad, w], dim=1) for w in window_outs]

    # -- inference: one step with an explicit KV cache (the slow reference) --------------------
    def step(
        self,
        token_ids: torch.Tensor,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        cache: dict[int, tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """Run entries at ``positions`` [n] (one sequence) and write them into ``cache``
        (position -> (k, v), overwriting, as vLLM's slot mapping does); each query attends
        to every cached entry at a position <= its own. Returns the residual outputs [n, H]."""
        x = self.fuse(self.embed(token_ids[None]), hidden[None])
        q, k, v = self.layer.qkv(x, positions[None])
        for i, p in enumerate(positions.tolist()):
            cache[p] = (k[0, :, i], v[0, :, i])
        cached = sorted(cache)
        kc = torch.stack([cache[p][0] for p in cached], dim=1)[None]  # [1, heads, P, d]
        vc = torch.stack([cache[p][1] for p in cached], dim=1)[None]
        mask = torch.tensor(cached)[None, :] <= positions[:, None]
        scores = (q @ kc.transpose(-1, -2)) / math.sqrt(self.shape.head_dim)
        probs = torch.softmax(scores.masked_fill(~mask, float("-inf")).float(), dim=-1).to(q.dtype)
        return self.layer.finish(x, probs @ vc)[0]
