"""Trainer on a tiny random Llama target: it learns, resumes deterministically, refuses bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from bebop_vllm.cli import main
from bebop_vllm.errors import BebopError
from bebop_vllm.heads import load_heads, new_head
from bebop_vllm.heads.target import load_target_model
from bebop_vllm.heads.tiny import make_tiny_target
from bebop_vllm.train.dataset import SequenceSet, load_split
from bebop_vllm.train.evaluate import evaluate
from bebop_vllm.train.target_cache import HiddenCache
from bebop_vllm.train.trainer import TrainConfig, train


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Tiny target + sequences sampled from it at T=1 (train 24, held-out 6)."""
    root = tmp_path_factory.mktemp("train")
    target = make_tiny_target(root / "target", hidden_size=32, vocab_size=64)
    model = load_target_model(target)
    torch.manual_seed(0)
    data = root / "data"
    for split, n in (("train", 24), ("heldout", 6)):
        prompts = torch.randint(0, 64, (n, 6))
        out = model.generate(
            prompts, do_sample=True, temperature=1.0, top_k=0, max_new_tokens=24, min_new_tokens=24, pad_token_id=0
        )
        seqs = [row.tolist() for row in out]
        SequenceSet.from_lists(seqs, [6] * n, [1.0] * n, {"split": split, "domains": ["synthetic"]}).save(data / split)
    return target, data


def _cfg(setup: tuple[Path, Path], out: Path, **kw) -> TrainConfig:  # noqa: ANN003
    target, data = setup
    base = dict(
        model_dir=target,
        data_dir=data,
        out_dir=out,
        steps=40,
        chains_per_step=96,
        draft_vocab_size=None,
        dtype="fp32",
        lr=3e-3,
        warmup_steps=2,
        eval_every=1000,
        save_every=1000,
        progress=False,
        save_dtype="fp32",
    )
    base.update(kw)
    return TrainConfig(**base)


def _heldout_with_cache(target: Path, data: Path) -> tuple[SequenceSet, HiddenCache]:
    """The held-out split and its target pass (computed once per module's data, then read back)."""
    held = load_split(data, "heldout")
    cache = HiddenCache(data, "heldout", held, target)
    cache.fill(list(range(len(held))), progress=False)
    return held, cache


def test_dataset_round_trip(setup: tuple[Path, Path]) -> None:
    s = load_split(setup[1], "train")
    assert len(s) == 24 and s.sequence(3).dtype == np.int32 and len(s.sequence(3)) == 30
    assert s.num_completion_tokens == 24 * 24
    with pytest.raises(BebopError, match="no heldout data|unknown split"):
        load_split(setup[1], "test")


def test_interrupted_split_save_keeps_the_old_split_and_a_torn_one_is_refused(tmp_path: Path, monkeypatch) -> None:
    """generate-data rewrites a split after every chunk: a save killed halfway must not leave a mix
    of old and new arrays that loads (old bebop wrote the files in place, one after the other)."""
    old = SequenceSet.from_lists([[1, 2, 3], [4, 5]], [1, 1], [1.0, 0.7], {"n": 2})
    new = SequenceSet.from_lists([[1, 2, 3], [4, 5], [6, 7, 8, 9]], [1, 1, 2], [1.0, 0.7, 1.0], {"n": 3})
    folder = tmp_path / "train"
    old.save(folder)

    def killed_after(n: int, real):  # the process dies at the (n + 1)-th call
        calls = []

        def wrapper(*args, **kwargs):
            if len(calls) == n:
                raise KeyboardInterrupt
            calls.append(1)
            return real(*args, **kwargs)
        return wrapper

    # killed while writing (all but the renames): the old split is intact
    monkeypatch.setattr(np, "save", killed_after(2, np.save))
    with pytest.raises(KeyboardInterrupt):
        new.save(folder)
    monkeypatch.undo()
    s = load_split(tmp_path, "train")
    assert len(s) == 2 and s.sequence(1).tolist() == [4, 5] and s.meta == {"n": 2}
    # killed between the renames (microseconds in practice): the mix is refused, with a clear message
    monkeypatch.setattr(os, "replace", killed_after(2, os.replace))
    with pytest.raises(KeyboardInterrupt):
        new.save(folder)
    monkeypatch.undo()
    with pytest.raises(BebopError, match="inconsistent.*offsets"):
        load_split(tmp_path, "train")
    # the next complete save (the resumed run) repairs it and leaves no temporary file
    new.save(folder)
    s = load_split(tmp_path, "train")
    assert len(s) == 3 and s.sequence(2).tolist() == [6, 7, 8, 9] and not list(folder.glob("*.tmp"))
    # offsets that overrun the tokens are refused too
    np.save(folder / "offsets.npy", np.array([0, 3, 5, 99], dtype=np.int64))
    with pytest.raises(BebopError, match="inconsistent: offsets run"):
        load_split(tmp_path, "train")


