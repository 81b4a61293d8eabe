"""Small file helpers shared by every stage that writes results."""

from __future__ import annotations

import json
from pathlib import Path


def write_json(path, data) -> None:
    """Write JSON atomically, so a killed process never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")
    tmp.replace(path)


def read_json(path) -> dict:
    return json.loads(Path(path).read_text())


def _jsonable(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
