"""shapiq's estimators as pruning methods: plans, budgets, protect, determinism, the cache, and exact values on an
additive game."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from tiny_models import VOCAB, tiny_model

from layershap.errors import LayershapError
from layershap.estimate.pipeline import EstimateSettings
from layershap.game.layer_game import LayerGame, get_utility
from layershap.plan.methods import METHODS, select_layers
from layershap.plan.methods.shapiq_estimators import ESTIMATORS, estimate_shapiq, shapiq_game

shapiq = pytest.importorskip("shapiq")

BUDGET = 12  # on 6 blocks: at least n + 1, well below 2^6


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))


def test_registered():
    assert set(ESTIMATORS) == {"kernelshap", "permutation", "stratified", "svarm", "kadd"}
    assert set(ESTIMATORS) <= set(METHODS)


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_plan_budget_protect_and_seed(name, model, tokens):
    plan = select_layers(name, model, tokens, 2, protect=[0, 5], budget=BUDGET, seed=3)
    again = select_layers(name, model, tokens, 2, protect=[0, 5], budget=BUDGET, seed=3)

    assert plan.method == name and plan.n_layers == 6
    assert len(plan.remove) == 2 and len(set(plan.remove)) == 2
    assert not {0, 5} & set(plan.remove)
    assert 2 <= plan.forward_passes <= BUDGET  # the full and empty models at least
    assert plan.forward_passes == plan.details["evaluations"] <= plan.details["requests"]
    assert len(plan.scores) == 6 and all(np.isfinite(plan.scores))
    assert (again.remove, again.scores, again.forward_passes) == (plan.remove, plan.scores, plan.forward_passes)
    # the plan removes the lowest-valued blocks among the unprotected ones
    free = sorted((plan.scores[i], -i) for i in range(1, 5))
    assert plan.remove == sorted(-j for _, j in free[:2])


def test_budget_and_seed_from_settings(model, tokens):
    settings = EstimateSettings(budget=9, seed=1, utility="log_ratio")
    plan = select_layers("permutation", model, tokens, 1, settings=settings, store="ignored")
    assert plan.details["budget"] == 9 and plan.details["seed"] == 1 and plan.details["utility"] == "log_ratio"
    assert plan.forward_passes <= 9
    assert plan.details["full"] == pytest.approx(0.0)  # log_ratio: the full model is worth 0


def test_budget_too_small(model, tokens):
    with pytest.raises(LayershapError, match="at least 7 evaluations"):
        select_layers("kernelshap", model, tokens, 1, budget=6)


def test_missing_shapiq_is_one_clear_error(model, tokens, monkeypatch):
    monkeypatch.setitem(sys.modules, "shapiq", None)  # import shapiq now raises ImportError
    game = LayerGame(model, tokens)
    with pytest.raises(LayershapError, match=r"pip install 'layershap\[shapiq\]'"):
        select_layers("svarm", model, tokens, 1, budget=BUDGET)
    with pytest.raises(LayershapError, match="shapiq"):
        shapiq_game(game)
    assert game.forward_passes == 0


def test_shapiq_game_is_normalised_and_cached(model, tokens):
    game = LayerGame(model, tokens)
    wrapped = shapiq_game(game)
    assert isinstance(wrapped, shapiq.Game)
    assert game.forward_passes == 2  # the full model (base NLL) and the empty one (normalisation)
    empty, full = np.zeros(6, dtype=bool), np.ones(6, dtype=bool)
    values = wrapped(np.stack([empty, full, full]))
    assert values[0] == 0.0
    assert values[1] == values[2] == pytest.approx(wrapped.full_value - wrapped.empty_value)
    assert game.forward_passes == 2  # nothing evaluated twice
    # the empty model's NLL is bounded like a diverged one's, so its utility is finite
    assert np.isfinite(wrapped.empty_value) and wrapped.empty_value >= -(game.base_nll + 20.0)


class AdditiveGame(LayerGame):
    """A layer game without a model: NLL = 2 + sum of the weights of the dropped blocks."""

    def __init__(self, weights):
        self.weights = np.asarray(weights, dtype=float)
        self.n_players = len(self.weights)
        self.utility = get_utility("neg_nll")
        self.forward_passes = 0
        self._base_nll = None

    def nll(self, mask) -> float:
        self.forward_passes += 1
        return 2.0 + float(self.weights[~np.asarray(mask, dtype=bool)].sum())


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_additive_game_values_are_exact(name):
    weights = [0.5, 0.1, 0.9, 0.05, 0.3, 0.7]
    game = AdditiveGame(weights)
    found = estimate_shapiq(game, name, budget=64, seed=0)  # 2^6: every estimator can see every coalition
    np.testing.assert_allclose(found["values"], weights, atol=1e-6)
    assert found["evaluations"] == game.forward_passes <= 64
