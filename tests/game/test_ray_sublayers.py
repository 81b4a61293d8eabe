"""`prune --granularity sublayer --backend ray` on a local 2-CPU Ray cluster: the workers build the sublayer
game, and the run equals the local backend's (the same stored losses, values, plan and held-out perplexity)."""

import json
import logging
import shutil
import sqlite3
import tempfile

import pytest
from conftest import run_cli


def _have_ray() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _have_ray(), reason="ray is not installed (pip install 'layershap[ray]')")
def test_ray_sublayer_prune_equals_local(capsys, monkeypatch, tiny_model_dir, long_text_file, tmp_path):
    import ray

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("LAYERSHAP_NO_PROGRESS", "1")

    def args(name):
        return ["prune", "--granularity", "sublayer", "--ratio", "0.25", "--budget", "40", "--model", tiny_model_dir,
                "--data", long_text_file, "--eval-data", long_text_file, "--samples", "2", "--seq-len", "16",
                "--eval-samples", "2", "--eval-seq-len", "16", "--store", tmp_path / f"{name}.sqlite",
                "--out", tmp_path / name]

    code, _, err = run_cli(args("local"), capsys)
    assert code == 0, err
    temp_dir = tempfile.mkdtemp(prefix="lsray", dir="/tmp")  # Ray's socket paths must stay short
    try:
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp_dir, logging_level=logging.ERROR,
                 log_to_driver=False)
        address = ray.get_runtime_context().gcs_address
        code, _, err = run_cli(args("ray") + ["--backend", "ray", "--ray-address", address], capsys)
        assert code == 0, err
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)

    def stored(name):
        return dict(sqlite3.connect(tmp_path / f"{name}.sqlite").execute("SELECT mask, nll FROM evaluations").fetchall())

    local, distributed = stored("local"), stored("ray")
    assert len(local) > 20 and local == distributed
    a = json.loads((tmp_path / "local" / "layershap.json").read_text())
    b = json.loads((tmp_path / "ray" / "layershap.json").read_text())
    assert a["removed_sublayers"] == b["removed_sublayers"] and a["ppl_after"] == b["ppl_after"]
    assert a["plan"]["shapley"] == b["plan"]["shapley"] and a["cost"] == b["cost"]
    config = (tmp_path / "ray" / "config.toml").read_text()
    assert 'backend = "ray"' in config, config  # the masks were measured by the Ray workers
