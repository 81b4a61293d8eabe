"""A full disk, on a small filesystem the test mounts itself (a size-limited tmpfs): the store's commit and
`save_pretrained`'s output end in one line and exit code 2, and the evaluation store is still readable.

Mounting needs root and CAP_SYS_ADMIN (CI runs as root in a container that allows it); elsewhere the tests
skip and say why.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import run_cli_quietly


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs mounted for this test (unmounted after it)."""
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command: cannot make a small filesystem")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0755", "tmpfs", str(mountpoint)],
                          check=False, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip() or done.returncode}); needs root "
                    "with CAP_SYS_ADMIN")
    try:
        yield mountpoint
    finally:
        if subprocess.run(["umount", str(mountpoint)], check=False, capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mountpoint)], check=False, capture_output=True)


def fill(disk: Path, leave: int) -> Path:
    """Write a filler file until the disk is full, then give back `leave` bytes (whole pages)."""
    filler = disk / "filler"
    chunk = b"\0" * (4 << 10)
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        while True:
            os.write(fd, chunk)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)
    written = filler.stat().st_size
    with open(filler, "r+b") as out:
        out.truncate(max(0, written - leave))
    assert shutil.disk_usage(disk).free <= leave + (4 << 10)
    return filler


def _one_line(code: int, err: str, *words: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and "━" not in line and "masks" not in line]
    assert "Traceback" not in err, err
    assert code == 2 and len(lines) == 1 and lines[0].startswith("layershap: error: "), (code, err)
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def _stored(store: Path, model_dir) -> dict[str, float]:
    """Every stored NLL, read back through layershap (a fresh open, as the next run would)."""
    import layershap
    from layershap.game.store import open_store

    model, _ = layershap.load_model(str(model_dir))
    with open_store(model, store) as db:
        return {context: db.all_nlls(context) for context in db._execute(
            "SELECT DISTINCT context FROM evaluations").fetchall()[0]}


def _estimate(model_dir, text, store, out, *, seed: int, budget: int):
    return ["estimate", "--model", model_dir, "--data", text, "--samples", "1", "--seq-len", "8", "--budget",
            str(budget), "--seed", str(seed), "--store", store, "--out", out]


@pytest.mark.parametrize("leave", [0, 48 << 10], ids=["nothing-left", "48KiB-left"])
def test_a_full_disk_under_the_store_is_one_line_and_the_store_stays_readable(small_disk, tmp_path, leave,
                                                                                tiny_model_dir, sample_text_file):
    store = small_disk / "s.sqlite"
    code, err = run_cli_quietly(_estimate(tiny_model_dir, sample_text_file, store, tmp_path / "first", seed=0, budget=20))
    assert code == 0, err
    before = _stored(store, tiny_model_dir)
    assert sum(map(len, before.values())) >= 20
    filler = fill(small_disk, leave)
    code, err = run_cli_quietly(_estimate(tiny_model_dir, sample_text_file, store, tmp_path / "second", seed=1, budget=400))
    _one_line(code, err, str(store), "is full")
    filler.unlink()
    after = _stored(store, tiny_model_dir)
    for context, rows in before.items():
        assert {key: after[context][key] for key in rows} == rows  # nothing lost or changed
    import sqlite3

    with contextlib.closing(sqlite3.connect(store)) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


@pytest.mark.parametrize("command", ["prune", "quantize"])
def test_a_full_disk_under_the_saved_model_is_one_line(command, small_disk, tmp_path, tiny_model_dir,
                                                       sample_text_file):
    """The output folder passes its probe (some space is left) and then the model's weights do not fit; the
    run's store (on another disk) keeps what the run measured."""
    if command == "quantize":
        pytest.importorskip("torchao")
    store = tmp_path / "s.sqlite"
    out = small_disk / "out"
    held_out = ["--eval-data", sample_text_file, "--eval-samples", "1", "--eval-seq-len", "8"]
    if command == "prune":
        calibration = ["--model", tiny_model_dir, "--data", sample_text_file, "--samples", "1", "--seq-len", "8",
                       "--budget", "20", "--store", store]
        argv = ["prune", *calibration, "--ratio", "0.34", "--method", "shapley", *held_out, "--out", out]
        code, err = run_cli_quietly(["estimate", *calibration, "--out", tmp_path / "estimate"])
        assert code == 0, err
        before = _stored(store, tiny_model_dir)
    else:
        argv = ["quantize", "--model", tiny_model_dir, "--scheme", "int8", *held_out, "--out", out]
    fill(small_disk, 64 << 10)  # the weights (about 150 KiB) do not fit
    code, err = run_cli_quietly(argv)
    _one_line(code, err, str(out), "the disk is full")
    if command == "prune":
        after = _stored(store, tiny_model_dir)
        assert all({key: after[c][key] for key in rows} == rows for c, rows in before.items())


def test_fill_leaves_what_it_was_asked(small_disk):
    """The helper itself: what is left after `fill` is what was asked for, to a page."""
    fill(small_disk, 48 << 10)
    fd, written = os.open(small_disk / "more", os.O_WRONLY | os.O_CREAT), 0
    try:
        while True:
            written += os.write(fd, bytes(4 << 10))
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    assert 44 << 10 <= written <= 52 << 10
