"""Shapley values of any value function over keep-masks, computed in large batches.

A value function takes a `[m, n]` bool array of coalitions and returns `[m]` utilities: a surrogate's
`predict`, or the real `LayerGame` (expensive; then prefer few evaluations). Three routes:

- `exact_shapley`: all 2^n coalitions, n <= 20.
- `sampled_shapley`: stratified Monte Carlo over coalition sizes, with a standard error.
- `analytic_shapley`: closed form, for surrogates that have one (the pairwise ridge model).

`shapley_values` picks exact or sampled by n.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from layershap.errors import LayershapError

ValueFn = Callable[[np.ndarray], np.ndarray]

EXACT_MAX_PLAYERS = 20
DEFAULT_SAMPLES_PER_PLAYER = 2048
DEFAULT_BATCH_SIZE = 1 << 16


@dataclass
class ShapleyResult:
    """values[i] is player i's Shapley value; stderr its Monte Carlo standard error (zeros unless sampled).

    evaluations: coalitions passed to the value function (distinct ones, for the sampled route).
    """

    values: np.ndarray
    stderr: np.ndarray
    method: str
    evaluations: int

    def to_dict(self) -> dict:
        return {"values": self.values.tolist(), "stderr": self.stderr.tolist(), "method": self.method,
                "evaluations": self.evaluations}


def shapley_weights(n: int) -> np.ndarray:
    """w(s) = s!(n-s-1)!/n! for s = 0..n-1: the weight of a size-s coalition S in player i's sum over S
    not containing i. Each size's coalitions together weigh 1/n."""
    return np.array([1.0 / (n * math.comb(n - 1, s)) for s in range(n)])


def _evaluate(value_fn: ValueFn, masks: np.ndarray, batch_size: int) -> np.ndarray:
    out = np.empty(masks.shape[0], dtype=np.float64)
    for start in range(0, masks.shape[0], batch_size):
        chunk = masks[start:start + batch_size]
        values = np.asarray(value_fn(chunk), dtype=np.float64).reshape(-1)
        if values.shape[0] != chunk.shape[0]:
            raise LayershapError(f"the value function returned {values.shape[0]} values for {chunk.shape[0]} "
                                 "coalitions; it must return one per row")
        out[start:start + chunk.shape[0]] = values
    return out


def _check_players(n: int) -> None:
    if n < 1:
        raise LayershapError(f"a game needs at least one player; got {n}")


