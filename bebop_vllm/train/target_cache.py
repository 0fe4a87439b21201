"""The frozen target's final hidden states for a data split, computed once and cached on disk.

Train time needs, per sequence, the target's post-norm final hidden states (the head's input
and, through the target's lm_head, the target distributions). Running the 30-layer target is
the dominant cost on CPU, so the states are cached as one fp16 memmap ``[total_tokens, H]``
aligned with ``tokens.npy``, filled for the sequences a run asks for and resumable
(``hidden-*.json`` records which sequences are done). Caches live in the dataset folder (under $BEBOP_HOME).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from bebop_vllm.heads.target import final_hidden_states, load_target_model, read_target_config
from bebop_vllm.train.dataset import SequenceSet


def _model_key(model_dir: Path) -> str:
    weights = sorted(model_dir.glob("*.safetensors"))
    blob = json.dumps([read_target_config(model_dir), [(w.name, w.stat().st_size) for w in weights]], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


class HiddenCache:
    """fp16 memmap of target hidden states for the sequences in ``done`` of a split."""

    def __init__(self, data_dir: Path, split: str, seqs: SequenceSet, model_dir: Path) -> None:
        self.seqs = seqs
        key = _model_key(model_dir)
        self.path = data_dir / split / f"hidden-{key}.f16"
        self.state_path = data_dir / split / f"hidden-{key}.json"
        self.hidden_size = int(read_target_config(model_dir)["hidden_size"])
        self.model_dir = model_dir
        nbytes = len(seqs.tokens) * self.hidden_size * 2
        if self.path.exists() and self.path.stat().st_size < nbytes:  # the split grew (appended chunks)
            with open(self.path, "r+b") as f:
                f.truncate(nbytes)
        mode = "r+" if self.path.exists() else "w+"
        self.array = np.memmap(self.path, dtype=np.float16, mode=mode, shape=(len(seqs.tokens), self.hidden_size))
        self.done: set[int] = set()
        if self.state_path.exists():
            state = json.loads(self.state_path.read_text())
            if state.get("tokens_sha") == self._tokens_sha(state["done"]):  # else: the data changed, recompute
                self.done = set(state["done"])

    def _tokens_sha(self, indices: list[int]) -> str:
        h = hashlib.sha256()
        for i in sorted(indices):
            h.update(self.seqs.sequence(i).tobytes() if i < len(self.seqs) else b"missing")
        return h.hexdigest()

    def _save_state(self) -> None:
        done = sorted(self.done)
        self.state_path.write_text(json.dumps({"done": done, "tokens_sha": self._tokens_sha(done)}))

    def fill(self, indices: list[int], desc: str = "target hidden states", progress: bool = True) -> None:
        """Compute the states of the sequences in ``indices`` not cached yet (fp32 target, progress bar)."""
        todo = [i for i in indices if i not in self.done]
        if not todo:
            return
        model = load_target_model(self.model_dir, torch.float32)
        total = int(sum(self.seqs.offsets[i + 1] - self.seqs.offsets[i] for i in todo))
        with tqdm(total=total, desc=desc, unit="tok", dynamic_ncols=True, disable=not progress) as bar:
            for k, i in enumerate(todo):
                ids = torch.from_numpy(self.seqs.sequence(i).astype(np.int64))[None]
                h = final_hidden_states(model, ids)[0]
                self.array[self.seqs.offsets[i] : self.seqs.offsets[i + 1]] = h.to(torch.float16).numpy()
                self.done.add(i)
                if (k + 1) % 8 == 0 or k + 1 == len(todo):  # flush the data, then record progress
                    self.array.flush()
                    self._save_state()
                bar.update(ids.shape[1])

    def put(self, i: int, hidden: torch.Tensor) -> None:
        """Store sequence i's states computed elsewhere (e.g. while sampling); call save() after."""
        n = int(self.seqs.offsets[i + 1] - self.seqs.offsets[i])
        if tuple(hidden.shape) != (n, self.hidden_size):
            raise ValueError(
                f"hidden states for sequence {i} have shape {tuple(hidden.shape)}, expected {(n, self.hidden_size)}"
            )
        self.array[self.seqs.offsets[i] : self.seqs.offsets[i + 1]] = hidden.to(torch.float16).numpy()
        self.done.add(i)

    def save(self) -> None:
        self.array.flush()
        self._save_state()

    def hidden(self, i: int) -> torch.Tensor:
        """[L_i, H] float32 hidden states of sequence i (must be cached)."""
        if i not in self.done:
            raise IndexError(f"sequence {i} has no cached hidden states")
        return torch.from_numpy(
            np.asarray(self.array[self.seqs.offsets[i] : self.seqs.offsets[i + 1]], dtype=np.float32)
        )
