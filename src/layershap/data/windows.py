"""Text sources become fixed-length token windows, reproducibly, with calibration and evaluation kept apart.

A source is named one of three ways:
- a local file: `.txt` (the whole file) or `.jsonl` (the `text` field of every line);
- a packaged text shipped by the `exllamav3` package (works offline): `wiki`, `c4`, `code`, `tiny`,
  `technical`, `multilingual`;
- a Hugging Face dataset, for users who have the hub: `wikitext2`, `ptb`, `hf:c4` (and `hf:wikitext2`, ...).

Each text is tokenized once and cut into non-overlapping slots of `seq_len` tokens. The first half of the
token stream serves calibration and the second half evaluation, so windows of the two splits never overlap
even when both come from the same text. `samples` slots are drawn from the split with `seed`.

A mixture of sources, `c4,wiki,code` or weighted `c4:2,wiki:1`, draws the windows across the parts in
proportion to their weights (largest remainders), each part from its own calibration (or evaluation) half;
the windows of one seed are always the same. `exclude=` draws windows that overlap none of the given ones
(the cooperative-game method confirms its finalists on such fresh windows).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from layershap.errors import LayershapError

PACKAGED_TEXTS = {
    "wiki": "wiki.utf8",
    "c4": "c4.utf8",
    "code": "code.utf8",
    "tiny": "tiny.utf8",
    "technical": "technical.utf8",
    "multilingual": "multilingual.utf8",
}
PACKAGED_TEXT_PACKAGE = "exllamav3"
HUB_TEXTS = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "test", "text"),
    "ptb": ("ptb_text_only", "penn_treebank", "test", "sentence"),
    "c4": ("allenai/c4", "en", "validation", "text"),
}
SPLITS = ("calibration", "evaluation")


@dataclass(frozen=True)
class TextWindows:
    """Token windows of one text, as a `[samples, seq_len]` tensor, with where they came from."""

    tokens: torch.Tensor
    source: str
    split: str
    seed: int
    # where every row starts: (text, token offset in the whole text); empty for windows not drawn by text_windows
    starts: tuple = field(default=(), compare=False)
    # a mixture's parts: (text, weight, windows drawn); empty for a single text
    parts: tuple = field(default=(), compare=False)

    @property
    def samples(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]

    def fingerprint(self) -> str:
        """Identifies the exact tokens, so cached evaluations are reused only on the same data."""
        return tokens_fingerprint(self.tokens)

    def describe(self) -> dict:
        described = {"source": self.source, "split": self.split, "samples": self.samples, "seq_len": self.seq_len,
                     "seed": self.seed, "fingerprint": self.fingerprint()}
        if self.parts:
            described["mixture"] = [{"source": name, "weight": weight, "samples": count}
                                    for name, weight, count in self.parts]
        return described


def tokens_fingerprint(tokens: torch.Tensor) -> str:
    """A short hash of a token tensor's values and shape."""
    digest = hashlib.sha256(tokens.to(torch.int64).cpu().numpy().tobytes())
    digest.update(str(tuple(tokens.shape)).encode())
    return digest.hexdigest()[:16]


def text_windows(source: str, tokenizer, *, samples: int = 8, seq_len: int = 128, seed: int = 0,
                 split: str = "calibration", exclude: TextWindows | None = None) -> TextWindows:
    """Draw `samples` non-overlapping windows of `seq_len` tokens from one half of `source` (a text or a
    mixture, see the module docstring); with `exclude`, none overlaps a window of `exclude`."""
    if split not in SPLITS:
        raise LayershapError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if samples < 1 or seq_len < 2:
        raise LayershapError(f"need --samples >= 1 and --seq-len >= 2; got {samples} and {seq_len}")
    mixture = parse_mixture(source)
    if mixture is None:
        return _single_text_windows(source, tokenizer, samples, seq_len, seed, split, exclude)
    counts = mixture_counts([weight for _, weight in mixture], samples)
    drawn = [(name, weight, count, _single_text_windows(name, tokenizer, count, seq_len, seed, split, exclude))
             for (name, weight), count in zip(mixture, counts)]
    tokens = torch.cat([w.tokens for *_, w in drawn])
    starts = tuple(start for *_, w in drawn for start in w.starts)
    return TextWindows(tokens, mixture_name(mixture), split, seed, starts=starts,
                       parts=tuple((name, weight, count) for name, weight, count, _ in drawn))