def exact_shapley(value_fn: ValueFn, n: int, *, batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
    """Exact Shapley values from all 2^n coalitions (n <= 20).

    Coalition c (an integer) keeps player i iff bit i is set. With the values in a flat array v[c],
    reshaping to (2^(n-i-1), 2, 2^i) puts S and S + {i} side by side on the middle axis, so each player's
    weighted marginal sum is one vectorised expression: no loop over coalitions.
    """
    _check_players(n)
    if n > EXACT_MAX_PLAYERS:
        raise LayershapError(f"exact Shapley values need all 2^{n} coalitions; only n <= {EXACT_MAX_PLAYERS} "
                             "is allowed, use sampled_shapley for more players")
    bits = 1 << np.arange(n, dtype=np.int64)
    total = 1 << n
    values = np.empty(total, dtype=np.float64)
    for start in range(0, total, batch_size):
        codes = np.arange(start, min(start + batch_size, total), dtype=np.int64)
        values[start:start + codes.shape[0]] = _evaluate(value_fn, (codes[:, None] & bits) != 0, batch_size)
    size = np.zeros(total, dtype=np.int64)
    for i in range(n):
        size += (np.arange(total, dtype=np.int64) >> i) & 1
    weight = shapley_weights(n)
    phi = np.empty(n)
    for i in range(n):
        pairs = values.reshape(-1, 2, 1 << i)
        without_i = size.reshape(-1, 2, 1 << i)[:, 0, :]
        phi[i] = np.sum(weight[without_i] * (pairs[:, 1, :] - pairs[:, 0, :]))
    return phi


def _base_coalitions(n: int, s: int, m: int, rng: np.random.Generator) -> tuple[np.ndarray, bool]:
    """Base coalitions of size s for every player, `[n, count, n]`, and whether they are the whole stratum.

    A stratum with at most m coalitions (C(n-1, s) <= m) is enumerated, so its mean is exact. Otherwise m
    coalitions are drawn with common random numbers: one random permutation per draw, shared by all
    players; player i's coalition is the first s players of it other than i, which is a uniform s-subset
    of the others for each i. Players' estimates are then correlated, but each one stays unbiased and its
    standard error valid.
    """
    players = np.arange(n)
    if math.comb(n - 1, s) <= m:
        combos = np.array(list(itertools.combinations(range(n - 1), s)), dtype=np.int64)
        combos = combos.reshape(math.comb(n - 1, s), s)
        base = np.zeros((n, combos.shape[0], n), dtype=bool)
        for i in range(n):
            members = combos + (combos >= i)  # indices among the others -> player ids
            np.put_along_axis(base[i], members, True, axis=1)
        return base, True
    perms = rng.permuted(np.tile(players, (m, 1)), axis=1)
    position = np.argsort(perms, axis=1)                         # position[k, j]: where player j sits
    pos_j = position[None, :, :]                                 # [1, m, n]
    pos_i = position.T[:, :, None]                               # [n, m, 1]
    rank = pos_j - (pos_i < pos_j)                               # j's position once i is taken out
    base = (rank < s) & (players[None, None, :] != players[:, None, None])
    return base, False


def sampled_shapley(value_fn: ValueFn, n: int, *, samples_per_player: int = DEFAULT_SAMPLES_PER_PLAYER,
                    seed: int = 0, batch_size: int = DEFAULT_BATCH_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Stratified Monte Carlo Shapley values and their standard errors.

    For each player i and each size s = 0..n-1, m = ceil(samples_per_player / n) (at least 2) base
    coalitions S of size s without i give marginals v(S + i) - v(S). Because every size carries total
    weight 1/n in the Shapley formula, phi_i = mean over s of the stratum means is exactly the Shapley
    weighting; stderr_i = sqrt(sum_s var_s / m_s) / n from the per-stratum sample variances (strata small
    enough to enumerate are exact and add no variance).

    All coalitions are built as arrays first, deduplicated, and sent to value_fn in batches of
    batch_size; `shapley_values` reports how many distinct coalitions that was.
    """
    values, stderr, _ = _sampled(value_fn, n, samples_per_player, seed, batch_size)
    return values, stderr


def _sampled(value_fn: ValueFn, n: int, samples_per_player: int, seed: int,
             batch_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    _check_players(n)
    if samples_per_player < 1:
        raise LayershapError(f"samples_per_player must be >= 1; got {samples_per_player}")
    m = max(2, math.ceil(samples_per_player / n))
    rng = np.random.default_rng(seed)
    strata = [_base_coalitions(n, s, m, rng) for s in range(n)]
    players = np.arange(n)
    blocks = []
    for base, _ in strata:
        with_i = base.copy()
        with_i[players, :, players] = True
        blocks += [base.reshape(-1, n), with_i.reshape(-1, n)]
    masks = np.concatenate(blocks)
    packed = np.packbits(masks, axis=1)
    keys = np.ascontiguousarray(packed).view(np.dtype((np.void, packed.shape[1]))).ravel()
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    utilities = _evaluate(value_fn, masks[first], batch_size)[inverse.reshape(-1)]

    means = np.empty((n, n))       # [player, size]
    variance_of_mean = np.zeros((n, n))
    offset = 0
    for s, (base, exact) in enumerate(strata):
        count = base.shape[1] * n
        v_without = utilities[offset:offset + count].reshape(n, -1)
        v_with = utilities[offset + count:offset + 2 * count].reshape(n, -1)
        offset += 2 * count
        marginal = v_with - v_without
        means[:, s] = marginal.mean(1)
        if not exact:
            variance_of_mean[:, s] = marginal.var(1, ddof=1) / marginal.shape[1]
    return means.mean(1), np.sqrt(variance_of_mean.sum(1)) / n, int(first.shape[0])


def shapley_values(value_fn: ValueFn, n: int, *, exact_max_players: int = EXACT_MAX_PLAYERS,
                   samples_per_player: int = DEFAULT_SAMPLES_PER_PLAYER, seed: int = 0,
                   batch_size: int = DEFAULT_BATCH_SIZE) -> ShapleyResult:
    """Exact Shapley values when n <= exact_max_players, stratified Monte Carlo otherwise."""
    _check_players(n)
    if n <= exact_max_players:
        values = exact_shapley(value_fn, n, batch_size=batch_size)
        return ShapleyResult(values, np.zeros(n), "exact", 1 << n)
    values, stderr, evaluations = _sampled(value_fn, n, samples_per_player, seed, batch_size)
    return ShapleyResult(values, stderr, "sampled", evaluations)


def analytic_shapley(surrogate) -> ShapleyResult | None:
    """Closed-form Shapley values of a fitted surrogate that has them (a `shapley_values()` method, like the
    linear and pairwise ridge models); None for one that does not (then use `shapley_values` on its
    `predict`)."""
    method = getattr(surrogate, "shapley_values", None)
    if not callable(method):
        return None
    values = np.asarray(method(), dtype=np.float64)
    return ShapleyResult(values, np.zeros(values.shape[0]), "analytic", 0)


def surrogate_shapley(surrogate, n: int, **options) -> ShapleyResult:
    """A surrogate's Shapley values: analytic when it has a closed form, else exact or sampled on predict."""
    return analytic_shapley(surrogate) or shapley_values(surrogate.predict, n, **options)
