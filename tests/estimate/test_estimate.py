"""The estimate pipeline on tiny models: reuse, resume after SIGKILL, determinism, accuracy, bad input."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import run_cli
from tiny_models import VOCAB, tiny_model

from layershap.data.windows import TextWindows
from layershap.errors import LayershapError
from layershap.estimate.pipeline import EstimateSettings, estimate, preset_settings
from layershap.estimate.shapley import exact_shapley
from layershap.game.layer_game import LayerGame
from layershap.game.store import EvaluationStore, open_store


def _windows(samples=4, seq_len=24, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return TextWindows(torch.randint(0, VOCAB, (samples, seq_len), generator=generator), "random", "calibration", 0)


def test_second_run_reuses_everything_and_larger_budget_only_adds(tmp_path):
    model = tiny_model("llama")
    game = LayerGame(model, _windows())
    with open_store(model, tmp_path / "s.sqlite") as store:
        first = estimate(game, store, EstimateSettings(budget=30, budget_unit="masks", sampler="shapley"))
        assert (first.evaluations, first.reused) == (30, 0)
        passes = game.forward_passes
        again = estimate(game, store, EstimateSettings(budget=30, budget_unit="masks", sampler="shapley"))
        assert (again.evaluations, again.reused) == (0, 30) and game.forward_passes == passes
        np.testing.assert_array_equal(first.shapley, again.shapley)
        bigger = estimate(game, store, EstimateSettings(budget=45, budget_unit="masks", sampler="shapley"))
        assert (bigger.evaluations, bigger.reused) == (15, 30)


def test_switching_utility_reuses_stored_nlls(tmp_path):
    model = tiny_model("llama")
    with open_store(model, tmp_path / "s.sqlite") as store:
        estimate(LayerGame(model, _windows()), store, EstimateSettings(budget=25))
        ratio = estimate(LayerGame(model, _windows(), utility="ppl_ratio"), store,
                         EstimateSettings(budget=25, utility="ppl_ratio"))
    assert ratio.evaluations == 0 and np.all(ratio.utilities <= 1.5)


def test_diverged_masks_are_kept_with_bounded_utility(tmp_path):
    model = tiny_model("llama")
    game = LayerGame(model, _windows())
    with open_store(model, tmp_path / "s.sqlite") as store:
        result = estimate(game, store, EstimateSettings(budget=20))
        context = next(iter(store._db.execute("SELECT context FROM evaluations LIMIT 1")))[0]
        broken = result.masks[3]
        store.put(context, broken, float("nan"), 0.0)
        again = estimate(game, store, EstimateSettings(budget=20))
    assert len(again.utilities) == len(again.masks) == len(result.masks)
    assert np.isfinite(again.utilities).all()
    assert again.utilities[3] == pytest.approx(-(again.base_nll + 20.0))


@pytest.mark.parametrize("seed", [3, 5])
def test_estimate_recovers_exact_shapley_of_a_tiny_model(tmp_path, seed):
    """All 2^6 masks give the exact game. A budget covering them all must reproduce it; 48 of 64 masks must
    come within 15% of the largest value (measured: 7-10%) and find the least valuable layer."""
    model = tiny_model("llama", seed=seed)
    game = LayerGame(model, _windows(samples=2, seq_len=16))
    truth = exact_shapley(lambda masks: np.array([game(m) for m in masks]), 6)
    with open_store(model, tmp_path / "s.sqlite") as store:
        full = estimate(game, store, EstimateSettings(budget=64, sampler="shapley"))
        partial = estimate(game, store, EstimateSettings(budget=48, sampler="shapley"))
    assert full.evaluations == 64 and full.shapley_method == "exact"
    np.testing.assert_allclose(full.shapley, truth, atol=1e-9)
    assert np.abs(partial.shapley - truth).max() <= 0.15 * np.abs(truth).max(), (partial.shapley, truth)
    assert np.argmin(partial.shapley) == np.argmin(truth)


def test_bad_settings():
    with pytest.raises(LayershapError, match="too small"):
        EstimateSettings(budget=5).check(6)
    with pytest.raises(LayershapError, match="unknown sampler"):
        EstimateSettings(sampler="nope").check(6)
    with pytest.raises(LayershapError, match="unknown surrogate"):
        EstimateSettings(surrogate="nope").check(6)
    with pytest.raises(LayershapError, match="unknown preset"):
        preset_settings("nope")
    with pytest.raises(LayershapError, match="unknown utility"):
        LayerGame(tiny_model("llama"), _windows(), utility="nope")


def test_paper_preset_is_the_official_pipeline():
    paper = preset_settings("paper")
    assert paper == {"budget": 8000, "budget_unit": "masks", "sampler": "paper", "surrogate": "paper", "utility": "ppl_ratio",
                     "shapley_samples": 20000, "plan": "lowest", "samples": 10, "seq_len": 128}


def _estimate_args(model_dir, text, store, out, budget):
    return ["estimate", "--model", model_dir, "--data", text, "--samples", "8", "--seq-len", "96",
            "--budget", budget, "--store", store, "--out", out]


def test_cli_estimate_bad_input(capsys, tiny_model_dir, long_text_file, tmp_path):
    code, _, err = run_cli(_estimate_args(tiny_model_dir, long_text_file, tmp_path / "s", tmp_path / "o", 3), capsys)
    assert code == 2 and "too small" in err and len(err.strip().splitlines()) == 1
    corrupt = tmp_path / "corrupt.sqlite"
    corrupt.write_bytes(b"garbage" * 1000)
    code, _, err = run_cli(_estimate_args(tiny_model_dir, long_text_file, corrupt, tmp_path / "o", 30), capsys)
    assert code == 2 and "not a layershap evaluation store" in err
    assert corrupt.read_bytes() == b"garbage" * 1000
    code, _, err = run_cli(_estimate_args(tiny_model_dir, long_text_file, tmp_path / "s", tmp_path / "o", 30)
                           + ["--preset", "nope"], capsys)
    assert code == 2 and "unknown preset" in err


def test_cli_dry_run_runs_nothing(capsys, tiny_model_dir, long_text_file, tmp_path):
    code, out, err = run_cli(_estimate_args(tiny_model_dir, long_text_file, tmp_path / "s.sqlite", tmp_path / "o", 30)
                             + ["--dry-run"], capsys)
    assert code == 0, err
    masks = int(out.split("would run ")[1].split()[0])
    full_size = float(out.split(" = ")[1].split()[0])
    assert masks > 30 and 29 < full_size <= 30  # masks keep fewer blocks than the full model
    assert not (tmp_path / "o").exists()
    rows = sqlite3.connect(tmp_path / "s.sqlite").execute("SELECT COUNT(*) FROM evaluations").fetchone()[0]
    assert rows == 0


def test_sigkill_mid_run_resumes_to_the_same_result(tiny_model_dir, long_text_file, tmp_path):
    """Kill a real `layershap estimate` process while it evaluates, rerun it, and compare with a clean run."""
    budget = 60
    env = {**os.environ, "LAYERSHAP_NO_PROGRESS": "1"}
    store = tmp_path / "killed.sqlite"
    command = [sys.executable, "-m", "layershap", *map(str, _estimate_args(
        tiny_model_dir, long_text_file, store, tmp_path / "killed", budget))]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    rows = 0
    while time.time() < deadline and process.poll() is None:
        if store.exists():
            try:
                rows = sqlite3.connect(store).execute("SELECT COUNT(*) FROM evaluations").fetchone()[0]
            except sqlite3.OperationalError:
                rows = 0
            if rows >= 5:
                break
        time.sleep(0.02)
    assert process.poll() is None, f"the run ended before it could be killed: {process.stderr.read()}"
    process.send_signal(signal.SIGKILL)
    process.wait()
    survived = sqlite3.connect(store).execute("SELECT COUNT(*) FROM evaluations").fetchone()[0]
    assert survived >= 5
    resumed = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    assert resumed.returncode == 0, resumed.stderr
    clean = subprocess.run([sys.executable, "-m", "layershap", *map(str, _estimate_args(
        tiny_model_dir, long_text_file, tmp_path / "clean.sqlite", tmp_path / "clean", budget))],
        env=env, capture_output=True, text=True, check=False)
    assert clean.returncode == 0, clean.stderr
    a = json.loads((tmp_path / "killed" / "shapley.json").read_text())
    b = json.loads((tmp_path / "clean" / "shapley.json").read_text())
    assert survived < a["masks"] == b["masks"]
    assert (a["evaluations"], a["reused"]) == (a["masks"] - survived, survived)
    assert [e["shapley"] for e in a["layers"]] == [e["shapley"] for e in b["layers"]]
    assert EvaluationStore(store, model_fp=a["model_fingerprint"], n_layers=6).count() == a["masks"]