@pytest.mark.parametrize("loss", ["e2e-tv"])
def test_tiny_training_lowers_heldout_e2e_tv_loss(setup: tuple[Path, Path], tmp_path: Path, loss: str) -> None:
    target, data = setup
    held, cache = _heldout_with_cache(target, data)
    before = evaluate(new_head(target, warm_start=True), held, cache, list(range(len(held))), 3, 1.0, progress=False)
    meta = train(_cfg(setup, tmp_path / "h", loss=loss))
    after = meta.heldout
    # e2e-TV loss = 1 - (E[accepted length] - 1) / g: lower loss <=> longer accepted length
    assert after.expected_accepted_length > before.expected_accepted_length + 0.05, (before, after)
    assert all(a > b for a, b in zip(after.alphas, before.alphas, strict=True))
    head = load_heads(tmp_path / "h", target)  # the written folder loads and validates
    assert head.metadata.loss == loss and head.metadata.heldout == after
    assert not (tmp_path / "h" / "train_state.pt").exists()


@pytest.mark.parametrize("loss", ["ce", "kl", "tv", "hybrid"])
def test_every_loss_trains_a_few_steps(setup: tuple[Path, Path], tmp_path: Path, loss: str) -> None:
    meta = train(_cfg(setup, tmp_path / loss, loss=loss, steps=3))
    assert meta.loss == loss and all(0 <= a <= 1 for a in meta.heldout.alphas)


def test_resume_is_deterministic(setup: tuple[Path, Path], tmp_path: Path) -> None:
    train(_cfg(setup, tmp_path / "a", steps=4))
    assert train(_cfg(setup, tmp_path / "b", steps=4, stop_after=2)) is None
    assert (tmp_path / "b" / "train_state.pt").exists()
    train(_cfg(setup, tmp_path / "b", steps=4, resume=True))
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


def test_end_at_step_replays_the_start_of_a_longer_schedule(setup: tuple[Path, Path], tmp_path: Path) -> None:
    # an 8-step schedule ended at step 4 (as a time budget would) = the first 4 steps of the 8-step
    # run; a 4-step schedule (its cosine decays sooner) trains differently
    def losses_of(history: list[dict]) -> list[float]:
        return [h["loss"] for h in history if "loss" in h]

    meta = train(_cfg(setup, tmp_path / "end", steps=8, end_at_step=4, warmup_steps=1))
    assert meta is not None and meta.train_steps == 4
    assert train(_cfg(setup, tmp_path / "stop", steps=8, stop_after=4, warmup_steps=1)) is None
    stopped = torch.load(tmp_path / "stop" / "train_state.pt", weights_only=False)["history"]
    train(_cfg(setup, tmp_path / "short", steps=4, warmup_steps=1))
    ended = json.loads((tmp_path / "end" / "train_log.json").read_text())["history"]
    short = json.loads((tmp_path / "short" / "train_log.json").read_text())["history"]
    assert len(losses_of(ended)) == 4 and losses_of(ended) == losses_of(stopped)
    assert losses_of(ended) != losses_of(short)


