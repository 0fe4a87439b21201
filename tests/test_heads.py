"""Head module and checkpoint format on a tiny random Llama target (seconds, no vLLM)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from bebop_vllm.errors import BebopError
from bebop_vllm.heads import (
    draft_chain_probs,
    draft_reference,
    expected_tensor_shapes,
    init_random_heads,
    load_heads,
    new_head,
    save_heads,
)
from bebop_vllm.heads.checkpoint import widen_mlp
from bebop_vllm.heads.target import final_hidden_states, load_target_model
from bebop_vllm.heads.tiny import make_tiny_target


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_target(tmp_path_factory.mktemp("target"))


@pytest.fixture()
def heads(target: Path, tmp_path: Path) -> Path:
    return init_random_heads(target, tmp_path / "heads", num_depths=3, seed=1)


def test_checkpoint_files_follow_the_format_contract(heads: Path, target: Path) -> None:
    cfg = json.loads((heads / "config.json").read_text())
    assert cfg["architectures"] == ["BebopMTPModel"]
    assert cfg["num_hidden_layers"] == 1
    assert cfg["bebop"]["num_depths"] == 3 and cfg["bebop"]["format_version"] == 1
    assert cfg["hidden_size"] == 64 and cfg["vocab_size"] == 128
    tensors = load_file(str(heads / "model.safetensors"))
    head = load_heads(heads, target)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected_tensor_shapes(head.shape)
    assert tensors["fc.weight"].shape == (64, 128) and tensors["fc.weight"].dtype == torch.bfloat16
    assert "layer.self_attn.k_proj.weight" in tensors and "embed_tokens.weight" not in tensors
    meta = json.loads((heads / "bebop.json").read_text())
    assert meta["tokenizer_fingerprint"].startswith("sha256:") and meta["num_depths"] == 3


def test_save_load_round_trip(target: Path, tmp_path: Path) -> None:
    head = new_head(target, seed=3, warm_start=True)
    ref = init_random_heads(target, tmp_path / "ref")
    meta = load_heads(ref).metadata.model_copy(update={"loss": "e2e-tv", "train_steps": 7})
    save_heads(head, tmp_path / "rt", json.loads((target / "config.json").read_text()), meta, dtype="fp32")
    back = load_heads(tmp_path / "rt", target)
    for (name, a), (_, b) in zip(head.state_dict().items(), back.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert back.metadata.loss == "e2e-tv" and back.metadata.train_steps == 7


def test_warm_start_is_the_identity_on_the_target_hidden_state(target: Path) -> None:
    """Identity start: the layer's output projections are zero (it adds nothing yet), fc passes
    the hidden-state half through, and norm(hnorm-path) gives back h: depth 1 reproduces the
    target's logits at t for any tokens."""
    head = new_head(target, warm_start=True)
    model = load_target_model(target)
    assert not head.layer.mlp.down_proj.weight.any() and not head.layer.self_attn.o_proj.weight.any()
    assert head.layer.self_attn.k_proj.weight.any()  # the rest of the layer is random, ready to learn
    torch.testing.assert_close(head.norm.weight, model.model.norm.weight)
    ids = torch.randint(0, 128, (1, 9))
    h = final_hidden_states(model, ids)
    r = head.unroll(ids[:, 1:], h[:, :-1], 1)[0]
    torch.testing.assert_close(head.logits(r), model(input_ids=ids).logits[:, :-1], rtol=1e-3, atol=1e-3)


