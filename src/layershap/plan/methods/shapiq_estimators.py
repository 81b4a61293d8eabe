"""Shapley estimators from shapiq (KernelSHAP, permutation, stratified, SVARM, k-additive) on the layer game.

The comparison the cooperative-game method has to win: shapiq's model-agnostic estimators run on exactly the
same game (players are blocks, a coalition is the set of kept blocks, its worth the game's bounded utility
on the calibration windows) with the same evaluation budget, and the k blocks with the lowest estimated
values are removed.

`ShapiqLayerGame` wraps a `LayerGame` as a `shapiq.Game`: a value function over boolean coalitions,
normalised as shapiq expects so that the empty coalition is worth 0 (the model with every block skipped is
a valid, if terrible, model; its NLL is bounded like any diverged coalition's). Coalitions are cached, so
an estimator that asks for the same coalition again (permutation and stratified sampling do, and on small
models every estimator with a budget above 2^n) never pays for it twice. `Plan.forward_passes` is the
number of real-model evaluations actually run, which is at most the budget (and at most 2^n): the full and
empty models, which every one of these estimators asks for, count among them.

shapiq is an optional dependency: `pip install 'layershap[shapiq]'`.
"""

from __future__ import annotations

import time
import warnings
from functools import lru_cache

import numpy as np

from layershap.errors import LayershapError
from layershap.game.layer_game import LayerGame
from layershap.models.layers import num_layers
from layershap.plan.methods._common import removable
from layershap.plan.methods.base import Plan, lowest_scoring

DEFAULT_BUDGET = 256

# method name -> (shapiq approximator class name, constructor options beyond n and random_state)
ESTIMATORS: dict[str, tuple[str, dict]] = {
    "kernelshap": ("KernelSHAP", {}),
    "permutation": ("PermutationSamplingSV", {}),
    "stratified": ("StratifiedSamplingSV", {}),
    "svarm": ("SVARM", {}),
    "kadd": ("kADDSHAP", {"max_order": 2}),
}


def import_shapiq():
    """The shapiq module, or a LayershapError saying how to install it."""
    try:
        import shapiq
    except ImportError:
        raise LayershapError("the shapiq estimators (kernelshap, permutation, stratified, svarm, kadd) need the "
                             "shapiq package: pip install 'layershap[shapiq]'") from None
    return shapiq


class CachedLayerGame:
    """A `LayerGame`'s utilities, each coalition measured at most once; counts real evaluations and requests."""

    def __init__(self, game: LayerGame):
        self.game = game
        self.n_players = game.n_players
        self.nlls: dict[bytes, float] = {}
        self.requests = 0
        self.evaluations = 0
        full = np.ones(self.n_players, dtype=bool)
        before = game.forward_passes
        base = game.base_nll  # one real pass unless the game already knew it
        self.evaluations += game.forward_passes - before
        self.nlls[_key(full)] = base

    def nll(self, mask) -> float:
        mask = np.asarray(mask, dtype=bool)
        self.requests += 1
        key = _key(mask)
        hit = self.nlls.get(key)
        if hit is None:
            hit = self.game.nll(mask)
            self.evaluations += 1
            self.nlls[key] = hit
        return hit

    def utility(self, mask) -> float:
        """The game's (bounded) utility of one keep-mask."""
        return self.game.utility_of_nll(self.nll(mask))


def _key(mask: np.ndarray) -> bytes:
    return np.packbits(mask).tobytes()


@lru_cache(maxsize=1)
def _game_class():
    shapiq = import_shapiq()

    class ShapiqLayerGame(shapiq.Game):
        """A `LayerGame` as a shapiq Game: value of a coalition = utility of keeping exactly those blocks,
        minus the empty coalition's (so the empty coalition is worth 0, as shapiq's estimators expect)."""

        def __init__(self, cached: CachedLayerGame):
            self.cached = cached
            empty = cached.utility(np.zeros(cached.n_players, dtype=bool))
            super().__init__(cached.n_players, normalize=True, normalization_value=empty, verbose=False)
            self.empty_value = empty
            self.full_value = cached.utility(np.ones(cached.n_players, dtype=bool))

        def value_function(self, coalitions: np.ndarray) -> np.ndarray:
            coalitions = np.asarray(coalitions, dtype=bool).reshape(-1, self.n_players)
            return np.array([self.cached.utility(row) for row in coalitions], dtype=float)

    return ShapiqLayerGame