def test_cli_refuses_bad_input(setup: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    target, data = setup
    assert (
        main(["train", "--out", str(tmp_path / "x"), "--depth", "0", "--model", str(target), "--data", str(data)]) == 1
    )
    assert "--depth must be at least 1, got 0" in capsys.readouterr().err
    bad_end = ["train", "--out", str(tmp_path / "x"), "--steps", "5", "--end-at-step", "6"]
    assert main([*bad_end, "--model", str(target), "--data", str(data)]) == 1
    assert "--end-at-step must be in 1..--steps (5), got 6" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "x"), "--model", str(target), "--data", str(tmp_path / "none")]) == 1
    assert "run `bebop generate-data` first" in capsys.readouterr().err
    assert (
        main(
            ["train", "--out", str(tmp_path / "x"), "--temperature", "0.5", "--model", str(target), "--data", str(data)]
        )
        == 1
    )
    assert "no train sequences at T in (0.5,)" in capsys.readouterr().err
    base = ["train", "--out", str(tmp_path / "x"), "--model", str(target), "--data", str(data)]
    assert main([*base, "--aux-layers", "5"]) == 1  # the tiny target has 2 layers
    assert "aux layer ids must be ascending, distinct and in 1..1 for this 2-layer target, got [5]" in (
        capsys.readouterr().err
    )
    with pytest.raises(SystemExit):
        main([*base, "--aux-layers", "3,1"])
    assert "layer ids must be positive, distinct and ascending, got '3,1'" in capsys.readouterr().err


class _FakeTokenizer:
    """Just enough of a HF tokenizer for prompt selection: one token per character."""

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True) -> str:  # noqa: ANN001
        return "".join(m["content"] for m in messages)

    def __call__(self, text: str, add_special_tokens: bool = False):  # noqa: ANN204
        class _Out:
            input_ids = [ord(c) % 100 for c in text]

        return _Out()


def test_prompt_selection_interleaves_domains_and_skips_long_prompts() -> None:
    from bebop_vllm.train.generate import select_prompts

    got = select_prompts(_FakeTokenizer(), "train", ["math", "code"], 3, max_prompt_tokens=100_000)
    assert [d for d, _, _ in got] == ["math", "code"] * 3
    assert select_prompts(_FakeTokenizer(), "train", ["math"], 3, max_prompt_tokens=10) == []
    from bebop_vllm.data import load_prompts

    held = {p.id for p in load_prompts(["math", "code"], "heldout")}
    assert not held & {pid for _, pid, _ in select_prompts(_FakeTokenizer(), "train", ["math", "code"], None, 100_000)}


def test_cli_trains_and_passes_its_options(setup: tuple[Path, Path], tmp_path: Path) -> None:
    target, data = setup
    out = tmp_path / "cli"
    argv = [
        "train",
        "--loss",
        "tv",
        "--out",
        str(out),
        "--model",
        str(target),
        "--data",
        str(data),
        "--steps",
        "2",
        "--max-train-sequences",
        "3",
        "--heldout-sequences",
        "2",
        "--train-on-prompts",
        "--save-dtype",
        "fp32",
        "--draft-vocab-size",
        "40",
        "--chains-per-step",
        "50",
        "--depth-decay",
        "0.8",
    ]
    assert main(argv) == 0
    meta = load_heads(out, target).metadata
    assert meta.heldout.num_sequences == 2 and meta.data.num_sequences == 3 and meta.train_steps == 2
    assert "draft vocabulary 40 tokens" in meta.notes and "depth decay 0.8" in meta.notes
    vocab = json.loads((out / "draft_vocab.json").read_text())
    assert vocab["trained_size"] == 40 and sorted(vocab["ids"]) == list(range(64))
    assert (out / "train_log.json").is_file()


def test_target_cache_log_normaliser_and_mass(setup: tuple[Path, Path]) -> None:
    """p_v = exp(lm_head_v(h) / T - lse) sums to 1 over the full vocabulary; the per-token mass
    adds up to one unit per completion-predicting position."""
    target, data = setup
    held, cache = _heldout_with_cache(target, data)
    head = new_head(target)
    for i in range(len(held)):
        z = cache.hidden(i) @ head.lm_head_weight.T / float(held.temperatures[i])
        torch.testing.assert_close(torch.exp(z - cache.log_normaliser(i)[:, None]).sum(-1), torch.ones(len(z)))
    positions = sum(len(held.sequence(i)) - int(held.prompt_lens[i]) for i in range(len(held)))
    assert cache.mass.sum() == pytest.approx(positions, rel=1e-4)
    again = HiddenCache(data, "heldout", held, target)  # resumed from disk: nothing left to do
    assert again.done == set(range(len(held))) and np.allclose(again.mass, cache.mass)
    # put() (states computed while sampling, generate-data --engine hf) stores the same record
    for f in (again.path, again.lse_path, again.mass_path, again.state_path):
        f.unlink()
    fresh = HiddenCache(data, "heldout", held, target)
    assert not fresh.done
    for i in range(len(held)):
        fresh.put(i, cache.hidden(i))
    np.testing.assert_allclose(fresh.mass, cache.mass, rtol=1e-5)
    for i in range(len(held)):
        torch.testing.assert_close(fresh.log_normaliser(i), cache.log_normaliser(i))
    fresh.save()


