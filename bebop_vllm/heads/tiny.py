"""A tiny random Llama target folder (HF safetensors + tokenizer.json) for fast tests."""

from __future__ import annotations

from pathlib import Path


def make_tiny_target(
    out_dir: str | Path,
    hidden_size: int = 64,
    vocab_size: int = 128,
    num_layers: int = 2,
    seed: int = 0,
    token_prefix: str = "t",
) -> Path:
    """Write a random LlamaForCausalLM (tied embeddings, GQA 4/2 heads) with a word-level
    tokenizer of ``vocab_size`` tokens; ``token_prefix`` changes the tokenizer's vocabulary
    (and so its fingerprint) without changing shapes."""
    import torch
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden_size // 4,
        vocab_size=vocab_size,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        initializer_range=0.2,
    )
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(str(out))
    vocab = {f"{token_prefix}{i}": i for i in range(vocab_size)}
    Tokenizer(WordLevel(vocab, unk_token=f"{token_prefix}0")).save(str(out / "tokenizer.json"))
    return out


def make_tiny_qwen3_5_target(
    out_dir: str | Path, hidden_size: int = 64, vocab_size: int = 128, mtp_layers: int = 1, seed: int = 0
) -> Path:
    """Write a random dense Qwen3.5 text model (``Qwen3_5ForCausalLM``: one Gated-DeltaNet layer,
    one full-attention layer, untied lm_head) WITH random native MTP weights (``mtp.*``, as Qwen3.5
    checkpoints ship them; transformers itself does not model them) and a word-level tokenizer."""
    import torch
    from safetensors.torch import load_file, save_file
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    out = Path(out_dir)
    torch.manual_seed(seed)
    h, heads, kv, d = hidden_size, 4, 2, hidden_size // 4
    cfg = Qwen3_5TextConfig(
        hidden_size=h,
        intermediate_size=2 * h,
        num_hidden_layers=2,
        layer_types=["linear_attention", "full_attention"],
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=d,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=d,
        linear_value_head_dim=d,
        vocab_size=vocab_size,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        rms_norm_eps=1e-6,
        initializer_range=0.2,
        mtp_num_hidden_layers=mtp_layers,
    )
    model = Qwen3_5ForCausalLM(cfg)
    model.save_pretrained(str(out))
    (shard,) = sorted(out.glob("*.safetensors"))
    tensors = load_file(str(shard))
    gen = torch.Generator().manual_seed(seed + 1)
    native = {
        "mtp.fc.weight": (h, 2 * h),
        "mtp.pre_fc_norm_embedding.weight": (h,),
        "mtp.pre_fc_norm_hidden.weight": (h,),
        "mtp.norm.weight": (h,),
    }
    for i in range(mtp_layers):
        p = f"mtp.layers.{i}."
        native |= {
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (2 * heads * d, h),
            p + "self_attn.k_proj.weight": (kv * d, h),
            p + "self_attn.v_proj.weight": (kv * d, h),
            p + "self_attn.o_proj.weight": (h, heads * d),
            p + "self_attn.q_norm.weight": (d,),
            p + "self_attn.k_norm.weight": (d,),
            p + "mlp.gate_proj.weight": (2 * h, h),
            p + "mlp.up_proj.weight": (2 * h, h),
            p + "mlp.down_proj.weight": (h, 2 * h),
        }
    dtype = next(iter(tensors.values())).dtype
    for name, shape in native.items():
        tensors[name] = (torch.randn(shape, generator=gen) * 0.02).to(dtype)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    vocab = {f"t{i}": i for i in range(vocab_size)}
    Tokenizer(WordLevel(vocab, unk_token="t0")).save(str(out / "tokenizer.json"))
    return out
