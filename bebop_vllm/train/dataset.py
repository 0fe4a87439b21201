"""Self-distillation data on disk: target-sampled token sequences with their provenance.

A dataset folder holds one sub-folder per split (``train``, ``heldout``), each with
``tokens.npy`` (int32, all sequences concatenated), ``offsets.npy`` (int64, [N + 1]),
``prompt_lens.npy`` (int32, [N]), ``temperatures.npy`` (float32, [N]) and ``meta.json``
(prompt ids, domains, model, sampling settings). Target hidden states are cached next to them
by the trainer (``hidden-<model fingerprint>.npy``, fp16), never committed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bebop_vllm.errors import BebopError
from bebop_vllm.paths import bebop_home

SPLITS = ("train", "heldout")


def default_data_dir() -> Path:
    return bebop_home() / "data" / "smollm2-135m-selfdistill"


@dataclass
class SequenceSet:
    """Token sequences of one split: sequence i is tokens[offsets[i]:offsets[i+1]], whose
    first prompt_lens[i] tokens are the prompt and the rest the target's sampled continuation."""

    tokens: np.ndarray
    offsets: np.ndarray
    prompt_lens: np.ndarray
    temperatures: np.ndarray
    meta: dict[str, Any]

    def __len__(self) -> int:
        return len(self.prompt_lens)

    def sequence(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    @property
    def num_completion_tokens(self) -> int:
        return int((np.diff(self.offsets) - self.prompt_lens).sum())

    @property
    def num_prompt_tokens(self) -> int:
        return int(self.prompt_lens.sum())

    def save(self, folder: Path) -> None:
        """Write the split; every file goes to a temporary name first and is renamed into place
        once all are written, so a save interrupted while writing (``bebop generate-data``
        rewrites the split after every chunk) leaves the previous split intact. One stopped within
        the final renames (microseconds) can leave a mix of old and new arrays, which
        :func:`load_split` refuses (:meth:`check`)."""
        folder.mkdir(parents=True, exist_ok=True)
        arrays = {"tokens.npy": self.tokens.astype(np.int32), "offsets.npy": self.offsets.astype(np.int64),
                  "prompt_lens.npy": self.prompt_lens.astype(np.int32),
                  "temperatures.npy": self.temperatures.astype(np.float32)}
        for name, array in arrays.items():
            with open(folder / f"{name}.tmp", "wb") as f:
                np.save(f, array)
        (folder / "meta.json.tmp").write_text(json.dumps(self.meta, indent=1) + "\n")
        for name in [*arrays, "meta.json"]:
            os.replace(folder / f"{name}.tmp", folder / name)

    def check(self, where: str | Path) -> None:
        """Raise BebopError unless the arrays describe the same sequences (``where``: for the message)."""
        n = len(self.prompt_lens)
        problems = []
        if len(self.offsets) != n + 1 or len(self.temperatures) != n:
            problems.append(f"{len(self.offsets)} offsets and {len(self.temperatures)} temperatures for {n} "
                            f"prompt lengths (expected {n + 1} and {n})")
        elif self.offsets[0] != 0 or self.offsets[-1] != len(self.tokens) or (np.diff(self.offsets) < 0).any():
            problems.append(f"offsets run from {self.offsets[0]} to {self.offsets[-1]} over {len(self.tokens)} "
                            "tokens (expected 0 to the token count, non-decreasing)")
        elif (np.diff(self.offsets) < self.prompt_lens).any():
            problems.append("a sequence is shorter than its prompt")
        if problems:
            raise BebopError(f"the split at {where} is inconsistent: {problems[0]}. It was probably written "
                             "by an interrupted save of an older bebop; regenerate it with `bebop generate-data`.")

    @classmethod
    def from_lists(
        cls, sequences: list[list[int]], prompt_lens: list[int], temperatures: list[float], meta: dict[str, Any]
    ) -> SequenceSet:
        offsets = np.zeros(len(sequences) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(s) for s in sequences])
        tokens = (
            np.concatenate([np.asarray(s, dtype=np.int32) for s in sequences]) if sequences else np.zeros(0, np.int32)
        )
        return cls(tokens, offsets, np.asarray(prompt_lens, np.int32), np.asarray(temperatures, np.float32), meta)


def load_split(data_dir: str | Path, split: str) -> SequenceSet:
    """Load one split of a dataset folder written by ``bebop generate-data``."""
    folder = Path(data_dir) / split
    if split not in SPLITS:
        raise BebopError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if not (folder / "tokens.npy").is_file():
        raise BebopError(
            f"no {split} data in {data_dir} (missing {folder / 'tokens.npy'}); run `bebop generate-data` first"
        )
    meta = json.loads((folder / "meta.json").read_text())
    seqs = SequenceSet(
        tokens=np.load(folder / "tokens.npy"),
        offsets=np.load(folder / "offsets.npy"),
        prompt_lens=np.load(folder / "prompt_lens.npy"),
        temperatures=np.load(folder / "temperatures.npy"),
        meta=meta,
    )
    seqs.check(folder)
    return seqs