def test_identity_start_reproduces_the_target_hidden_state(setup: tuple[Path, Path]) -> None:
    """At step 0 norm(r) is the target's h_t itself, so depth 1 drafts the target's own
    distribution at t (alpha > 0, no 50-nat start) and the layer/embedding paths are zero."""
    target, data = setup
    held, cache = _heldout_with_cache(target, data)
    head = new_head(target, warm_start=True)
    h = cache.hidden(0)
    tokens = torch.from_numpy(held.sequence(0).astype(np.int64))
    r = head.unroll(tokens[1:][None], h[:-1][None], 1)[0][0]
    torch.testing.assert_close(head.norm(r), h[:-1], rtol=1e-2, atol=1e-2)  # RMSNorm eps
    m = evaluate(head, held, cache, list(range(len(held))), 3, 1.0, progress=False)
    assert m.alphas[0] > 0.01, m


def test_vocab_chains_score_the_exact_target_mass_inside_the_vocabulary(setup: tuple[Path, Path]) -> None:
    from bebop_vllm.train.chains import sequence_chains, vocab_chains

    target, data = setup
    held, cache = _heldout_with_cache(target, data)
    head = new_head(target, seed=3)
    tokens = torch.from_numpy(held.sequence(1).astype(np.int64))
    plen = int(held.prompt_lens[1])
    full = sequence_chains(head, tokens, cache.hidden(1), plen, 3, 1.0)
    ids = torch.tensor(sorted(range(0, 64, 3)))
    sub = vocab_chains(head, tokens, cache.hidden(1), cache.log_normaliser(1), plen - 1, 3, 1.0, ids,
                       head.lm_head_weight[ids])
    torch.testing.assert_close(sub.target_probs, full.target_probs[..., ids], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(sub.draft_logits, full.draft_logits[..., ids], rtol=1e-4, atol=1e-5)
    assert torch.equal(sub.mask, full.mask)
    inside = torch.isin(full.target_ids, ids) & full.ce_mask
    assert torch.equal(sub.ce_mask, inside)
    assert torch.equal(ids[sub.target_ids[inside]], full.target_ids[inside])


def test_vocab_chains_head_input_changes_what_the_head_reads_not_the_target(setup: tuple[Path, Path]) -> None:
    """``head_input`` replaces the head's input only: the target's distributions stay those of
    ``hidden``, and the head's logits are those of a head fed ``head_input`` as its hidden state."""
    from bebop_vllm.train.chains import vocab_chains

    target, data = setup
    held, cache = _heldout_with_cache(target, data)
    head = new_head(target, seed=3)
    tokens = torch.from_numpy(held.sequence(2).astype(np.int64))
    h, lse, first = cache.hidden(2), cache.log_normaliser(2), int(held.prompt_lens[2]) - 1
    base = vocab_chains(head, tokens, h, lse, first, 3, 1.0)
    same = vocab_chains(head, tokens, h, lse, first, 3, 1.0, head_input=h.clone())
    torch.testing.assert_close(same.draft_logits, base.draft_logits)
    other = torch.randn_like(h)
    moved = vocab_chains(head, tokens, h, lse, first, 3, 1.0, head_input=other)
    assert torch.equal(moved.target_probs, base.target_probs)
    assert not torch.allclose(moved.draft_logits, base.draft_logits)
    outs = head.unroll(tokens[1:][None], other[:-1][None], 3, first)
    torch.testing.assert_close(moved.draft_logits[:, 0], head.logits(outs[0][0, first:]))



def test_evaluate_reads_an_aux_heads_features(setup: tuple[Path, Path], tmp_path: Path) -> None:
    """``evaluate`` on a head with aux layers: the numbers of ``evaluate_vocab`` (full vocabulary,
    every sequence at T = 1); with ``aux_fc`` zero exactly the plain head's (``add_aux_layers``
    preserves the function), with a random ``aux_fc`` other ones; a cache without the head's aux
    layers, or without them for some sequence, is refused by name instead of a width error."""
    import shutil

    from bebop_vllm.heads.checkpoint import add_aux_layers
    from bebop_vllm.train.evaluate import evaluate_vocab

    target, data = setup
    shutil.copytree(data / "heldout", tmp_path / "heldout")  # the aux files stay out of the shared data
    held = load_split(tmp_path, "heldout")
    idx = list(range(len(held)))
    cache = HiddenCache(tmp_path, "heldout", held, target, (1,))
    cache.fill(idx, progress=False)
    plain = new_head(target, seed=3)
    zero = add_aux_layers(plain, (1,), target)
    aux = add_aux_layers(plain, (1,), target)
    with torch.no_grad():
        aux.aux_fc.weight.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(0))
    m_plain = evaluate(plain, held, cache, idx, 3, 1.0, progress=False)
    assert evaluate(zero, held, cache, idx, 3, 1.0, progress=False) == m_plain
    m_aux = evaluate(aux, held, cache, idx, 3, 1.0, progress=False)
    assert max(abs(a - b) for a, b in zip(m_aux.alphas, m_plain.alphas, strict=True)) > 1e-3, (m_aux, m_plain)
    ref = evaluate_vocab(aux, held, cache, idx, 3, progress=False)
    assert m_aux.num_chains == ref.num_chains > 0
    assert m_aux.alphas == pytest.approx(ref.alphas, abs=3e-5)
    assert m_aux.expected_accepted_length == pytest.approx(ref.expected_accepted_length, abs=3e-5)
    with pytest.raises(BebopError, match=r"reads the target's aux layers \[1\].*holds none: build it as HiddenCache"):
        evaluate(aux, held, HiddenCache(tmp_path, "heldout", held, target), idx, 3, 1.0, progress=False)
    shutil.copytree(data / "heldout", tmp_path / "other" / "heldout")
    part = HiddenCache(tmp_path / "other", "heldout", held, target, (1,))
    part.fill([0], progress=False)
    with pytest.raises(BebopError, match=r"have no cached features of the aux layers \[1\]"):
        evaluate(aux, held, part, idx, 3, 1.0, progress=False)
    assert evaluate(zero, held, part, [0], 3, 1.0, progress=False) == evaluate(plain, held, part, [0], 3, 1.0,
                                                                               progress=False)


