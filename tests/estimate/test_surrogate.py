"""Surrogates: fit quality on a synthetic layer game, determinism, the paper's exact training recipe."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from layershap.errors import LayershapError
from layershap.estimate.sampling import get_sampler
from layershap.estimate.shapley import analytic_shapley, exact_shapley
from layershap.estimate.surrogate import (
    SURROGATES,
    EnsembleMLP,
    PaperMLP,
    RidgeSurrogate,
    Surrogate,
    held_out_fit,
    make_surrogate,
)

N = 10
FAST = {"ensemble": {"epochs": 300}}  # keep the suite quick; defaults train longer


def synthetic_game(n=N, seed=0):
    """Additive weights plus three pairwise interactions: a second-order game."""
    rng = np.random.default_rng(seed)
    w = rng.uniform(0.2, 1.0, n)
    pairs = [(0, 1, 1.0), (2, 5, -0.8), (3, 7, 0.6)]

    def v(masks):
        x = np.asarray(masks, dtype=float)
        return x @ w + sum(c * x[:, a] * x[:, b] for a, b, c in pairs)

    return v, w, pairs


@pytest.fixture(scope="module")
def data():
    v, _, _ = synthetic_game()
    masks = get_sampler("shapley").masks(N, 300, seed=1)
    noise = np.random.default_rng(2).normal(0, 0.01, len(masks))
    return masks, v(masks) + noise


def test_registry_and_protocol():
    assert set(SURROGATES) >= {"paper", "linear", "pairwise", "ensemble"}
    for name in SURROGATES:
        assert isinstance(make_surrogate(name, N, 0), Surrogate)
    with pytest.raises(LayershapError) as err:
        make_surrogate("gp", N, 0)
    assert "pairwise" in str(err.value)


@pytest.mark.parametrize("name", ["pairwise", "ensemble"])
def test_second_order_surrogates_fit_the_game_on_held_out_masks(data, name):
    masks, y = data
    report = held_out_fit(name, masks, y, seed=0, **FAST.get(name, {}))
    assert report["n_train"] == 240 and report["n_holdout"] == 60
    assert report["r2"] > 0.9 and report["spearman"] > 0.9
    assert report["mae"] < 0.2


def test_linear_fits_the_additive_part(data):
    masks, y = data
    report = held_out_fit("linear", masks, y, seed=0)
    assert 0.8 < report["r2"] < 0.995  # cannot represent the interactions exactly
    _, w, _ = synthetic_game()
    additive_only = make_surrogate("linear", N, 0).fit(masks, masks.astype(float) @ w)
    assert np.allclose(additive_only.shapley_values(), w, atol=1e-3)


def test_paper_mlp_learns_something():
    # The official recipe takes few SGD steps on small data (300 epochs of ceil(N/300) batches), so it is
    # the weakest surrogate here; give it 600 masks and ask only for a clearly positive rank correlation.
    v, _, _ = synthetic_game()
    masks = get_sampler("shapley").masks(N, 600, seed=1)
    report = held_out_fit("paper", masks, v(masks), seed=0)
    assert report["spearman"] > 0.5


@pytest.mark.parametrize("name", sorted(SURROGATES))
def test_deterministic_with_seed(data, name):
    masks, y = data
    probe = get_sampler("shapley").masks(N, 50, seed=9)
    options = FAST.get(name, {})
    a = make_surrogate(name, N, 3, **options).fit(masks, y).predict(probe)
    b = make_surrogate(name, N, 3, **options).fit(masks, y).predict(probe)
    assert a.shape == (50,) and np.array_equal(a, b)
    model = make_surrogate(name, N, 3, **options)
    model.fit(masks[:100], y[:100])
    assert np.array_equal(model.fit(masks, y).predict(probe), a)  # a refit starts afresh
    if name in ("paper", "ensemble"):
        c = make_surrogate(name, N, 4, **options).fit(masks, y).predict(probe)
        assert not np.array_equal(a, c)


def test_fitting_leaves_global_torch_state_alone(data):
    masks, y = data
    threads = torch.get_num_threads()
    state = torch.random.get_rng_state()
    make_surrogate("paper", N, 0, epochs=3).fit(masks, y)
    make_surrogate("ensemble", N, 0, epochs=3).fit(masks, y)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.get_num_threads() == threads


def test_paper_mlp_uses_the_official_recipe(data):
    masks, y = data
    model = PaperMLP(N, seed=0)
    layers = list(model.net)
    assert [type(m) for m in layers] == [torch.nn.Linear, torch.nn.CELU, torch.nn.Linear, torch.nn.Sigmoid]
    assert (layers[0].in_features, layers[0].out_features) == (N, 2 * N)
    assert (layers[2].in_features, layers[2].out_features) == (2 * N, 1)
    ratio = np.exp(0.2 * (y - y.max()))  # a perplexity-ratio-like utility in (0, 1]
    model.fit(masks, ratio)
    opt, sched = model.optimizer_, model.scheduler_
    assert isinstance(opt, torch.optim.SGD) and isinstance(sched, torch.optim.lr_scheduler.StepLR)
    group = opt.param_groups[0]
    assert group["initial_lr"] == 0.008 and group["momentum"] == 0.9
    assert (sched.step_size, sched.gamma) == (100, 0.1)
    assert group["lr"] == pytest.approx(0.008 * 0.1 ** 3)   # 300 epochs, three decays
    assert model.batch_size == 300 and len(model.losses_) == 300
    assert model.scale == (0.0, 1.0)                         # (0, 1] targets are used as-is
    assert model.losses_[-1] < model.losses_[0]


def test_paper_mlp_scales_targets_outside_unit_interval(data):
    masks, y = data
    shifted = -10.0 - y                  # a neg_nll-like utility, all negative
    model = PaperMLP(N, seed=0, epochs=20).fit(masks, shifted)
    assert model.scale == (pytest.approx(shifted.min()), pytest.approx(shifted.max() - shifted.min()))
    pred = model.predict(masks)
    assert np.all(pred >= shifted.min()) and np.all(pred <= shifted.max())


def test_pairwise_analytic_shapley_matches_exact_on_its_own_predictions(data):
    masks, y = data
    model = make_surrogate("pairwise", N, 0).fit(masks, y)
    assert isinstance(model, RidgeSurrogate)
    analytic = analytic_shapley(model)
    assert analytic.method == "analytic"
    exact = exact_shapley(model.predict, N)
    assert np.allclose(analytic.values, exact, atol=1e-9)
    full, empty = model.predict(np.ones((1, N), bool))[0], model.predict(np.zeros((1, N), bool))[0]
    assert analytic.values.sum() == pytest.approx(full - empty)
    # and it recovers the game's own Shapley values
    v, _, _ = synthetic_game()
    assert np.allclose(analytic.values, exact_shapley(v, N), atol=0.02)


def test_pairwise_predict_matches_its_feature_expansion(data):
    masks, y = data
    model = RidgeSurrogate(N, 0, pairwise=True, alpha=0.1).fit(masks, y)
    coef = np.concatenate([model.weights, model.interactions[np.triu_indices(N, 1)]])
    assert np.allclose(model.predict(masks), model.features(masks) @ coef + model.intercept)
    assert model.alpha_ == 0.1


def test_pairwise_cross_validation_picks_an_alpha_from_the_grid(data):
    masks, y = data
    model = make_surrogate("pairwise", N, 0).fit(masks, y)
    assert model.alpha_ in model.alphas and set(model.cv_mse_) == set(model.alphas)
    assert model.cv_mse_[model.alpha_] == min(model.cv_mse_.values())


def test_ensemble_reports_disagreement(data):
    masks, y = data
    model = EnsembleMLP(N, seed=0, epochs=300).fit(masks, y)
    probe = get_sampler("shapley").masks(N, 40, seed=5)
    std = model.predict_std(probe)
    assert std.shape == (40,) and np.all(std >= 0) and std.max() > 0
    assert len(model.oob_mse_) == model.members


def test_bad_training_data_raises():
    model = make_surrogate("linear", 4, 0)
    with pytest.raises(LayershapError, match="3 masks but 2"):
        model.fit(np.ones((3, 4), bool), [1.0, 2.0])
    with pytest.raises(LayershapError, match="finite"):
        model.fit(np.ones((3, 4), bool), [1.0, np.inf, 2.0])
    with pytest.raises(LayershapError, match=r"\[coalitions, 4\]"):
        model.fit(np.ones((3, 5), bool), [1.0, 2.0, 3.0])
