"""Every real-model evaluation, committed the moment it finishes, so no forward pass is ever paid for twice.

One SQLite file (WAL journal) per model: rows are keyed by the measurement context (a fingerprint of the
calibration windows and how the loss was measured) and the keep-mask. What is stored is the coalition's
mean token NLL, not its utility: every utility is a pure function of the NLL and the full model's NLL, so
switching `--utility` reuses the same evaluations. A process killed at any point loses at most the mask it
was evaluating; each row is its own transaction.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import numpy as np

from layershap.errors import LayershapError
from layershap.game.context import model_fingerprint

SCHEMA_VERSION = 1


def mask_key(mask) -> str:
    """A mask as a string of 0/1, first layer first: readable in `sqlite3` and exact."""
    return "".join("1" if bit else "0" for bit in np.asarray(mask, dtype=bool))


def default_store_path(model_fp: str) -> Path:
    from layershap.models.load import cache_dir

    return cache_dir() / "evaluations" / f"{model_fp}.sqlite"


class EvaluationStore:
    """Measured NLLs of keep-masks for one model, in one SQLite file."""

    def __init__(self, path, *, model_fp: str, n_layers: int):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.model_fp = model_fp
        self.n_layers = n_layers
        try:
            self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._init_schema()
        except sqlite3.DatabaseError as exc:
            raise LayershapError(f"{self.path} is not a layershap evaluation store ({exc}); "
                                 "move it aside or give another --store") from None

    def _init_schema(self) -> None:
        db = self._db
        db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        db.execute("CREATE TABLE IF NOT EXISTS evaluations (context TEXT NOT NULL, mask TEXT NOT NULL, "
                   "nll REAL, seconds REAL NOT NULL, created REAL NOT NULL, PRIMARY KEY (context, mask))")
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        if not meta:
            db.execute("BEGIN IMMEDIATE")
            db.executemany("INSERT OR IGNORE INTO meta VALUES (?, ?)",
                           [("schema", str(SCHEMA_VERSION)), ("model", self.model_fp),
                            ("n_layers", str(self.n_layers))])
            db.execute("COMMIT")
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        if meta.get("schema") != str(SCHEMA_VERSION):
            raise LayershapError(f"{self.path} was written by another layershap version (schema "
                                 f"{meta.get('schema')}); give another --store")
        if meta.get("model") != self.model_fp:
            raise LayershapError(f"{self.path} holds evaluations of another model (fingerprint "
                                 f"{meta.get('model')}, this one is {self.model_fp}); give another --store")

    def get_many(self, context: str, masks) -> dict[str, float]:
        """Stored NLLs of those masks that have one, by mask key (NaN stands for a diverged model)."""
        keys = [mask_key(m) for m in masks]
        found: dict[str, float] = {}
        for start in range(0, len(keys), 500):
            chunk = keys[start:start + 500]
            rows = self._db.execute(
                f"SELECT mask, nll FROM evaluations WHERE context = ? AND mask IN ({','.join('?' * len(chunk))})",
                [context, *chunk]).fetchall()
            found.update({mask: _stored_nll(nll) for mask, nll in rows})
        return found

    def all_nlls(self, context: str) -> dict[str, float]:
        """Every stored NLL in one context, by mask key (NaN stands for a diverged model): what a run
        measured, for analysis after the fact."""
        rows = self._db.execute("SELECT mask, nll FROM evaluations WHERE context = ?", (context,)).fetchall()
        return {mask: _stored_nll(nll) for mask, nll in rows}

    def put(self, context: str, mask, nll: float, seconds: float) -> None:
        """Commit one evaluation now (NaN and inf are kept: stored as NULL, i.e. diverged)."""
        value = nll if np.isfinite(nll) else None
        self._db.execute("INSERT OR REPLACE INTO evaluations VALUES (?, ?, ?, ?, ?)",
                         (context, mask_key(mask), value, seconds, time.time()))

    def count(self, context: str | None = None) -> int:
        if context is None:
            return self._db.execute("SELECT COUNT(*) FROM evaluations").fetchone()[0]
        return self._db.execute("SELECT COUNT(*) FROM evaluations WHERE context = ?", (context,)).fetchone()[0]

    def mean_seconds_per_block(self, context: str) -> float | None:
        """Average measured seconds per kept block in this context, for run-time estimates."""
        rows = self._db.execute("SELECT mask, seconds FROM evaluations WHERE context = ? LIMIT 200",
                                (context,)).fetchall()
        rates = [seconds / max(mask.count("1"), 1) for mask, seconds in rows]
        return float(np.mean(rates)) if rates else None

    def close(self) -> None:
        self._db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _stored_nll(value: float | None) -> float:
    """A stored NLL as read back: NULL (a diverged model, see `put`) becomes NaN."""
    return float("nan") if value is None else value


def open_store(model, path=None) -> EvaluationStore:
    """The store for this model: `path` if given, else one file per model fingerprint in the cache."""
    from layershap.models.layers import num_layers

    fingerprint = model_fingerprint(model)
    return EvaluationStore(path or default_store_path(fingerprint), model_fp=fingerprint, n_layers=num_layers(model))