def _flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def test_make_heads_chains_its_stages() -> None:
    import argparse

    from bebop_vllm.commands.make_heads import commands

    args = argparse.Namespace(out=Path("heads/x"), data=None, model=None, recipe="v6",
                              stages="kl,kl-all,kl-more,e2e-tv,aux-tv")
    plan = dict(commands(args))
    assert list(plan) == ["kl", "kl-all", "kl-more", "e2e-tv", "aux-tv"]
    assert _flag(plan["kl"], "--init-from") is None  # the identity start
    assert _flag(plan["kl-all"], "--init-from") == _flag(plan["kl"], "--out") == "heads/x-kl"
    assert _flag(plan["kl-more"], "--init-from") == _flag(plan["kl-all"], "--out") == "heads/x-kl-all"
    assert _flag(plan["e2e-tv"], "--init-from") == _flag(plan["kl-more"], "--out") == "heads/x-kl-more"
    assert _flag(plan["aux-tv"], "--init-from") == _flag(plan["e2e-tv"], "--out") == "heads/x-e2e-tv"
    assert _flag(plan["aux-tv"], "--out") == "heads/x" and _flag(plan["aux-tv"], "--aux-layers") == "2,15,27"
    with pytest.raises(BebopError, match="unknown stage"):
        commands(argparse.Namespace(out=Path("h"), data=None, model=None, recipe="v6", stages="kl,nope"))