def test_widen_mlp_keeps_the_function_and_trains_the_new_units(heads: Path, target: Path, tmp_path: Path) -> None:
    """A widened head computes what the narrow one did (new units have zero output weights),
    yet the new units learn (their down_proj columns get gradient), and the width survives a
    save/load round trip through config.json (which is what vLLM builds the draft layer from)."""
    head = load_heads(heads, target)
    assert head.layer.mlp.down_proj.weight.abs().mean() > 1e-3  # the MLP contributes: equality is not trivial
    wide = widen_mlp(head, 3 * head.shape.intermediate_size, seed=1)
    assert wide.shape.intermediate_size == 3 * head.shape.intermediate_size
    assert wide.layer.mlp.gate_proj.weight.shape == (3 * head.shape.intermediate_size, head.shape.hidden_size)
    ids = torch.randint(0, 128, (1, 12))
    hidden = final_hidden_states(load_target_model(target), ids)
    narrow_out = head.unroll(ids[:, 1:], hidden[:, :-1], 3)
    wide_out = wide.unroll(ids[:, 1:], hidden[:, :-1], 3)
    for a, b in zip(narrow_out, wide_out, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    loss = sum(wide.logits(r).logsumexp(-1).sum() for r in wide_out)
    loss.backward()
    n = head.shape.intermediate_size
    assert wide.layer.mlp.down_proj.weight.grad[:, n:].abs().sum() > 0
    cfg = json.loads((target / "config.json").read_text())
    save_heads(wide, tmp_path / "wide", cfg, head.metadata, dtype="fp32")
    assert json.loads((tmp_path / "wide" / "config.json").read_text())["intermediate_size"] == 3 * n
    back = load_heads(tmp_path / "wide", target)
    assert back.shape.intermediate_size == 3 * n
    torch.testing.assert_close(back.layer.mlp.up_proj.weight, wide.layer.mlp.up_proj.weight)


def test_widen_mlp_refuses_to_narrow_and_new_heads_start_wide_as_identity(heads: Path, target: Path) -> None:
    head = load_heads(heads, target)
    with pytest.raises(BebopError, match="can only be widened"):
        widen_mlp(head, head.shape.intermediate_size - 1)
    wide = new_head(target, warm_start=True, intermediate_size=4 * head.shape.intermediate_size)
    assert wide.layer.mlp.up_proj.weight.shape[0] == 4 * head.shape.intermediate_size
    assert not wide.layer.mlp.down_proj.weight.any()  # still the identity start


def test_hidden_state_is_post_final_norm(target: Path) -> None:
    """lm_head(h) reproduces the target's logits only if h is taken AFTER the final norm."""
    model = load_target_model(target)
    ids = torch.randint(0, 128, (1, 9))
    h = final_hidden_states(model, ids)
    torch.testing.assert_close(h @ model.lm_head.weight.T, model(input_ids=ids).logits)


def test_unroll_matches_sequential_drafting_exactly(heads: Path, target: Path) -> None:
    """The trainer's teacher-forced attention = vLLM-style sequential drafting with a KV cache."""
    head = load_heads(heads, target)
    model = load_target_model(target)
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (14,))
    hidden = final_hidden_states(model, ids[None])[0]
    for first_chain in (0, 4):  # 4: depths >= 2 computed only for chains t >= 4 (the trainer's window)
        outs = head.unroll(ids[1:][None], hidden[:-1][None], 3, first_chain=first_chain)
        for t in (first_chain, 6, 10):
            q = draft_chain_probs(head, hidden, ids[: t + 2].tolist(), ids[t + 2 : t + 4].tolist())
            for j in range(3):
                qu = torch.softmax(head.logits(outs[j][0, t + j]), -1)
                torch.testing.assert_close(qu, q[j], atol=1e-6, rtol=1e-5)


