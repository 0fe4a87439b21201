"""``bebop draft-vocab``: rank the tokens the heads may draft (for ``draft_vocab_size``)."""

from __future__ import annotations

import argparse
from pathlib import Path

REPORT_SIZES = (512, 1024, 2048, 4096, 8192, 16384)


def add_parser(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name,
        help="write a heads folder's draft vocabulary (token frequencies of its training data)",
        description="Count the tokens of the target-sampled continuations in a `bebop generate-data` "
        "split and write HEADS/draft_vocab.json (every seen token, most frequent first). The engine "
        "option draft_vocab_size=N then computes draft logits for those N tokens only: the draft "
        "head's lm_head shrinks by V/N, sampling stays exact. Prints the held-out coverage of "
        "several sizes to choose N.",
    )
    p.add_argument("--heads", type=Path, required=True, help="heads folder to write draft_vocab.json into")
    p.add_argument(
        "--data", type=Path, default=None, help="dataset folder (default: $BEBOP_HOME/data/smollm2-135m-selfdistill)"
    )
    p.add_argument("--split", default="train", help="split to count (default: train; held-out is for coverage)")
    return p


def run(args: argparse.Namespace) -> int:
    from bebop_vllm.draft_vocab import coverage, ranked_ids, token_counts, write_draft_vocab
    from bebop_vllm.errors import BebopError
    from bebop_vllm.heads.checkpoint import read_metadata
    from bebop_vllm.train.dataset import default_data_dir, load_split

    meta = read_metadata(args.heads)
    data = args.data or default_data_dir()
    seqs = load_split(data, args.split)
    counts, prompt_counts = token_counts(seqs, meta.vocab_size)
    path = write_draft_vocab(args.heads, counts, prompt_counts,
                             {"data": str(data), "split": args.split, "sequences": len(seqs)})
    ids = ranked_ids(counts, prompt_counts)
    print(f"wrote {path}: {len(ids)} distinct tokens ({int((counts > 0).sum())} in the {int(counts.sum())} "
          f"completion tokens) of {len(seqs)} {args.split} sequences")
    try:
        held = token_counts(load_split(data, "heldout"), meta.vocab_size)[0]
    except BebopError:  # no held-out split: coverage is informative only
        held = None
    for n in [s for s in REPORT_SIZES if s < len(ids)] + [len(ids)]:
        line = f"  draft_vocab_size={n:>6}: {coverage(ids[:n], counts):.1%} of {args.split} completion tokens"
        if held is not None:
            line += f", {coverage(ids[:n], held):.1%} of held-out"
        print(line)
    return 0