def windows_apart(source: str, tokenizer, calibration: TextWindows, samples: int) -> TextWindows | None:
    """Up to `samples` windows of `calibration`'s text, split, seed and length that overlap none of its
    windows: as many as the half has room for (halving the request until they fit), None when none fits."""
    while samples >= 1:
        try:
            return text_windows(source, tokenizer, samples=samples, seq_len=calibration.seq_len,
                                seed=calibration.seed, split=calibration.split, exclude=calibration)
        except LayershapError:
            samples //= 2
    return None


def _single_text_windows(source: str, tokenizer, samples: int, seq_len: int, seed: int, split: str,
                         exclude: TextWindows | None) -> TextWindows:
    ids = tokenize(load_text(source), tokenizer)
    half = len(ids) // 2
    offset = 0 if split == "calibration" else half
    region = ids[:half] if split == "calibration" else ids[half:]
    slots = len(region) // seq_len
    allowed = np.arange(slots)
    if exclude is not None:
        taken = [(start, start + exclude.seq_len) for name, start in exclude.starts if name == source]
        if exclude.samples and not exclude.starts:
            raise LayershapError("cannot draw windows apart from windows whose positions are unknown")
        begin = offset + allowed * seq_len
        clear = np.ones(slots, dtype=bool)
        for a, b in taken:
            clear &= (begin + seq_len <= a) | (begin >= b)
        allowed = allowed[clear]
    if len(allowed) < samples:
        raise LayershapError(
            f"text {source!r} is too short: its {split} half has {len(region)} tokens, room for {len(allowed)} "
            f"{'more ' if exclude is not None else ''}windows of {seq_len}, but {samples} were asked for; lower "
            "--samples or --seq-len, or give a longer text"
        )
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(slots, size=samples, replace=False) if exclude is None
                     else rng.choice(allowed, size=samples, replace=False))
    rows = np.stack([region[s * seq_len:(s + 1) * seq_len] for s in chosen])
    starts = tuple((source, int(offset + s * seq_len)) for s in chosen)
    return TextWindows(torch.from_numpy(rows).long(), source, split, seed, starts=starts)


_WEIGHT = re.compile(r"^(?P<name>.+):(?P<weight>[0-9.eE+-]*)$")


def parse_mixture(source: str) -> list[tuple[str, float]] | None:
    """[(text, weight), ...] of a mixture (`c4,wiki` or `c4:2,wiki:1`); None for a single text (a file that
    exists, or a name without a comma or weight). A LayershapError names an empty part, a bad weight or a
    part given twice."""
    if Path(source).expanduser().exists() or ("," not in source and not _WEIGHT.match(source)):
        return None
    parts = []
    for raw in source.split(","):
        raw = raw.strip()
        if not raw:
            raise LayershapError(f"--data {source!r} has an empty part; write e.g. c4,wiki or c4:2,wiki:1")
        found = _WEIGHT.match(raw)
        name, weight = (found["name"], found["weight"]) if found else (raw, "1")
        try:
            value = float(weight)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value <= 0:
            raise LayershapError(f"--data part {raw!r} has weight {weight!r}; a weight is a positive number, "
                                 "as in c4:2,wiki:1")
        parts.append((name, value))
    names = [name for name, _ in parts]
    if len(set(names)) != len(names):
        raise LayershapError(f"--data {source!r} names a text twice; give each part once with its weight")
    return parts


def mixture_counts(weights, samples: int) -> list[int]:
    """Windows per part, in proportion to the weights, rounded by largest remainders (ties to the earlier
    part); every part gets at least one window or a LayershapError says there are too few."""
    if samples < len(weights):
        raise LayershapError(f"--samples {samples} is too few for a mixture of {len(weights)} texts; give at "
                             f"least {len(weights)}")
    share = np.asarray(weights, dtype=float) / float(sum(weights)) * samples
    counts = np.floor(share).astype(int)
    order = sorted(range(len(weights)), key=lambda i: (-(share[i] - counts[i]), i))
    for i in order[:samples - int(counts.sum())]:
        counts[i] += 1
    if (counts == 0).any():
        empty = [i for i in range(len(weights)) if counts[i] == 0]
        raise LayershapError(f"--samples {samples} leaves part {empty[0] + 1} of the mixture without a window; "
                             "give more --samples or a larger weight")
    return counts.tolist()


def mixture_name(parts) -> str:
    """The canonical name of a mixture: `c4,wiki` when the weights are equal, else `c4:2,wiki:1`."""
    if len({weight for _, weight in parts}) == 1:
        return ",".join(name for name, _ in parts)
    return ",".join(f"{name}:{weight:g}" for name, weight in parts)