def shapiq_game(game: LayerGame | CachedLayerGame):
    """Wrap a `LayerGame` (or a cached one) as a `shapiq.Game` (normalised: the empty coalition is worth 0)."""
    import_shapiq()
    cached = game if isinstance(game, CachedLayerGame) else CachedLayerGame(game)
    return _game_class()(cached)


def estimate_shapiq(game: LayerGame, estimator: str, *, budget: int = DEFAULT_BUDGET, seed: int = 0) -> dict:
    """Shapley values of every block with one of shapiq's estimators (a name in `ESTIMATORS`).

    Returns {"values": per-block values, "baseline": utility of the empty model, "full": utility of the full
    model, "evaluations": real-model evaluations run, "requests": coalitions the estimator asked for (cache
    hits included), "budget", "estimator", "approximator"}.
    """
    try:
        class_name, options = ESTIMATORS[estimator]
    except KeyError:
        raise LayershapError(f"unknown shapiq estimator {estimator!r}; use one of {', '.join(ESTIMATORS)}") \
            from None
    shapiq = import_shapiq()
    n = game.n_players
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < n + 1:
        raise LayershapError(f"--budget {budget} is too small for {estimator} on {n} blocks: it needs at least "
                             f"{n + 1} evaluations (the full and empty models and one per block)")
    before = game.forward_passes
    cached = CachedLayerGame(game)
    wrapped = shapiq_game(cached)
    approximator = getattr(shapiq.approximator, class_name)(n, random_state=seed, **options)
    with warnings.catch_warnings():
        # "Not all budget is required due to the border-trick": a budget above 2^n, expected on small models
        warnings.filterwarnings("ignore", message="Not all budget is required")
        result = approximator.approximate(int(budget), wrapped)
    values = np.array([float(result[(i,)]) for i in range(n)])
    evaluations = game.forward_passes - before
    assert evaluations == cached.evaluations, "every real evaluation goes through the cache"
    return {"estimator": estimator, "approximator": class_name, "budget": int(budget), "values": values,
            "baseline": wrapped.empty_value, "full": wrapped.full_value, "evaluations": evaluations,
            "requests": cached.requests, "utility": game.utility.name, "base_nll": game.base_nll,
            "loss": game.loss_name}


def _plan(estimator: str, model, windows, k: int, *, protect=(), seed: int = 0, batch_size: int = 8,
          settings=None, budget: int | None = None) -> Plan:
    started = time.perf_counter()
    n = num_layers(model)
    removable(n, k, protect)
    if budget is None:
        budget = settings.budget if settings is not None else DEFAULT_BUDGET
    if settings is not None:
        seed, utility = settings.seed, settings.utility
    else:
        utility = "neg_nll"
    game = LayerGame(model, windows, utility=utility, batch_size=batch_size)
    found = estimate_shapiq(game, estimator, budget=budget, seed=seed)
    values = found["values"]
    details = {key: value for key, value in found.items() if key != "values"}
    details["seed"] = seed
    # with --utility kl the dense model's reference pass is one more forward pass
    return Plan(estimator, n, lowest_scoring(values, k, protect), values.tolist(),
                forward_passes=found["evaluations"] + game.reference_passes, seconds=time.perf_counter() - started, details=details)


def kernelshap(model, windows, k: int, **options) -> Plan:
    """KernelSHAP (Lundberg & Lee, 2017): weighted least squares on sampled coalitions."""
    return _plan("kernelshap", model, windows, k, **_known(options))


def permutation(model, windows, k: int, **options) -> Plan:
    """Permutation sampling (ApproShapley, Castro et al., 2009): marginal contributions along random orders."""
    return _plan("permutation", model, windows, k, **_known(options))


def stratified(model, windows, k: int, **options) -> Plan:
    """Stratified sampling (Maleki et al., 2013): marginal contributions stratified by coalition size."""
    return _plan("stratified", model, windows, k, **_known(options))


def svarm(model, windows, k: int, **options) -> Plan:
    """SVARM (Kolpaczki et al., 2024): stratified sampling without marginal contributions."""
    return _plan("svarm", model, windows, k, **_known(options))


def kadd(model, windows, k: int, **options) -> Plan:
    """k-additive SHAP (Pelegrina et al., 2023): a 2-additive game fitted to sampled coalitions."""
    return _plan("kadd", model, windows, k, **_known(options))


_OPTIONS = ("protect", "seed", "batch_size", "settings", "budget")


def _known(options: dict) -> dict:
    """The options these methods use; the rest (store, ...) are meant for other methods."""
    return {key: value for key, value in options.items() if key in _OPTIONS}