def test_make_heads_features_recipe() -> None:
    """The recipe of v7: one KL stage from the identity start with aux layers, normed feedback and the
    feature loss, then the e2e-TV fine-tune into OUT; the train data are the seed-7 sample."""
    import argparse

    from bebop_vllm.commands.make_heads import commands

    args = argparse.Namespace(out=Path("heads/y"), data=None, model=None, recipe="features", stages=None)
    plan = dict(commands(args))
    assert list(plan) == ["heldout", "train-data", "kl-features", "e2e-tv"]
    kl, tv = plan["kl-features"], plan["e2e-tv"]
    assert _flag(kl, "--init-from") is None and _flag(kl, "--out") == "heads/y-kl-features"
    assert (_flag(kl, "--aux-layers"), _flag(kl, "--feedback"), _flag(kl, "--feature-loss-weight")) == (
        "2,15,27", "normed", "1")  # fmt: skip
    assert _flag(tv, "--init-from") == "heads/y-kl-features" and _flag(tv, "--out") == "heads/y"
    assert _flag(tv, "--loss") == "e2e-tv" and _flag(plan["train-data"], "--seed") == "7"
    with pytest.raises(BebopError, match="recipe 'features'"):  # the v6 stage names are not this recipe's
        commands(argparse.Namespace(out=Path("h"), data=None, model=None, recipe="features", stages="kl"))


def test_make_heads_more_data_recipe_continues_the_features_heads() -> None:
    """more-data (the default, the shipped v8): the features recipe's KL heads continued on the grown
    sample; features itself stays capped at v7's sequences so that a grown folder still reproduces v7."""
    import argparse

    from bebop_vllm.cli import build_parser
    from bebop_vllm.commands.make_heads import commands

    plan = dict(commands(argparse.Namespace(out=Path("heads/m"), data=None, model=None, recipe="more-data",
                                            stages=None)))  # fmt: skip
    assert list(plan) == ["heldout", "train-data", "kl-features", "train-data-2x", "kl-2x", "e2e-tv"]
    assert build_parser().parse_args(["make-heads", "--out", "heads/y"]).recipe == "more-data"  # the shipped v8
    assert _flag(plan["kl-2x"], "--init-from") == "heads/m-kl-features"
    assert _flag(plan["e2e-tv"], "--init-from") == "heads/m-kl-2x" and _flag(plan["e2e-tv"], "--out") == "heads/m"
    assert _flag(plan["kl-2x"], "--max-train-sequences") is None  # all of the grown sample
    assert _flag(plan["train-data-2x"], "--seed") == _flag(plan["train-data"], "--seed") == "7"
    grown = [a for a in plan["train-data-2x"] if "=" in a or a.isdigit()]
    assert "math=16" in grown and "code=16" in grown
    features = dict(commands(argparse.Namespace(out=Path("heads/f"), data=None, model=None, recipe="features",
                                                stages=None)))  # fmt: skip
    assert _flag(features["kl-features"], "--max-train-sequences") == "4494"
    assert _flag(features["e2e-tv"], "--max-train-sequences") == "4494"


@pytest.mark.parametrize("recipe", ["v6", "features", "more-data"])
def test_make_heads_stages_parse(recipe: str) -> None:
    """Every stage's command line is accepted by the real ``bebop`` parser (a typo in a recipe fails
    here, not hours into a run)."""
    import argparse

    from bebop_vllm.cli import build_parser
    from bebop_vllm.commands.make_heads import commands

    parser = build_parser()
    for _, argv in commands(argparse.Namespace(out=Path("heads/z"), data=None, model=None, recipe=recipe, stages=None)):
        parsed = parser.parse_args(argv)
        assert parsed.command == argv[0]


def test_target_pass_caches_aux_features_without_recounting_the_mass(setup: tuple[Path, Path], tmp_path: Path) -> None:
    """A split cached without aux layers gains them in a second pass: the features equal a direct
    target_states pass ([aux, h] per position), the hidden states, normalisers and mass stay."""
    import shutil

    from bebop_vllm.heads.target import target_states

    target, data = setup
    shutil.copytree(data / "heldout", tmp_path / "heldout")
    held = load_split(tmp_path, "heldout")
    plain = HiddenCache(tmp_path, "heldout", held, target)
    plain.fill(list(range(len(held))), progress=False)
    mass, h0 = plain.mass.copy(), plain.hidden(0)
    aux = HiddenCache(tmp_path, "heldout", held, target, (1,))
    assert aux.done == plain.done and not aux.aux_done and aux.is_missing(0)
    aux.fill([0, 1], progress=False)
    assert aux.aux_done == {0, 1} and np.array_equal(aux.mass, mass) and torch.equal(aux.hidden(0), h0)
    again = HiddenCache(tmp_path, "heldout", held, target, (1,))  # read back from disk
    assert again.aux_done == {0, 1} and not again.is_missing(1) and again.is_missing(2)
    ids = torch.from_numpy(held.sequence(0).astype(np.int64))
    from bebop_vllm.train.target_cache import cache_dtype

    # the cache pass runs the target in cache_dtype() (bf16 where the CPU has avx512_bf16): compare
    # with a direct pass in the same dtype (an fp32 pass differs by bf16 rounding there)
    hidden, feats = target_states(load_target_model(target, cache_dtype()), ids[None], (1,))
    want = torch.cat([feats[0], hidden[0]], dim=-1).float()
    torch.testing.assert_close(again.features(0), want.half().float(), atol=0, rtol=0)
    with pytest.raises(IndexError, match="no cached aux features"):
        again.features(2)


