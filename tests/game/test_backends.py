"""Evaluation backends: local by default; Ray gives the same stored NLLs and Shapley values, survives a worker
that dies mid-batch, and refuses a bad address within seconds."""

import json
import logging
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
import torch
from conftest import run_cli
from tiny_models import VOCAB, tiny_model

from layershap.data.windows import TextWindows
from layershap.errors import LayershapError
from layershap.estimate.pipeline import EstimateSettings, estimate
from layershap.game.backends import active_backend, make_backend, use_backend
from layershap.game.backends.local import LocalBackend
from layershap.game.layer_game import LayerGame
from layershap.game.store import open_store


def _one_line_error(code, err, pattern):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert pattern in lines[0], lines[0]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_local_is_the_default_and_names_are_checked():
    assert isinstance(active_backend(), LocalBackend)
    local = make_backend("local")
    with use_backend(local):
        assert active_backend() is local
    assert isinstance(active_backend(), LocalBackend)
    with pytest.raises(LayershapError, match="unknown backend 'dask'"):
        make_backend("dask")
    with pytest.raises(LayershapError, match="--ray-address needs --backend ray"):
        make_backend("local", address="10.0.0.1:6379")


def test_local_backend_estimate_is_unchanged(tmp_path):
    """The default path through a backend measures exactly what the game measures."""
    model = tiny_model("llama")
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    game = LayerGame(model, TextWindows(tokens, "random", "calibration", 0))
    with open_store(model, tmp_path / "s.sqlite") as store, use_backend(LocalBackend()):
        result = estimate(game, store, EstimateSettings(budget=20))
    assert result.evaluations == len(result.masks) > 20  # 20 full-size passes buy more masks than 20
    assert result.nlls[3] == game.nll(result.masks[3])


def test_address_parsing():
    from layershap.game.backends.ray_backend import host_and_port

    assert host_and_port("10.0.0.5:6379") == ("10.0.0.5", 6379)
    assert host_and_port("ray://head.example:10001") == ("head.example", 10001)
    assert host_and_port("head") == ("head", 6379)
    assert host_and_port("[::1]:7000") == ("::1", 7000)
    assert host_and_port("auto") is None
    with pytest.raises(LayershapError, match="no valid port"):
        host_and_port("head:abc")


def test_missing_ray_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(LayershapError, match=r"pip install 'layershap\[ray\]'"):
        make_backend("ray")


def test_unreachable_ray_address_fails_fast(capsys, tiny_model_dir, long_text_file, tmp_path):
    port = _closed_port()
    started = time.perf_counter()
    code, _, err = run_cli(["estimate", "--backend", "ray", "--ray-address", f"127.0.0.1:{port}", "--model",
                            tiny_model_dir, "--data", long_text_file, "--out", tmp_path / "o"], capsys)
    assert time.perf_counter() - started < 10
    expected = "no Ray cluster answers at" if _have_ray() else "pip install 'layershap[ray]'"
    _one_line_error(code, err, expected)
    code, _, err = run_cli(["prune", "--ratio", "0.3", "--backend", "ray", "--ray-address", "no-such-host.invalid:6379",
                            "--model", tiny_model_dir, "--out", tmp_path / "p"], capsys)
    _one_line_error(code, err, "no Ray cluster answers at" if _have_ray() else "pip install")


def _have_ray() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


RAY_CORE_LOG = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+ [DIWEF] \d+ \d+\] ")


