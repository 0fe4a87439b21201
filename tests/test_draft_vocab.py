"""The draft vocabulary (``bebop draft-vocab``, engine option ``draft_vocab_size``): ranking,
file contract and errors, on a tiny dataset (no vLLM; the engine side is in test_exactness)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bebop_vllm.draft_vocab import (
    DRAFT_VOCAB_FILE,
    coverage,
    ranked_ids,
    read_draft_vocab,
    token_counts,
    write_draft_vocab,
)
from bebop_vllm.errors import BebopError
from bebop_vllm.train.dataset import SequenceSet


def _seqs() -> SequenceSet:
    # prompts: 2 tokens each; completions: 7 x3, 5 x2, 9 x2, 3 x1; prompt-only tokens 1, 2
    return SequenceSet.from_lists([[1, 2, 7, 7, 5], [2, 1, 9, 7, 3], [1, 1, 5, 9]], [2, 2, 2], [1.0, 1.0, 1.0],
                                  {"split": "train", "domains": ["synthetic"]})


def test_ranking_counts_continuations_first_then_prompts_then_ids() -> None:
    completion, prompt = token_counts(_seqs(), 16)
    assert completion[[7, 5, 9, 3, 1, 2]].tolist() == [3, 2, 2, 1, 0, 0]
    assert prompt[[1, 2]].tolist() == [4, 2]
    assert ranked_ids(completion, prompt).tolist() == [7, 5, 9, 3, 1, 2]  # 5 before 9: smaller id
    assert coverage(np.array([7, 5]), completion) == pytest.approx(5 / 8)


def test_file_round_trip_and_errors(tmp_path: Path) -> None:
    completion, prompt = token_counts(_seqs(), 16)
    with pytest.raises(BebopError, match="needs .*draft_vocab.json: write it with `bebop draft-vocab"):
        read_draft_vocab(tmp_path, 3, 16)
    path = write_draft_vocab(tmp_path, completion, prompt, {"data": "test"})
    payload = json.loads(path.read_text())
    assert payload["ids"] == [7, 5, 9, 3, 1, 2] and payload["completion_counts"] == [3, 2, 2, 1, 0, 0]
    assert read_draft_vocab(tmp_path, 3, 16) == [5, 7, 9]  # ascending for index_copy
    with pytest.raises(BebopError, match=r"ranks 6 tokens .* choose 1\.\.6"):
        read_draft_vocab(tmp_path, 7, 16)
    with pytest.raises(BebopError, match="vocabulary of 16 tokens; the target has 32"):
        read_draft_vocab(tmp_path, 3, 32)
    (tmp_path / DRAFT_VOCAB_FILE).write_text("{broken")
    with pytest.raises(BebopError, match="not a valid draft vocabulary"):
        read_draft_vocab(tmp_path, 3, 16)
    with pytest.raises(BebopError, match="empty data"):
        write_draft_vocab(tmp_path, np.zeros(16, dtype=np.int64), np.zeros(16, dtype=np.int64), {})


def test_cli_writes_the_vocabulary_and_reports_coverage(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from bebop_vllm.cli import main
    from bebop_vllm.heads import init_random_heads
    from bebop_vllm.heads.tiny import make_tiny_target

    target = make_tiny_target(tmp_path / "target")
    heads = init_random_heads(target, tmp_path / "heads")
    for split in ("train", "heldout"):
        _seqs().save(tmp_path / "data" / split)
    assert main(["draft-vocab", "--heads", str(heads), "--data", str(tmp_path / "data")]) == 0
    out = capsys.readouterr().out
    assert "6 distinct tokens (4 in the 8 completion tokens)" in out
    assert "draft_vocab_size=     6: 100.0% of train completion tokens, 100.0% of held-out" in out
    assert read_draft_vocab(heads, 2, 128) == [5, 7]
    assert main(["draft-vocab", "--heads", str(tmp_path / "nope"), "--data", str(tmp_path / "data")]) == 1


def test_probability_ranked_vocabulary_records_its_trained_size(tmp_path: Path) -> None:
    from bebop_vllm.draft_vocab import trained_draft_vocab_size, write_probability_ranked_vocab
    from bebop_vllm.train.evaluate import ranked_vocab

    mass = np.array([0.5, 3.0, 0.0, 2.0, 1.0])
    ranking = ranked_vocab(mass)
    assert ranking.tolist() == [1, 3, 4, 0, 2]  # most mass first, ties by id
    assert trained_draft_vocab_size(tmp_path) is None  # no file: the full vocabulary
    write_probability_ranked_vocab(tmp_path, ranking, mass, trained_size=3, source={"test": True})
    assert trained_draft_vocab_size(tmp_path) == 3
    assert read_draft_vocab(tmp_path, 3, 5) == [1, 3, 4]
    write_probability_ranked_vocab(tmp_path, ranking, mass, trained_size=None, source={"test": True})
    assert trained_draft_vocab_size(tmp_path) is None


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("tokens", [1, 5, 64])
def test_draft_lm_head_product_matches_torch(dtype: str, tokens: int) -> None:
    """The drafter multiplies by its draft-vocabulary lm_head rows through vLLM's packed oneDNN
    GEMM on CPU (plugin.draft_model.rows_matmul): the same product as torch's ``x @ rows.T``."""
    import torch

    from bebop_vllm.plugin.draft_model import rows_matmul

    gen = torch.Generator().manual_seed(tokens)
    rows = torch.randn(8192, 576, generator=gen).to(getattr(torch, dtype))
    x = torch.randn(tokens, 576, generator=gen).to(rows.dtype)
    got = rows_matmul(rows)(x)
    assert got.shape == (tokens, 8192) and got.dtype == rows.dtype
    tol = {"bfloat16": 2e-2, "float32": 1e-4}[dtype]
    torch.testing.assert_close(got.float(), (x @ rows.T).float(), rtol=tol, atol=tol * 10)