def test_training_adds_aux_layers_to_a_head_and_saves_them(setup: tuple[Path, Path], tmp_path: Path) -> None:
    """``--init-from`` a plain head + ``aux_layer_ids``: the run starts from the same function
    (function-preserving), trains the projection and writes a servable aux head."""
    target, _ = setup
    plain = train(_cfg(setup, tmp_path / "plain", steps=4))
    assert plain is not None
    meta = train(_cfg(setup, tmp_path / "aux", steps=6, init_from=tmp_path / "plain", aux_layer_ids=(1,),
                      loss="kl"))
    assert meta is not None and "aux features of target layers [1] added" in meta.notes
    head = load_heads(tmp_path / "aux", target)
    assert head.shape.aux_layer_ids == (1,) and head.aux_fc.weight.abs().sum() > 0
    cfg = json.loads((tmp_path / "aux" / "config.json").read_text())
    assert cfg["eagle_aux_hidden_state_layer_ids"] == [1, 2]
    # the aux path in a parameter group of its own, at 10x the learning rate
    from bebop_vllm.train.trainer import param_groups

    groups = param_groups(head, _cfg(setup, tmp_path / "unused", aux_lr_scale=10.0))
    assert [g["lr_scale"] for g in groups] == [1.0, 10.0] and len(groups[1]["params"]) == 2  # aux_fc, aux_norms.0
    assert not any(p is head.target_norm.weight for g in groups for p in g["params"])
    meta = train(_cfg(setup, tmp_path / "aux10", steps=2, init_from=tmp_path / "plain", aux_layer_ids=(1,),
                      aux_lr_scale=10.0))
    assert meta is not None
    with pytest.raises(BebopError, match="--aux-lr-scale applies to heads with aux layers"):
        train(_cfg(setup, tmp_path / "x", steps=1, aux_lr_scale=10.0))
    with pytest.raises(BebopError, match=r"reads aux layers \[1\]; --aux-layers \[2\] cannot change them"):
        train(_cfg(setup, tmp_path / "aux2", steps=1, init_from=tmp_path / "aux", aux_layer_ids=(2,)))


def test_feature_loss_trains_normed_feedback_heads_and_lowers_the_feature_error(
    setup: tuple[Path, Path], tmp_path: Path
) -> None:
    """``feature_weight`` > 0 adds SmoothL1(norm(r_j), h_{t+j}); ``feedback="normed"`` switches an
    ``init_from`` head to feed norm(r) forward, and the written folder says so (the engine reads it)."""
    target, data = setup
    plain = train(_cfg(setup, tmp_path / "plain", steps=3))
    assert plain is not None and "feedback" not in json.loads((tmp_path / "plain" / "config.json").read_text())["bebop"]
    meta = train(_cfg(setup, tmp_path / "feat", steps=30, init_from=tmp_path / "plain", feature_weight=1.0,
                      feedback="normed", loss="kl"))
    assert meta is not None and "feedback residual -> normed" in meta.notes and "feature loss weight 1.0" in meta.notes
    assert json.loads((tmp_path / "feat" / "config.json").read_text())["bebop"]["feedback"] == "normed"
    head = load_heads(tmp_path / "feat", target)
    assert head.shape.feedback == "normed"
    log = json.loads((tmp_path / "feat" / "train_log.json").read_text())["history"]
    feats = [h["feature_loss"] for h in log if "feature_loss" in h]
    assert len(feats) == 30 and sum(feats[-5:]) < sum(feats[:5]), feats  # the regression learns
    # resuming keeps the switched feedback (it is part of the saved shape's config, not the state)
    again = load_heads(tmp_path / "feat", target)
    assert again.shape.feeds_back_normed


