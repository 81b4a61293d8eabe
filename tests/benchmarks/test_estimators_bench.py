"""benchmarks/estimators.py: its layershap adapter is the library's estimate, its games' exact values are
right, and every estimator it races recovers exact values when the budget covers every coalition."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import VOCAB, tiny_model

from layershap.estimate.pipeline import EstimateSettings, estimate_from_measurements, sample_masks
from layershap.estimate.shapley import exact_shapley
from layershap.game.layer_game import LayerGame

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
import estimators as bench

N = 6


def test_adapter_is_estimate_from_measurements_on_a_layer_game():
    """Below the full budget the surrogate matters; the adapter must give the library's values exactly."""
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    game = LayerGame(tiny_model("llama"), tokens)
    settings = EstimateSettings(budget=24, sampler="shapley", seed=3)
    masks = sample_masks(settings, N)
    nlls = np.array([game.nll(m) for m in masks])
    library = estimate_from_measurements(game.utility, masks, nlls, settings).shapley

    utility_of = {m.tobytes(): game.utility(nll, nlls[0]) for m, nll in zip(masks, nlls)}
    adapter = bench.layershap_values(lambda ms: np.array([utility_of[m.tobytes()] for m in ms]), N, 24, 3)
    np.testing.assert_allclose(adapter, library, rtol=0, atol=1e-12)


def test_pairwise_game_analytic_values_match_enumeration():
    game = bench.pairwise_game(N, seed=1)
    np.testing.assert_allclose(game.exact, exact_shapley(game.value_fn, N), atol=1e-12)


def test_soum_exact_values_agree_with_enumeration():
    pytest.importorskip("shapiq_games")
    bench.soum_game("soum", N, seed=0, max_size=3)  # raises if shapiq's values and enumeration disagree


@pytest.mark.parametrize("estimator", ["layershap", "layershap-target", "kernelshap", "kadd"])
def test_full_budget_recovers_exact_values(estimator):
    if estimator not in bench.LAYERSHAP_VARIANTS:
        pytest.importorskip("shapiq")
    game = bench.collapse_game(N, seed=0)
    result = bench.run_one(game, estimator, budget=1 << N, seed=0)
    assert result["evaluations"] <= 1 << N
    assert result["rel_mse"] < 1e-10 and result["spearman"] == pytest.approx(1.0) and result["bottom_k"] == 1.0


def test_accuracy_metrics():
    exact = np.array([0.1, 0.5, 0.2, 0.9, 0.4, 0.3, 0.7, 0.8])
    assert bench.accuracy(exact, exact, 2) == {"rel_mse": 0.0, "rel_mse_centered": 0.0, "spearman": 1.0,
                                               "bottom_k": 1.0}
    shifted = bench.accuracy(exact + 0.3, exact, 2)  # an error every player shares changes no ranking
    assert shifted["rel_mse"] > 1 and shifted["rel_mse_centered"] == pytest.approx(0.0, abs=1e-12)
    swapped = exact.copy()
    swapped[[0, 3]] = swapped[[3, 0]]  # the lowest player now looks like the highest
    assert bench.accuracy(swapped, exact, 2)["bottom_k"] == 0.5
