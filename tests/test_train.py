"""Trainer on a tiny random Llama target: it learns, resumes deterministically, refuses bad input."""

from __future__ import annotations

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
        seqs_per_step=4,
        lr=3e-3,
        warmup_steps=2,
        eval_every=1000,
        save_every=1000,
        progress=False,
        save_dtype="fp32",
    )
    base.update(kw)
    return TrainConfig(**base)


def test_dataset_round_trip(setup: tuple[Path, Path]) -> None:
    s = load_split(setup[1], "train")
    assert len(s) == 24 and s.sequence(3).dtype == np.int32 and len(s.sequence(3)) == 30
    assert s.num_completion_tokens == 24 * 24
    with pytest.raises(BebopError, match="no heldout data|unknown split"):
        load_split(setup[1], "test")


@pytest.mark.parametrize("loss", ["e2e-tv"])
def test_tiny_training_lowers_heldout_e2e_tv_loss(setup: tuple[Path, Path], tmp_path: Path, loss: str) -> None:
    target, data = setup
    held = load_split(data, "heldout")
    cache = HiddenCache(data, "heldout", held, target)
    cache.fill(list(range(len(held))), progress=False)
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


def test_cli_refuses_bad_input(setup: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    target, data = setup
    assert (
        main(["train", "--out", str(tmp_path / "x"), "--depth", "0", "--model", str(target), "--data", str(data)]) == 1
    )
    assert "--depth must be at least 1, got 0" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "x"), "--model", str(target), "--data", str(tmp_path / "none")]) == 1
    assert "run `bebop generate-data` first" in capsys.readouterr().err
    assert (
        main(
            ["train", "--out", str(tmp_path / "x"), "--temperature", "0.5", "--model", str(target), "--data", str(data)]
        )
        == 1
    )
    assert "no train or held-out sequences sampled at T=0.5" in capsys.readouterr().err


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
    ]
    assert main(argv) == 0
    meta = load_heads(out, target).metadata
    assert meta.heldout.num_sequences == 2 and meta.data.num_sequences == 3 and meta.train_steps == 2
