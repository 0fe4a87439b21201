"""Writing a benchmark's results: ``<out>.json`` and ``<out>.md``, and the markdown on stdout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_results(out: Path, result: dict[str, Any], md: str) -> None:
    """Write ``result`` to ``out.json`` and ``md`` to ``out.md`` (creating the folder), then print ``md``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(md)
    print(md, end="")