def test_normed_feedback_heads_round_trip_and_feed_norm_r_forward(heads: Path, target: Path, tmp_path: Path) -> None:
    """``feedback = "normed"``: depth j + 1 reads norm(r_j). Saved as ``bebop.feedback`` (absent
    for residual heads, so older folders keep their meaning), and the trainer's unroll still equals
    sequential drafting. With a non-uniform final norm the two feedbacks draft differently at
    depths >= 2 and identically at depth 1."""
    head = load_heads(heads, target)
    with torch.no_grad():
        head.norm.weight.copy_(torch.rand(head.norm.weight.shape, generator=torch.Generator().manual_seed(0)) * 2)
    normed = load_heads(heads, target)
    normed.load_state_dict(head.state_dict())
    normed.shape = normed.shape.with_feedback("normed")
    assert not head.shape.feeds_back_normed and normed.shape.feeds_back_normed
    config = json.loads((target / "config.json").read_text())
    save_heads(normed, tmp_path / "normed", config, head.metadata, dtype="fp32")
    assert json.loads((tmp_path / "normed" / "config.json").read_text())["bebop"]["feedback"] == "normed"
    back = load_heads(tmp_path / "normed", target)
    assert back.shape.feedback == "normed"
    save_heads(head, tmp_path / "residual", config, head.metadata, dtype="fp32")
    assert "feedback" not in json.loads((tmp_path / "residual" / "config.json").read_text())["bebop"]
    model = load_target_model(target)
    ids = torch.randint(0, 128, (12,), generator=torch.Generator().manual_seed(1))
    hidden = final_hidden_states(model, ids[None])[0]
    outs = back.unroll(ids[1:][None], hidden[:-1][None], 3, first_chain=2)
    t = 5
    q_normed = draft_chain_probs(back, hidden, ids[: t + 2].tolist(), ids[t + 2 : t + 4].tolist())
    q_residual = draft_chain_probs(head, hidden, ids[: t + 2].tolist(), ids[t + 2 : t + 4].tolist())
    for j in range(3):
        torch.testing.assert_close(torch.softmax(back.logits(outs[j][0, t + j]), -1), q_normed[j], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(q_normed[0], q_residual[0])
    assert 0.5 * (q_normed[1:] - q_residual[1:]).abs().sum(-1).min() > 1e-3
    with pytest.raises(BebopError, match="bebop.feedback must be one of residual, normed"):
        head.shape.with_feedback("post-norm")


def test_draft_reference_rows_are_distributions(heads: Path, target: Path) -> None:
    rows = draft_reference(target, heads, [5, 6, 7, 8], [9, 10], temperature=0.7)
    assert rows.shape == (3, 128)
    torch.testing.assert_close(rows.sum(-1), torch.ones(3))


def _other_target(tmp_path: Path, **kw) -> Path:  # noqa: ANN003
    return make_tiny_target(tmp_path / "other", **kw)


@pytest.mark.parametrize(
    "kw,what,values",
    [
        ({"hidden_size": 32}, "hidden size", ("64", "32")),
        ({"vocab_size": 96}, "vocab size", ("128", "96")),
        ({"token_prefix": "w"}, "tokenizer fingerprint", ("sha256:",)),
    ],
)
def test_refuses_heads_for_another_model(heads: Path, tmp_path: Path, kw: dict, what: str, values: tuple) -> None:
    other = _other_target(tmp_path, **kw)
    with pytest.raises(BebopError, match=what) as e:
        load_heads(heads, other)
    assert all(v in str(e.value) for v in values)


def _rewrite(heads: Path, fn) -> None:  # noqa: ANN001
    t = load_file(str(heads / "model.safetensors"))
    fn(t)
    save_file(t, str(heads / "model.safetensors"))


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda t: t.pop("layer.mlp.up_proj.weight"), "missing tensor.*layer.mlp.up_proj.weight"),
        (lambda t: t.update({"extra.bias": torch.zeros(3)}), "unexpected tensor.*extra.bias"),
        (
            lambda t: t.update({"fc.weight": torch.zeros(64, 64)}),
            r"fc.weight has shape \(64, 64\), expected \(64, 128\)",
        ),
        (lambda t: t["norm.weight"].__setitem__(3, float("nan")), "norm.weight has non-finite"),
    ],
)
def test_refuses_bad_tensors_by_name(heads: Path, target: Path, edit, message: str) -> None:  # noqa: ANN001
    _rewrite(heads, edit)
    with pytest.raises(BebopError, match=message):
        load_heads(heads, target)


def test_refuses_missing_files_and_bad_metadata(heads: Path, tmp_path: Path) -> None:
    with pytest.raises(BebopError, match="does not exist"):
        load_heads(tmp_path / "nope")
    broken = tmp_path / "broken"
    shutil.copytree(heads, broken)
    (broken / "bebop.json").unlink()
    with pytest.raises(BebopError, match="bebop.json"):
        load_heads(broken)
    (broken / "bebop.json").write_text('{"format_version": 1}')
    with pytest.raises(BebopError, match="not valid head metadata"):
        load_heads(broken)


# -- heads with EAGLE-3-style aux features ------------------------------------------------------


