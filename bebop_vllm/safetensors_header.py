"""A safetensors file's header (tensor names, shapes, dtypes) without reading its weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_header(path: Path) -> dict[str, dict[str, Any]]:
    """``{tensor name: {"dtype", "shape", "data_offsets"}}`` from the header, ``__metadata__`` left out.

    Raises OSError (FileNotFoundError for a missing file) or ValueError (a bad header length, a
    header that is not JSON); callers turn these into their own errors.
    """
    with path.open("rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if not 0 < size < 100_000_000:
            raise ValueError(f"header length {size}")
        header = json.loads(f.read(size))
    return {k: v for k, v in header.items() if k != "__metadata__"}
