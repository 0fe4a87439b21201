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
