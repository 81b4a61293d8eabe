"""Shapley values: exact, sampled and analytic routes agree with games whose values are known."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from layershap.errors import LayershapError
from layershap.estimate.shapley import (
    ShapleyResult,
    analytic_shapley,
    exact_shapley,
    sampled_shapley,
    shapley_values,
    shapley_weights,
    surrogate_shapley,
)


def additive(weights):
    weights = np.asarray(weights, dtype=float)
    return lambda masks: masks.astype(float) @ weights


def with_interaction(weights, a, b, c):
    base = additive(weights)
    return lambda masks: base(masks) + c * (masks[:, a] & masks[:, b])


def brute_force_shapley(value_fn, n):
    """The textbook formula, one coalition at a time: a slow, independent reference."""
    phi = np.zeros(n)
    for code in range(1 << n):
        mask = np.array([(code >> j) & 1 for j in range(n)], dtype=bool)
        for i in np.flatnonzero(~mask):
            s = int(mask.sum())
            weight = math.factorial(s) * math.factorial(n - s - 1) / math.factorial(n)
            plus = mask.copy()
            plus[i] = True
            phi[i] += weight * (value_fn(plus[None])[0] - value_fn(mask[None])[0])
    return phi


def nonlinear_game(n, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=n)
    pair = rng.normal(size=(n, n))

    def v(masks):
        x = masks.astype(float)
        return x @ w + 0.3 * np.einsum("mi,ij,mj->m", x, pair, x) + np.sqrt(x.sum(1)) * (x[:, 0] + 1)

    return v


def test_weights_sum_to_one_over_coalitions():
    n = 7
    w = shapley_weights(n)
    assert math.isclose(sum(w[s] * math.comb(n - 1, s) for s in range(n)), 1.0)
    assert math.isclose(w[2], math.factorial(2) * math.factorial(4) / math.factorial(7))


def test_exact_matches_brute_force_on_a_nonlinear_game():
    v = nonlinear_game(6)
    assert np.allclose(exact_shapley(v, 6), brute_force_shapley(v, 6))


def test_additive_game_values_are_the_weights():
    weights = np.array([0.5, -1.0, 2.0, 0.0, 3.25, 1.5, -0.75, 0.1])
    assert np.allclose(exact_shapley(additive(weights), 8), weights)
    values, stderr = sampled_shapley(additive(weights), 8, samples_per_player=64, seed=0)
    # Every marginal equals the weight, so sampling is exact too, with no spread.
    assert np.allclose(values, weights) and np.allclose(stderr, 0)


def test_pairwise_interaction_is_split_equally():
    weights = np.linspace(-1, 1, 10)
    v = with_interaction(weights, 2, 7, c=3.0)
    expected = weights.copy()
    expected[[2, 7]] += 1.5
    assert np.allclose(exact_shapley(v, 10), expected)
    values, stderr = sampled_shapley(v, 10, samples_per_player=400, seed=1)
    assert np.all(np.abs(values - expected) <= 4 * stderr + 1e-12)
    assert np.abs(values - expected).max() < 0.2


@pytest.mark.parametrize("route", ["exact", "sampled"])
def test_efficiency(route):
    n = 9
    v = nonlinear_game(n, seed=3)
    full_minus_empty = v(np.ones((1, n), bool))[0] - v(np.zeros((1, n), bool))[0]
    if route == "exact":
        values = exact_shapley(v, n)
        assert math.isclose(values.sum(), full_minus_empty, rel_tol=1e-9)
    else:
        values, stderr = sampled_shapley(v, n, samples_per_player=90, seed=0)
        assert stderr.sum() > 0  # really sampled
        # sd of a sum is at most the sum of sds, whatever the correlation between players' estimates.
        assert abs(values.sum() - full_minus_empty) <= 4 * stderr.sum()


def test_symmetric_game_gives_equal_values():
    n = 11

    def v(masks):  # depends only on how many players are in: all players are symmetric
        k = masks.sum(1)
        return np.sqrt(k) + (k >= 6) * 2.0

    exact = exact_shapley(v, n)
    assert np.allclose(exact, exact[0])
    assert math.isclose(exact.sum(), v(np.ones((1, n), bool))[0])
    values, _ = sampled_shapley(v, n, samples_per_player=200, seed=0)
    assert np.allclose(values, exact)  # marginals depend only on size: every stratum is exact


def test_sampled_stderr_is_calibrated():
    n = 14
    v = nonlinear_game(n, seed=5)
    truth = exact_shapley(v, n)
    z_scores = []
    for seed in range(4):
        values, stderr = sampled_shapley(v, n, samples_per_player=280, seed=seed)
        assert np.all(stderr > 0)
        z_scores.append((values - truth) / stderr)
    z = np.concatenate(z_scores)
    assert np.all(np.abs(z) < 4)
    assert 0.5 < z.std() < 1.6  # neither over- nor under-confident by much


def test_sampled_is_deterministic_by_seed_and_more_samples_help():
    n = 12
    v = nonlinear_game(n, seed=2)
    truth = exact_shapley(v, n)
    a = sampled_shapley(v, n, samples_per_player=120, seed=4)
    b = sampled_shapley(v, n, samples_per_player=120, seed=4)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    fine, fine_err = sampled_shapley(v, n, samples_per_player=2400, seed=4)
    assert fine_err.mean() < a[1].mean() / 3
    assert np.abs(fine - truth).mean() < np.abs(a[0] - truth).mean()


def test_sampled_calls_value_fn_in_large_batches_without_duplicates():
    n = 16
    calls = []
    base = nonlinear_game(n)

    def v(masks):
        calls.append(masks.shape[0])
        return base(masks)

    result = shapley_values(v, n, exact_max_players=10, samples_per_player=320, seed=0, batch_size=10_000)
    assert result.method == "sampled"
    assert sum(calls) == result.evaluations
    assert len(calls) == math.ceil(result.evaluations / 10_000)
    # 2 * n players * n sizes * 20 draws coalitions are built; shared ones are evaluated once.
    assert result.evaluations < 2 * n * n * 20


def test_shapley_values_chooses_exact_for_small_games():
    v = with_interaction(np.arange(6.0), 0, 1, 1.0)
    result = shapley_values(v, 6)
    assert isinstance(result, ShapleyResult)
    assert result.method == "exact" and result.evaluations == 64
    assert np.allclose(result.values, [0.5, 1.5, 2, 3, 4, 5]) and np.all(result.stderr == 0)


def test_exact_with_20_players_is_fast():
    weights = np.random.default_rng(0).normal(size=20)
    start = time.perf_counter()
    values = exact_shapley(with_interaction(weights, 0, 19, 1.0), 20)
    assert time.perf_counter() - start < 15  # ~1 s unloaded; generous for shared CI cores
    expected = weights.copy()
    expected[[0, 19]] += 0.5
    assert np.allclose(values, expected)


def test_exact_refuses_too_many_players_and_bad_value_fns():
    with pytest.raises(LayershapError, match="n <= 20"):
        exact_shapley(additive(np.ones(21)), 21)
    with pytest.raises(LayershapError, match="one per row"):
        exact_shapley(lambda masks: np.zeros(3), 4)


class _Closed:
    def __init__(self, values):
        self.values = values

    def shapley_values(self):
        return self.values

    def predict(self, masks):
        raise AssertionError("analytic route must not evaluate coalitions")


def test_analytic_route_uses_the_closed_form_when_present():
    result = analytic_shapley(_Closed([1.0, 2.0]))
    assert result.method == "analytic" and np.array_equal(result.values, [1.0, 2.0])
    assert analytic_shapley(object()) is None
    assert surrogate_shapley(_Closed([3.0]), 1).method == "analytic"

    class Plain:
        predict = staticmethod(additive([1.0, 2.0, 3.0]))

    assert np.allclose(surrogate_shapley(Plain(), 3).values, [1, 2, 3])
