"""What the frozen target says about a data split, computed once and cached on disk.

Train time needs, per sequence, the target's post-norm final hidden states ``h`` (the head's
input) and the target's next-token distributions. Running the 30-layer target is the dominant
cost on CPU, so one batched pass stores, aligned with ``tokens.npy``:

- ``hidden-<key>.f16``: ``h`` as an fp16 memmap ``[total_tokens, H]``;
- ``lse-<key>.f32``: the log-normaliser ``logsumexp(lm_head(h) / T)`` over the FULL vocabulary at
  the sequence's own sampling temperature T, ``[total_tokens]``. With it the trainer recovers
  the target's exact probabilities on any token subset D from ``h`` alone:
  ``p_v = exp(lm_head_v(h) / T - lse)`` for v in D (a [n, |D|] matmul instead of [n, V]);
- ``mass-<key>.npy``: the target probability summed over every completion position, per token
  ``[V]`` (float64): how much of the target's sampled distribution each token carries, which
  ranks the draft vocabulary (``bebop draft-vocab``).

``hidden-<key>.json`` records which sequences are done (resumable). Caches live in the dataset
folder (under $BEBOP_HOME), never in git.

For heads with EAGLE-3-style features (``aux_layer_ids``), the same forward also stores the
residual stream after those layers: ``aux-<key>-<ids>.f16`` ``[total_tokens, n H]`` with its own
record of done sequences ``aux-<key>-<ids>.json`` (a split whose hidden states are cached already
gains aux features without recomputing, and without counting its mass twice).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from bebop_vllm.hardware import cpu_has_bf16
from bebop_vllm.heads.target import (
    head_features,
    load_target_model,
    read_target_config,
    target_embedding_and_lm_head,
    target_states,
)
from bebop_vllm.train.dataset import SequenceSet

CACHE_FORMAT = 2  # 2: hidden + lse + mass (1: hidden only)


def _model_key(model_dir: Path) -> str:
    weights = sorted(model_dir.glob("*.safetensors"))
    blob = json.dumps([read_target_config(model_dir), [(w.name, w.stat().st_size) for w in weights]], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def cache_dtype() -> torch.dtype:
    """Target forward dtype for the cache pass: bf16 where the CPU has native bf16 matmuls
    (avx512_bf16 / AMX) or on CUDA, fp32 elsewhere (emulated bf16 is ~3x slower)."""
    return torch.bfloat16 if (torch.cuda.is_available() or cpu_has_bf16()) else torch.float32


class HiddenCache:
    """Target hidden states, log-normalisers and summed probabilities for the sequences in
    ``done`` of a split (and aux-layer features for those in ``aux_done``)."""

    def __init__(
        self, data_dir: Path, split: str, seqs: SequenceSet, model_dir: Path, aux_layer_ids: tuple[int, ...] = ()
    ) -> None:
        self.seqs = seqs
        key = _model_key(model_dir)
        folder = Path(data_dir) / split
        self.path = folder / f"hidden-{key}.f16"
        self.lse_path = folder / f"lse-{key}.f32"
        self.mass_path = folder / f"mass-{key}.npy"
        self.state_path = folder / f"hidden-{key}.json"
        cfg = read_target_config(model_dir)
        self.hidden_size, self.vocab_size = int(cfg["hidden_size"]), int(cfg["vocab_size"])
        self.model_dir = model_dir
        n = len(seqs.tokens)
        self.array = self._memmap(self.path, np.float16, (n, self.hidden_size))
        self.lse = self._memmap(self.lse_path, np.float32, (n,))
        self.done: set[int] = set()
        self.mass = np.zeros(self.vocab_size, dtype=np.float64)
        if self.state_path.exists():
            state = json.loads(self.state_path.read_text())
            fresh = state.get("format") == CACHE_FORMAT and state.get("tokens_sha") == self._tokens_sha(state["done"])
            if fresh and self.mass_path.exists():  # else: the data or the format changed, recompute
                self.done = set(state["done"])
                self.mass = np.load(self.mass_path)
        self.aux_layer_ids = tuple(int(i) for i in aux_layer_ids)
        self.aux_done: set[int] = set()
        if self.aux_layer_ids:
            tag = "_".join(map(str, self.aux_layer_ids))
            self.aux_path = folder / f"aux-{key}-{tag}.f16"
            self.aux_state_path = folder / f"aux-{key}-{tag}.json"
            self.aux = self._memmap(self.aux_path, np.float16, (n, len(self.aux_layer_ids) * self.hidden_size))
            if self.aux_state_path.exists():
                state = json.loads(self.aux_state_path.read_text())
                if state.get("tokens_sha") == self._tokens_sha(state["done"]):
                    self.aux_done = set(state["done"])

    @staticmethod
    def _memmap(path: Path, dtype: type, shape: tuple[int, ...]) -> np.memmap:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if path.exists() and path.stat().st_size < nbytes:  # the split grew (appended chunks)
            with open(path, "r+b") as f:
                f.truncate(nbytes)
        return np.memmap(path, dtype=dtype, mode="r+" if path.exists() else "w+", shape=shape)

    def _tokens_sha(self, indices: list[int]) -> str:
        h = hashlib.sha256()
        for i in sorted(indices):
            h.update(self.seqs.sequence(i).tobytes() if i < len(self.seqs) else b"missing")
        return h.hexdigest()

    def _save_state(self) -> None:
        self.array.flush()
        self.lse.flush()
        np.save(self.mass_path, self.mass)
        done = sorted(self.done)
        state = {"format": CACHE_FORMAT, "done": done, "tokens_sha": self._tokens_sha(done)}
        self.state_path.write_text(json.dumps(state))
        if self.aux_layer_ids:
            self.aux.flush()
            aux_done = sorted(self.aux_done)
            self.aux_state_path.write_text(json.dumps({"done": aux_done, "tokens_sha": self._tokens_sha(aux_done)}))

    def is_missing(self, i: int) -> bool:
        """Whether sequence i still needs the target pass (its hidden states or aux features)."""
        return i not in self.done or (bool(self.aux_layer_ids) and i not in self.aux_done)

    def fill(
        self,
        indices: list[int],
        desc: str = "target hidden states",
        progress: bool = True,
        max_batch_tokens: int = 8192,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Compute what is not cached yet for the sequences in ``indices``: batches of
        similar-length sequences (right-padded, at most ``max_batch_tokens`` padded tokens),
        target in ``cache_dtype()`` unless ``dtype`` is given; progress bar; resumable."""
        # length-sorted within windows of 256 sequences (little padding), windows in data order:
        # a pass stopped early has cached a prefix of the data (generate-data interleaves domains
        # and samples), not a length-biased subset
        todo = sorted((i for i in set(indices) if self.is_missing(i)), key=lambda i: (i // 256, self._len(i)))
        if not todo:
            return
        model = load_target_model(self.model_dir, dtype or cache_dtype())
        _, lm_head = target_embedding_and_lm_head(self.model_dir, torch.float32)
        batches, cur = [], []
        for i in todo:
            if cur and ((len(cur) + 1) * self._len(i) > max_batch_tokens or i // 256 != cur[0] // 256):
                batches.append(cur)
                cur = []
            cur.append(i)
        batches.append(cur)
        total = sum(self._len(i) for i in todo)
        with tqdm(total=total, desc=desc, unit="tok", dynamic_ncols=True, disable=not progress) as bar:
            for k, batch in enumerate(batches):
                self._fill_batch(model, lm_head, batch)
                if (k + 1) % 4 == 0 or k + 1 == len(batches):  # flush the data, then record progress
                    self._save_state()
                bar.update(sum(self._len(i) for i in batch))

    def _len(self, i: int) -> int:
        return int(self.seqs.offsets[i + 1] - self.seqs.offsets[i])

    @torch.no_grad()
    def _fill_batch(self, model: torch.nn.Module, lm_head: torch.Tensor, batch: list[int]) -> None:
        width = max(self._len(i) for i in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for r, i in enumerate(batch):
            seq = torch.from_numpy(self.seqs.sequence(i).astype(np.int64))
            ids[r, : len(seq)], mask[r, : len(seq)] = seq, 1
        # right padding: real positions never attend to pads (causal), so their states are exact
        hidden, aux = target_states(model, ids, self.aux_layer_ids, attention_mask=mask)
        for r, i in enumerate(batch):
            if i not in self.done:  # (a sequence already done only needed its aux features)
                self._store(i, hidden[r, : self._len(i)], lm_head)
                self.done.add(i)
            if aux is not None:
                lo = int(self.seqs.offsets[i])
                self.aux[lo : lo + self._len(i)] = aux[r, : self._len(i)].to(torch.float16).numpy()
                self.aux_done.add(i)

    def _store(self, i: int, hidden: torch.Tensor, lm_head: torch.Tensor) -> None:
        """Write sequence i's ``[L_i, H]`` states (as fp16) and their log-normalisers, and add its
        completion positions' target probabilities to ``mass``; all from the fp16 states the
        trainer will read."""
        n, lo = self._len(i), int(self.seqs.offsets[i])
        h16 = hidden.to(torch.float16)
        self.array[lo : lo + n] = h16.numpy()
        logits = (h16.float() @ lm_head.T) / float(self.seqs.temperatures[i])
        lse = torch.logsumexp(logits, dim=-1)
        self.lse[lo : lo + n] = lse.numpy()
        first = max(int(self.seqs.prompt_lens[i]) - 1, 0)  # positions that predict a completion token
        if n - 1 > first:
            self.mass += torch.exp(logits[first : n - 1] - lse[first : n - 1, None]).sum(0).double().numpy()

    def put(self, i: int, hidden: torch.Tensor) -> None:
        """Store sequence i's states computed elsewhere (e.g. while sampling); call save() after.
        (Final hidden states only: aux features come from :meth:`fill`.)"""
        n = self._len(i)
        if tuple(hidden.shape) != (n, self.hidden_size):
            raise ValueError(
                f"hidden states for sequence {i} have shape {tuple(hidden.shape)}, expected {(n, self.hidden_size)}"
            )
        _, lm_head = target_embedding_and_lm_head(self.model_dir, torch.float32)
        self._store(i, hidden, lm_head)
        self.done.add(i)

    def save(self) -> None:
        self._save_state()

    def hidden(self, i: int) -> torch.Tensor:
        """[L_i, H] float32 hidden states of sequence i (must be cached)."""
        if i not in self.done:
            raise IndexError(f"sequence {i} has no cached hidden states")
        lo, hi = self.seqs.offsets[i], self.seqs.offsets[i + 1]
        return torch.from_numpy(np.asarray(self.array[lo:hi], dtype=np.float32))

    def features(self, i: int) -> torch.Tensor:
        """What a head reads at depth 1 for sequence i: [L_i, (n + 1) H] = [aux features, h]
        (``BebopMTPHead.combine``'s layout), or [L_i, H] = h without aux layers."""
        if not self.aux_layer_ids:
            return self.hidden(i)
        if i not in self.aux_done:
            raise IndexError(f"sequence {i} has no cached aux features for layers {self.aux_layer_ids}")
        lo, hi = self.seqs.offsets[i], self.seqs.offsets[i + 1]
        return head_features(self.hidden(i), torch.from_numpy(np.asarray(self.aux[lo:hi], dtype=np.float32)))

    def log_normaliser(self, i: int) -> torch.Tensor:
        """[L_i] float32: logsumexp of the target's full-vocabulary logits / T_i per position."""
        if i not in self.done:
            raise IndexError(f"sequence {i} has no cached hidden states")
        lo, hi = self.seqs.offsets[i], self.seqs.offsets[i + 1]
        return torch.from_numpy(np.asarray(self.lse[lo:hi], dtype=np.float32))
