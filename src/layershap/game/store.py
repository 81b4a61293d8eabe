"""Every real-model evaluation, committed the moment it finishes, so no forward pass is ever paid for twice.

One SQLite file (WAL journal) per model: rows are keyed by the measurement context (a fingerprint of the
calibration windows and how the loss was measured) and the keep-mask. What is stored is the coalition's
mean token NLL, not its utility: every NLL utility is a pure function of the NLL and the full model's NLL,
so switching between them reuses the same evaluations. `--utility kl` measures another loss (the mean KL
from the dense model), named in the context, so its rows never mix with the NLL's. A process killed at any point loses at most the mask it
was evaluating; each row is its own transaction.

The context key stands for everything that can change an NLL (`game/context.py`); the `contexts` table keeps
what each key stood for, so a run can say why rows it did not reuse were measured differently. Runs sharing a
store (two processes, two machines on one file system) lease masks before measuring them (`leases`), so each
mask is measured once; a lease lapses if its holder stops renewing it (killed), and another run takes it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sqlite3
import time
import uuid
from pathlib import Path

import numpy as np

from layershap.errors import LayershapError
from layershap.game.context import legacy_model_fingerprint, model_fingerprint

# 2: the full-content model fingerprint, a description of every context, and leases (work sharing). A
# store of schema 1 is upgraded in place when this model opens it: its rows stay, under their old context
# keys, which no longer match any context, so they are read but never reused.
SCHEMA_VERSION = 2
UPGRADABLE_SCHEMAS = ("1",)
# How long SQLite waits for another process's write to finish before giving up with one line.
LOCK_TIMEOUT_SECONDS = 30.0


def mask_key(mask) -> str:
    """A mask as a string of 0/1, first layer first: readable in `sqlite3` and exact."""
    return "".join("1" if bit else "0" for bit in np.asarray(mask, dtype=bool))


def default_store_path(model_fp: str) -> Path:
    from layershap.models.load import cache_dir

    return cache_dir() / "evaluations" / f"{model_fp}.sqlite"


# Below this much free space a SQLite I/O error is taken for a full disk: a store opened on a disk with no room
# fails to size its shared-memory file (32 KiB) and SQLite reports a plain "disk I/O error", not SQLITE_FULL.
NEARLY_FULL_BYTES = 256 << 10


def _nearly_full(path: Path) -> bool:
    try:
        return shutil.disk_usage(path.parent).free < NEARLY_FULL_BYTES
    except OSError:
        return False


def _store_error(path: Path, exc: Exception) -> LayershapError:
    """A SQLite failure as one line a user can act on."""
    text = str(exc)
    if "locked" in text or "busy" in text:
        return LayershapError(f"the evaluation store {path} stayed locked by another process for "
                              f"{LOCK_TIMEOUT_SECONDS:.0f} s; wait for it or give another --store")
    if "readonly" in text or "read-only" in text or "unable to open" in text:
        return LayershapError(f"cannot write the evaluation store {path} ({text}); make it writable or give "
                              "another --store")
    if ("disk" in text and "full" in text) or ("disk I/O error" in text and _nearly_full(path)):
        return LayershapError(f"the disk holding the evaluation store {path} is full")
    return LayershapError(f"the evaluation store {path} failed ({text})")


class EvaluationStore:
    """Measured NLLs of keep-masks for one model, in one SQLite file."""

    def __init__(self, path, *, model_fp: str, n_layers: int, legacy_fp: str | None = None):
        self.path = Path(path)
        self.model_fp = model_fp
        self.n_layers = n_layers
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LayershapError(f"cannot create the folder of the evaluation store {self.path} "
                                 f"({exc.strerror or exc})") from None
        try:
            self._db = sqlite3.connect(self.path, timeout=LOCK_TIMEOUT_SECONDS, isolation_level=None)
        except sqlite3.Error as exc:
            raise _store_error(self.path, exc) from None
        try:
            self._init_schema(legacy_fp)  # first, so a store that is refused is left byte for byte as it was
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
        except BaseException as exc:
            self._db.close()
            if isinstance(exc, sqlite3.OperationalError):
                raise _store_error(self.path, exc) from None
            if isinstance(exc, sqlite3.DatabaseError):
                raise LayershapError(f"{self.path} is not a layershap evaluation store ({exc}); "
                                     "move it aside or give another --store") from None
            raise

    def _execute(self, sql: str, parameters=()):
        try:
            return self._db.execute(sql, parameters)
        except sqlite3.OperationalError as exc:
            raise _store_error(self.path, exc) from None

    def _init_schema(self, legacy_fp: str | None) -> None:
        db = self._db
        meta = {}
        if db.execute("SELECT name FROM sqlite_master WHERE name = 'meta'").fetchone():
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        if not meta:
            db.execute("BEGIN IMMEDIATE")
            self._create_tables()
            db.executemany("INSERT OR IGNORE INTO meta VALUES (?, ?)",
                           [("schema", str(SCHEMA_VERSION)), ("model", self.model_fp),
                            ("n_layers", str(self.n_layers))])
            db.execute("COMMIT")
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        if meta.get("schema") in UPGRADABLE_SCHEMAS:
            if meta.get("model") not in (self.model_fp, legacy_fp):
                raise LayershapError(f"{self.path} holds evaluations of another model (fingerprint "
                                     f"{meta.get('model')}); give another --store")
            self._check_layers(meta)
            db.execute("BEGIN IMMEDIATE")
            self._create_tables()
            db.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (str(SCHEMA_VERSION),))
            db.execute("UPDATE meta SET value = ? WHERE key = 'model'", (self.model_fp,))
            db.execute("INSERT OR IGNORE INTO meta VALUES ('upgraded_from', ?)", (meta.get("schema"),))
            db.execute("COMMIT")
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        if meta.get("schema") != str(SCHEMA_VERSION):
            raise LayershapError(f"{self.path} was written by another layershap version (schema "
                                 f"{meta.get('schema')}); give another --store")
        if meta.get("model") != self.model_fp:
            raise LayershapError(f"{self.path} holds evaluations of another model (fingerprint "
                                 f"{meta.get('model')}, this one is {self.model_fp}); give another --store")
        self._check_layers(meta)

    def _check_layers(self, meta: dict) -> None:
        if meta.get("n_layers") not in (None, str(self.n_layers)):
            raise LayershapError(f"{self.path} holds evaluations of a model with {meta.get('n_layers')} blocks; "
                                 f"this one has {self.n_layers}; give another --store")

    def _create_tables(self) -> None:
        db = self._db
        db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        db.execute("CREATE TABLE IF NOT EXISTS evaluations (context TEXT NOT NULL, mask TEXT NOT NULL, "
                   "nll REAL, seconds REAL NOT NULL, created REAL NOT NULL, PRIMARY KEY (context, mask))")
        db.execute("CREATE TABLE IF NOT EXISTS contexts (context TEXT PRIMARY KEY, description TEXT NOT NULL)")
        db.execute("CREATE TABLE IF NOT EXISTS leases (context TEXT NOT NULL, mask TEXT NOT NULL, "
                   "owner TEXT NOT NULL, expires REAL NOT NULL, PRIMARY KEY (context, mask))")

    # --- contexts ---------------------------------------------------------------------------------------

    def describe(self, context: str, description: dict) -> None:
        """Record what a context key stands for, so a later run can say why it did not reuse its rows."""
        self._execute("INSERT OR IGNORE INTO contexts VALUES (?, ?)",
                      (context, json.dumps(description, sort_keys=True)))

    def elsewhere(self, context: str, masks) -> dict[str, tuple[int, dict | None]]:
        """Of these masks, how many are stored only under other contexts: {context: (count, description)}."""
        keys = [mask_key(m) for m in masks]
        counts: dict[str, int] = {}
        for start in range(0, len(keys), 500):
            chunk = keys[start:start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._execute(
                f"SELECT context, COUNT(*) FROM evaluations WHERE context != ? AND mask IN ({marks}) "
                f"AND mask NOT IN (SELECT mask FROM evaluations WHERE context = ? AND mask IN ({marks})) "
                "GROUP BY context", [context, *chunk, context, *chunk]).fetchall()
            for other, count in rows:
                counts[other] = counts.get(other, 0) + count
        descriptions = dict(self._execute("SELECT context, description FROM contexts").fetchall())
        return {other: (count, json.loads(descriptions[other]) if other in descriptions else None)
                for other, count in counts.items()}

    # --- leases: concurrent runs share the work ----------------------------------------------------------

    def claim(self, context: str, masks, *, ttl: float, limit: int | None = None) -> list[str]:
        """Lease those of these masks (at most `limit`, in the order given) that nobody has stored or holds a
        live lease on; returns their keys.

        A lease lapses `ttl` seconds after it was last renewed (`renew`), so the masks of a killed run are
        taken over by the others after at most that long.
        """
        keys = [mask_key(m) for m in masks]
        now = time.time()
        taken: list[str] = []
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for key in keys:
                    if limit is not None and len(taken) >= limit:
                        break
                    if self._db.execute("SELECT 1 FROM evaluations WHERE context = ? AND mask = ?",
                                        (context, key)).fetchone():
                        continue
                    held = self._db.execute("SELECT owner, expires FROM leases WHERE context = ? AND mask = ?",
                                            (context, key)).fetchone()
                    if held is not None and held[0] != self.owner and held[1] > now:
                        continue
                    self._db.execute("INSERT OR REPLACE INTO leases VALUES (?, ?, ?, ?)",
                                     (context, key, self.owner, now + ttl))
                    taken.append(key)
                self._db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                raise
        except sqlite3.OperationalError as exc:
            raise _store_error(self.path, exc) from None
        return taken

    def renew(self, context: str, *, ttl: float) -> None:
        """Push back the expiry of every lease this store object holds in the context."""
        self._execute("UPDATE leases SET expires = ? WHERE context = ? AND owner = ?",
                      (time.time() + ttl, context, self.owner))

    def release(self, context: str) -> None:
        """Give up every lease this store object holds in the context (measured or not)."""
        self._execute("DELETE FROM leases WHERE context = ? AND owner = ?", (context, self.owner))

    def leased_by_others(self, context: str, masks) -> int:
        keys = {mask_key(m) for m in masks}
        rows = self._execute("SELECT mask FROM leases WHERE context = ? AND owner != ? AND expires > ?",
                             (context, self.owner, time.time())).fetchall()
        return sum(1 for (mask,) in rows if mask in keys)

    def get_many(self, context: str, masks) -> dict[str, float]:
        """Stored NLLs of those masks that have one, by mask key (NaN stands for a diverged model)."""
        keys = [mask_key(m) for m in masks]
        found: dict[str, float] = {}
        for start in range(0, len(keys), 500):
            chunk = keys[start:start + 500]
            rows = self._execute(
                f"SELECT mask, nll FROM evaluations WHERE context = ? AND mask IN ({','.join('?' * len(chunk))})",
                [context, *chunk]).fetchall()
            found.update({mask: _stored_nll(nll) for mask, nll in rows})
        return found

    def all_nlls(self, context: str) -> dict[str, float]:
        """Every stored NLL in one context, by mask key (NaN stands for a diverged model): what a run
        measured, for analysis after the fact."""
        rows = self._execute("SELECT mask, nll FROM evaluations WHERE context = ?", (context,)).fetchall()
        return {mask: _stored_nll(nll) for mask, nll in rows}

    def put(self, context: str, mask, nll: float, seconds: float) -> None:
        """Commit one evaluation now (NaN and inf are kept: stored as NULL, i.e. diverged)."""
        value = nll if np.isfinite(nll) else None
        self._execute("INSERT OR REPLACE INTO evaluations VALUES (?, ?, ?, ?, ?)",
                      (context, mask_key(mask), value, seconds, time.time()))

    def count(self, context: str | None = None) -> int:
        if context is None:
            return self._execute("SELECT COUNT(*) FROM evaluations").fetchone()[0]
        return self._execute("SELECT COUNT(*) FROM evaluations WHERE context = ?", (context,)).fetchone()[0]

    def mean_seconds_per_block(self, context: str) -> float | None:
        """Average measured seconds per kept block in this context, for run-time estimates."""
        rows = self._execute("SELECT mask, seconds FROM evaluations WHERE context = ? LIMIT 200",
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
    """The store for this model: `path` if given, else one file per model fingerprint in the cache (the file
    an older layershap kept under the sampled fingerprint is taken over and upgraded when there is no newer
    one, so its rows stay readable)."""
    from layershap.models.layers import num_layers

    fingerprint = model_fingerprint(model)
    legacy = legacy_model_fingerprint(model)
    if path is None:
        path = default_store_path(fingerprint)
        older = default_store_path(legacy)
        if not path.exists() and older.exists():
            path = older
    return EvaluationStore(path, model_fp=fingerprint, n_layers=num_layers(model), legacy_fp=legacy)