@pytest.fixture(scope="module")
def target4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-layer tiny target: aux layer ids 1..3 are valid, 4 is its last layer."""
    return make_tiny_target(tmp_path_factory.mktemp("target4"), num_layers=4)


def _features(target: Path, ids: torch.Tensor, aux_ids: tuple[int, ...]) -> torch.Tensor:
    """[L, (n + 1) H] = [aux features, h]: what an aux head reads (BebopMTPHead.combine's layout)."""
    from bebop_vllm.heads.target import head_features, target_states

    hidden, aux = target_states(load_target_model(target), ids[None], aux_ids)
    return head_features(hidden, aux)[0]


def test_aux_heads_follow_the_format_and_round_trip(target4: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file as load

    head = new_head(target4, seed=2, warm_start=True, aux_layer_ids=(1, 3))
    with torch.no_grad():
        head.aux_fc.weight.normal_(0, 0.05)
    meta = load_heads(init_random_heads(target4, tmp_path / "ref")).metadata
    save_heads(head, tmp_path / "aux", json.loads((target4 / "config.json").read_text()), meta, dtype="fp32")
    cfg = json.loads((tmp_path / "aux" / "config.json").read_text())
    assert cfg["bebop"]["aux_layer_ids"] == [1, 3]
    assert cfg["eagle_aux_hidden_state_layer_ids"] == [1, 3, 4]  # + the last layer: serving rebuilds h_t from it
    tensors = load(str(tmp_path / "aux" / "model.safetensors"))
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected_tensor_shapes(head.shape)
    assert tensors["aux_fc.weight"].shape == (64, 128) and "aux_norms.1.weight" in tensors
    norm = load_file(str(next(target4.glob("*.safetensors"))))["model.norm.weight"]
    torch.testing.assert_close(tensors["target_norm.weight"], norm.float())
    back = load_heads(tmp_path / "aux", target4)
    assert back.shape.aux_layer_ids == (1, 3) and not back.target_norm.weight.requires_grad
    for name, value in head.state_dict().items():
        assert torch.equal(value, back.state_dict()[name]), name


def test_aux_heads_start_as_the_plain_head(target4: Path) -> None:
    """A new aux head and a plain head given aux layers compute the plain head's function (zero
    aux_fc, whatever the features' scale); the projection gets gradient."""
    from bebop_vllm.heads.checkpoint import add_aux_layers

    torch.manual_seed(0)
    ids = torch.randint(0, 128, (12,))
    h = final_hidden_states(load_target_model(target4), ids[None])[0]
    feats = torch.cat([torch.randn(12, 64) * 100.0, torch.randn(12, 64) * 0.01, h], dim=-1)
    plain = new_head(target4, seed=1, warm_start=True)
    with torch.no_grad():  # a "trained" plain head: the identity start's zero paths filled in
        plain.layer.mlp.down_proj.weight.normal_(0, 0.02)
        plain.fc.weight.normal_(0, 0.05)
    want = plain.unroll(ids[1:][None], h[:-1][None], 3)
    added = add_aux_layers(plain, (1, 3), target4)
    fresh = new_head(target4, seed=1, warm_start=True, aux_layer_ids=(1, 3))
    fresh.load_state_dict(added.state_dict())
    for head in (added, fresh):
        got = head.unroll(ids[1:][None], feats[:-1][None], 3)
        for w, g in zip(want, got, strict=True):
            assert torch.equal(w, g)
    added.unroll(ids[1:][None], feats[:-1][None], 3)[0].sum().backward()
    assert added.aux_fc.weight.grad is not None and added.aux_fc.weight.grad.abs().sum() > 0
    with pytest.raises(BebopError, match="already reads aux layers"):
        add_aux_layers(added, (2,), target4)


def test_aux_head_unroll_matches_sequential_drafting_and_the_reference(target4: Path, tmp_path: Path) -> None:
    """With a non-zero projection: the trainer's unroll on [aux features, h] = sequential drafting
    = draft_reference (which runs the target itself and must pick the same layers)."""
    head = new_head(target4, seed=4, warm_start=True, aux_layer_ids=(1, 3))
    with torch.no_grad():
        head.aux_fc.weight.normal_(0, 0.2)
        head.layer.mlp.down_proj.weight.normal_(0, 0.02)
    meta = load_heads(init_random_heads(target4, tmp_path / "ref")).metadata
    save_heads(head, tmp_path / "aux", json.loads((target4 / "config.json").read_text()), meta, dtype="fp32")
    head = load_heads(tmp_path / "aux", target4)
    torch.manual_seed(1)
    ids = torch.randint(0, 128, (14,))
    feats = _features(target4, ids, (1, 3))
    plain_feats = torch.cat([feats[:, :64], feats[:, 64:128] * 0, feats[:, -64:]], dim=-1)  # layer 3 zeroed
    outs = head.unroll(ids[1:][None], feats[:-1][None], 3)
    for t in (0, 6, 10):
        q = draft_chain_probs(head, feats, ids[: t + 2].tolist(), ids[t + 2 : t + 4].tolist())
        for j in range(3):
            torch.testing.assert_close(torch.softmax(head.logits(outs[j][0, t + j]), -1), q[j], atol=1e-6, rtol=1e-5)
        ref = draft_reference(target4, tmp_path / "aux", ids[: t + 2].tolist(), ids[t + 2 : t + 4].tolist())
        torch.testing.assert_close(ref, q, atol=1e-6, rtol=1e-5)
        # negative control: the features matter (another layer's block zeroed changes the drafts)
        other = draft_chain_probs(head, plain_feats, ids[: t + 2].tolist(), ids[t + 2 : t + 4].tolist())
        assert 0.5 * (other - q).abs().sum(-1).max() > 1e-3


@pytest.mark.parametrize("ids", [(0,), (4,), (3, 1), (2, 2)])
def test_aux_layer_ids_are_checked(target4: Path, ids: tuple[int, ...]) -> None:
    with pytest.raises(BebopError, match=r"aux layer ids must be ascending, distinct and in 1\.\.3"):
        new_head(target4, aux_layer_ids=ids)


def test_aux_heads_refuse_features_of_the_wrong_width(target4: Path) -> None:
    head = new_head(target4, aux_layer_ids=(1, 3))
    with pytest.raises(BebopError, match=r"target features of width 192 \(2 aux layers \+ h_t\), got 64"):
        head.combine(torch.zeros(2, 64))


def test_serving_refuses_aux_heads_whose_capture_list_is_wrong(target4: Path, tmp_path: Path) -> None:
    from types import SimpleNamespace

    from bebop_vllm.config import BebopSpecError, validate_heads_dir

    head = new_head(target4, aux_layer_ids=(1, 3))
    meta = load_heads(init_random_heads(target4, tmp_path / "ref")).metadata
    out = save_heads(head, tmp_path / "aux", json.loads((target4 / "config.json").read_text()), meta)
    tcfg = SimpleNamespace(**json.loads((target4 / "config.json").read_text()))
    assert validate_heads_dir(out, tcfg, str(target4)) == meta.num_depths
    cfg = json.loads((out / "config.json").read_text())
    cfg["eagle_aux_hidden_state_layer_ids"] = [1, 3]
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BebopSpecError, match=r"eagle_aux_hidden_state_layer_ids is \[1, 3\], expected \[1, 3, 4\]"):
        validate_heads_dir(out, tcfg, str(target4))


def test_serving_refuses_an_unknown_feedback(target: Path, tmp_path: Path) -> None:
    from types import SimpleNamespace

    from bebop_vllm.config import BebopSpecError, validate_heads_dir

    out = init_random_heads(target, tmp_path / "heads")
    tcfg = SimpleNamespace(**json.loads((target / "config.json").read_text()))
    cfg = json.loads((out / "config.json").read_text())
    cfg["bebop"]["feedback"] = "normed"
    (out / "config.json").write_text(json.dumps(cfg))
    assert validate_heads_dir(out, tcfg, str(target)) == 3
    cfg["bebop"]["feedback"] = "post-norm"
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BebopSpecError, match=r"bebop.feedback is 'post-norm', expected one of residual, normed"):
        validate_heads_dir(out, tcfg, str(target))
    with pytest.raises(BebopError, match="bebop.feedback must be one of"):
        load_heads(out, target)