def test_vocab_chains_features_pair_each_depth_with_the_target_state_it_predicts(setup: tuple[Path, Path]) -> None:
    """Depth j of chain t is scored against softmax(lm_head(h_{t+j})): with features, the pair is
    (norm(r_j), h_{t+j}), and the draft side's lm_head projection is the draft logits."""
    from bebop_vllm.train.chains import vocab_chains

    target, data = setup
    held, cache = _heldout_with_cache(target, data)
    head = new_head(target, seed=0)
    tokens = torch.from_numpy(held.sequence(0).astype("int64"))
    hidden, lse = cache.hidden(0), cache.log_normaliser(0)
    b = vocab_chains(head, tokens, hidden, lse, 5, 3, 1.0, with_features=True)
    assert b.draft_features is not None and b.target_features is not None
    assert b.draft_features.shape == b.target_features.shape == (len(tokens) - 1 - 5, 3, hidden.shape[1])
    torch.testing.assert_close(b.draft_features @ head.lm_head_weight.T, b.draft_logits)
    for t, j in ((5, 0), (9, 2), (12, 1)):
        torch.testing.assert_close(b.target_features[t - 5, j], hidden[t + j + 1].to(b.target_features.dtype))
        # the target distribution of that depth is the one of the same hidden state
        p = torch.softmax(hidden[t + j + 1].float() @ head.lm_head_weight.float().T, -1)
        torch.testing.assert_close(b.target_probs[t - 5, j], p, atol=1e-5, rtol=1e-4)
    plain = vocab_chains(head, tokens, hidden, lse, 5, 3, 1.0)
    assert plain.draft_features is None and plain.target_features is None


class _CharTokenizer:
    """Stands in for a chat tokenizer in ``select_prompts``: one id per character (mod 64)."""

    def apply_chat_template(self, messages: list, tokenize: bool, add_generation_prompt: bool) -> str:  # noqa: ARG002
        return " ".join(str(m.get("content", "")) if isinstance(m, dict) else str(m) for m in messages)[:40]

    def __call__(self, text: str, add_special_tokens: bool = False) -> object:  # noqa: ARG002
        return type("Encoding", (), {"input_ids": [ord(c) % 64 for c in text]})()


def test_generate_split_grows_and_records_the_larger_plan(tmp_path: Path) -> None:
    """A rerun with more prompts per domain keeps the sequences it has, appends the new ones, and its
    metadata says what the split now holds (it kept the first run's limit before 2026-12-07)."""
    from bebop_vllm.train.generate import generate_split

    def grow(limit: int) -> SequenceSet:
        return generate_split(object(), _CharTokenizer(), "train", ["math"], limit, 512, 8, [1.0], 7,
                              tmp_path / "model", tmp_path, chunk=3, engine="prompts")  # fmt: skip

    small = grow(2)
    big = grow(5)
    assert (len(small), len(big)) == (2, 5)
    assert all((big.sequence(i) == small.sequence(i)).all() for i in range(2))
    assert big.meta["limit_per_domain"] == 5 and big.meta["num_sequences"] == 5
    assert [it["sample"] for it in big.meta["items"]] == [0] * 5
    # an earlier, smaller command rerun in the grown folder samples nothing and keeps the record
    again = grow(2)
    assert len(again) == 5 and again.meta["limit_per_domain"] == 5 and again.meta["num_sequences"] == 5


def test_generate_split_grows_by_samples_and_keeps_the_larger_record(tmp_path: Path) -> None:
    """More samples per prompt append sample-major; a rerun with fewer keeps the larger count."""
    from bebop_vllm.train.generate import generate_split

    def run(samples: int) -> SequenceSet:
        return generate_split(object(), _CharTokenizer(), "train", ["math"], 3, 512, 8, [1.0, 0.7], 7,
                              tmp_path / "model", tmp_path, chunk=4, engine="prompts",
                              samples_per_prompt={"math": samples})  # fmt: skip

    one, three, again = run(1), run(3), run(1)
    assert (len(one), len(three), len(again)) == (3, 9, 9)
    assert [it["sample"] for it in three.meta["items"]] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert three.meta["samples_per_prompt"] == again.meta["samples_per_prompt"] == {"math": 3}