@pytest.mark.skipif(not _have_ray(), reason="ray is not installed (pip install 'layershap[ray]')")
def test_open_port_that_is_not_ray_times_out(tiny_model_dir, tmp_path):
    """Something listens but it is no Ray head: Ray itself would retry for minutes; we give up on a timeout."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    try:
        env = {**os.environ, "LAYERSHAP_RAY_JOIN_TIMEOUT": "3", "RAY_AUTH_MODE": "disabled"}
        started = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "layershap", "estimate", "--backend", "ray", "--ray-address",
                                 f"127.0.0.1:{listener.getsockname()[1]}", "--model", str(tiny_model_dir),
                                 "--out", str(tmp_path / "o")], capture_output=True, text=True, env=env,
                                timeout=120, check=False)
        assert time.perf_counter() - started < 60
    finally:
        listener.close()
    # Ray's C++ threads may still log a connection warning ("[2026-... W ...] rpc_client.h ...") after ours
    lines = [line for line in result.stderr.splitlines() if line.strip() and not RAY_CORE_LOG.match(line)]
    assert result.returncode == 2, result.stderr
    assert lines[-1].startswith("layershap: error:") and "no Ray cluster answered within 3 s" in lines[-1]
    assert "Traceback" not in result.stderr


def _estimate_args(model_dir, text, store, out):
    return ["estimate", "--model", model_dir, "--data", text, "--samples", "4", "--seq-len", "32", "--budget", "24",
            "--sampler", "shapley", "--store", store, "--out", out]


@pytest.mark.skipif(not _have_ray(), reason="ray is not installed (pip install 'layershap[ray]')")
def test_ray_matches_local_and_retries_a_dead_workers_batch(capsys, monkeypatch, tiny_model_dir, long_text_file,
                                                            tmp_path):
    """A local Ray cluster of 2 CPUs: the stored NLLs and the Shapley values equal the local backend's, one
    worker dies in the middle of a batch and only that batch is redone, and the store the Ray run wrote
    resumes under the local backend with no new evaluation."""
    import ray

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("LAYERSHAP_NO_PROGRESS", "1")
    code, _, err = run_cli(_estimate_args(tiny_model_dir, long_text_file, tmp_path / "local.sqlite",
                                          tmp_path / "local"), capsys)
    assert code == 0, err

    marker = tmp_path / "crashed"
    monkeypatch.setenv("LAYERSHAP_RAY_CRASH_ONCE", str(marker))
    temp_dir = tempfile.mkdtemp(prefix="lsray", dir="/tmp")  # Ray's socket paths must stay short
    try:
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp_dir, logging_level=logging.ERROR,
                 log_to_driver=False)
        address = ray.get_runtime_context().gcs_address
        code, _, err = run_cli(_estimate_args(tiny_model_dir, long_text_file, tmp_path / "ray.sqlite",
                                                tmp_path / "ray") + ["--backend", "ray", "--ray-address", address],
                                 capsys)
        assert code == 0, err
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert marker.exists(), "no worker died: the retry was not exercised"

    def stored(name):
        return dict(sqlite3.connect(tmp_path / name).execute("SELECT mask, nll FROM evaluations").fetchall())

    local, distributed = stored("local.sqlite"), stored("ray.sqlite")
    assert len(local) > 24 and local == distributed  # --budget 24 full-size passes: more masks than 24
    a = json.loads((tmp_path / "local" / "shapley.json").read_text())
    b = json.loads((tmp_path / "ray" / "shapley.json").read_text())
    assert a["layers"] == b["layers"] and (b["evaluations"], b["reused"]) == (len(local), 0)
    assert np.isfinite([e["shapley"] for e in b["layers"]]).all()

    code, _, err = run_cli(_estimate_args(tiny_model_dir, long_text_file, tmp_path / "ray.sqlite",
                                          tmp_path / "resumed"), capsys)
    assert code == 0, err
    resumed = json.loads((tmp_path / "resumed" / "shapley.json").read_text())
    assert (resumed["evaluations"], resumed["reused"]) == (0, len(local)) and resumed["layers"] == a["layers"]


def test_a_ray_worker_builds_the_drivers_game_with_its_utility_and_players():
    """The worker's game measures what the driver's does: the KL loss of --utility kl (its own dense reference),
    and sublayer players; its context is the driver's, so the driver accepts it. No cluster needed."""
    from layershap.game.backends.ray_backend import MaskWorker, game_options
    from layershap.game.context import measurement_context

    model = tiny_model("llama")
    tokens = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(0))
    for utility, granularity, n in (("kl", "block", 6), ("neg_nll", "sublayer", 12), ("kl", "sublayer", 12)):
        driver = LayerGame(model, tokens, utility=utility, batch_size=2, granularity=granularity)
        worker = MaskWorker.__new__(MaskWorker)
        worker.model, worker.error, worker.games, worker.crash_once = model, None, {}, None
        key = measurement_context(driver)
        assert worker.identity(key, tokens, 2, game_options(driver))["context"] == key
        masks = np.random.default_rng(0).random((5, n)) < 0.6
        values = [v for v, _ in worker.evaluate(key, tokens, masks, 2, game_options(driver))]
        assert values == [driver.nll(m) for m in masks]