def mixture_texts(source: str) -> list[str]:
    """The texts a `--data` value draws from: its parts, or the one text."""
    mixture = parse_mixture(source)
    return [source] if mixture is None else [name for name, _ in mixture]


def contiguous_windows(source: str, tokenizer, *, samples: int, seq_len: int, start_char: int = 0) -> TextWindows:
    """The first `samples` back-to-back windows of `seq_len` tokens from character `start_char` on.

    For reproducing published setups ("the first 8 windows of 128 tokens of C4"); `text_windows` is the
    everyday choice.
    """
    text = load_text(source)[start_char:]
    ids = tokenize(text, tokenizer)
    if len(ids) < samples * seq_len:
        raise LayershapError(f"text {source!r} from character {start_char} has {len(ids)} tokens; "
                             f"{samples} windows of {seq_len} need {samples * seq_len}")
    rows = ids[:samples * seq_len].reshape(samples, seq_len)
    return TextWindows(torch.from_numpy(rows.copy()).long(), f"{source}@{start_char}", "contiguous", 0)


def tokenize(text: str, tokenizer) -> np.ndarray:
    """Token ids of the whole text, without special tokens (windows start mid-text, without BOS).

    Memoised per (text, tokenizer): calibration and evaluation windows of one text share one pass.
    """
    key = (hashlib.sha256(text.encode()).hexdigest(), id(tokenizer))
    hit = _TOKEN_CACHE.get(key)
    if hit is None:
        hit = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
        if len(_TOKEN_CACHE) > 16:
            _TOKEN_CACHE.clear()
        _TOKEN_CACHE[key] = hit
    return hit


_TOKEN_CACHE: dict = {}


def load_text(source: str) -> str:
    """The raw text behind a source name (see the module docstring for the three kinds)."""
    path = Path(source).expanduser()
    if path.suffix in (".txt", ".jsonl", ".json") or path.exists() or "/" in source:
        return _read_local(path, source)
    if source in PACKAGED_TEXTS:
        return _read_packaged(source)
    hub_name = source.removeprefix("hf:")
    if hub_name in HUB_TEXTS and (source.startswith("hf:") or hub_name not in PACKAGED_TEXTS):
        return _read_hub(hub_name)
    raise LayershapError(
        f"unknown data {source!r}; give a .txt or .jsonl file, a packaged text ({', '.join(PACKAGED_TEXTS)}), "
        f"or a Hugging Face dataset ({', '.join(sorted({'wikitext2', 'ptb', 'hf:c4'}))})"
    )


def _read_local(path: Path, source: str) -> str:
    if not path.is_file():
        raise LayershapError(f"data file {source} does not exist; give an existing .txt or .jsonl file")
    raw = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise LayershapError(f"{source} line {number} is not valid JSON; each line needs "
                                     '{"text": "..."}') from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise LayershapError(f'{source} line {number} has no "text" string field')
            texts.append(record["text"])
        raw = "\n\n".join(texts)
    if not raw.strip():
        raise LayershapError(f"data file {source} is empty; give a file with text in it")
    return raw


@lru_cache(maxsize=8)
def _read_packaged(name: str) -> str:
    spec = importlib.util.find_spec(PACKAGED_TEXT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LayershapError(f"packaged text {name!r} needs the {PACKAGED_TEXT_PACKAGE} package: "
                             f"pip install --no-deps {PACKAGED_TEXT_PACKAGE}")
    root = Path(next(iter(spec.submodule_search_locations)))
    path = root / "conversion" / "standard_cal_data" / PACKAGED_TEXTS[name]
    if not path.is_file():
        raise LayershapError(f"the installed {PACKAGED_TEXT_PACKAGE} has no {path.name}; reinstall it with "
                             f"pip install --force-reinstall --no-deps {PACKAGED_TEXT_PACKAGE}")
    return path.read_text(encoding="utf-8")


def _read_hub(name: str) -> str:
    try:
        import datasets
    except ImportError:
        raise LayershapError(f"data {name!r} comes from the Hugging Face Hub and needs the datasets package: "
                             "pip install 'layershap[data]'") from None
    path, config, split, field = HUB_TEXTS[name]
    try:
        if name == "c4":
            ds = datasets.load_dataset(path, data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
                                       split="validation")
        else:
            ds = datasets.load_dataset(path, config, split=split)
    except Exception as exc:  # noqa: BLE001 - any hub failure means the same thing to the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LayershapError(f"could not load {name!r} from the Hugging Face Hub ({first}); without the "
                             f"hub use a packaged text ({', '.join(PACKAGED_TEXTS)}) or a local file") from None
    return "\n\n".join(ds[field])
