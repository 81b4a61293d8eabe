"""The cooperative-game estimate, one stage per step: masks -> evaluations -> surrogate -> Shapley values.

masks:        a sampler preset draws keep-masks, stratified by how many layers they keep (seeded; a larger
              budget extends a smaller one, so reruns only pay for new masks);
evaluations:  each mask's mean NLL on the calibration windows (the mean KL from the dense model for
              `--utility kl`), from the store when it is there, otherwise from the real model with the
              dropped blocks skipped, committed to the store at once;
surrogate:    fitted to the utilities, its held-out fit always reported;
Shapley:      every layer's value from the surrogate (exact by enumeration up to 20 layers, sampled with a
              standard error above).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from layershap.errors import LayershapError
from layershap.estimate.budget import BUDGET_UNITS, SPENT_TOLERANCE, mask_share
from layershap.estimate.sampling import get_sampler
from layershap.estimate.shapley import EXACT_MAX_PLAYERS, shapley_values, surrogate_shapley
from layershap.estimate.surrogate import held_out_fit, make_surrogate
from layershap.game.layer_game import LayerGame, Utility, get_utility
from layershap.game.measure import Measured, evaluate_masks
from layershap.game.store import EvaluationStore

MIN_BUDGET = 20
# How the shapley method turns values into a plan: "lowest" removes the k lowest Shapley values (the
# paper); "search" spends half the budget on the estimate and half on measuring the plans the surrogate
# rates best, and keeps the best measured one (see refine.py).
PLANS = ("search", "lowest")  # the surrogate's held-out check needs a few masks to hold out and enough left to train


@dataclass(frozen=True)
class EstimateSettings:
    """Everything that decides an estimate's result; written into every run directory."""

    budget: int = 128  # full-size passes (see budget_unit); 128 spends less than SLEB at k >= 6 (docs/method.md)
    budget_unit: str = "full_passes"  # a mask costs its kept share of a full pass; "masks": each costs 1
    sampler: str = "target"
    surrogate: str = "pairwise"
    utility: str = "neg_nll"
    seed: int = 0
    paired: bool = False
    target_removed: int | None = None
    shapley_samples: int = 4096
    holdout: float = 0.2
    plan: str = "search"
    confirm: int = 0  # rounds of successive halving on fresh windows for the search's finalists (0: none)

    def check(self, n_layers: int) -> None:
        if self.budget < MIN_BUDGET:
            raise LayershapError(f"--budget {self.budget} is too small: the surrogate needs at least {MIN_BUDGET} "
                                 "evaluated masks (and more than the number of layers to be useful)")
        if self.budget_unit not in BUDGET_UNITS:
            raise LayershapError(f"unknown budget unit {self.budget_unit!r}; use one of {', '.join(BUDGET_UNITS)}")
        get_sampler(self.sampler)
        make_surrogate(self.surrogate, n_layers, self.seed)
        if self.plan not in PLANS:
            raise LayershapError(f"unknown plan {self.plan!r}; use one of {', '.join(PLANS)}")
        if isinstance(self.confirm, bool) or not isinstance(self.confirm, int) or not 0 <= self.confirm <= 6:
            raise LayershapError(f"--confirm {self.confirm!r}: give a number of halving rounds from 0 to 6")


# The official pipeline (8000 masks, 10 windows of 128 tokens, the MLP surrogate, 20,000 samples per layer).
PRESETS: dict[str, dict] = {
    "default": {},
    "paper": {"budget": 8000, "budget_unit": "masks", "sampler": "paper", "surrogate": "paper", "utility": "ppl_ratio",
              "shapley_samples": 20000, "plan": "lowest", "samples": 10, "seq_len": 128},
}


def preset_settings(name: str) -> dict:
    try:
        return dict(PRESETS[name])
    except KeyError:
        raise LayershapError(f"unknown preset {name!r}; use one of {', '.join(PRESETS)}") from None


@dataclass
class Estimate:
    """Result of one estimate: values per layer, how they were obtained, and what it cost."""

    n_layers: int
    shapley: np.ndarray
    stderr: np.ndarray
    shapley_method: str
    masks: np.ndarray
    nlls: np.ndarray
    utilities: np.ndarray
    base_nll: float
    evaluations: int
    reused: int
    surrogate_fit: dict
    settings: EstimateSettings
    seconds: float
    surrogate: object = field(repr=False, default=None)
    measured: Measured = field(default_factory=Measured)

    def to_dict(self) -> dict:
        return {
            "n_layers": self.n_layers,
            "layers": [{"index": i, "shapley": float(v), "stderr": float(s)}
                       for i, (v, s) in enumerate(zip(self.shapley, self.stderr))],
            "shapley_method": self.shapley_method,
            "evaluations": self.evaluations,
            "reused": self.reused,
            "reused_from_concurrent_run": self.measured.from_concurrent,
            "not_reused_other_conditions": dict(self.measured.other_contexts),
            "masks": len(self.masks),
            "base_nll": self.base_nll,
            "loss": get_utility(self.settings.utility).loss_name,  # what nlls and base_nll measure
            "surrogate": {"name": self.settings.surrogate, **self.surrogate_fit},
            "seed": self.settings.seed,
            "settings": asdict(self.settings),
            "seconds": self.seconds,
        }


def sample_masks(settings: EstimateSettings, n_players: int, n_blocks: int | None = None) -> np.ndarray:
    """The full model first (the utility's reference), then the sampler's masks until the budget is spent.

    Each mask is charged its share of a full pass (`estimate/budget.py`; n_blocks: the model's blocks, when
    the players are sublayers), or 1 with `budget_unit="masks"`. When the budget covers all 2^n coalitions,
    all of them are taken (the estimate is then exact); when the sampler's strata hold fewer masks than the
    budget buys, all of theirs are taken. A larger budget takes a longer prefix of the same stream.
    """
    full = np.ones((1, n_players), dtype=bool)
    if n_players <= 20 and settings.budget >= 2 ** n_players:
        every = ((np.arange(2 ** n_players)[:, None] >> np.arange(n_players)) & 1).astype(bool)
        return np.concatenate([full, every[:-1][::-1]])
    stream = get_sampler(settings.sampler).stream(n_players, target_removed=settings.target_removed,
                                                  seed=settings.seed, paired=settings.paired, exclude=full)
    share = mask_share(n_blocks or n_players, settings.budget_unit)
    left, drawn = settings.budget - share(full[0]), []
    for mask in stream:
        cost = share(mask)
        if cost > left + SPENT_TOLERANCE:
            break
        drawn.append(mask)
        left -= cost
    return np.concatenate([full, np.array(drawn, dtype=bool).reshape(-1, n_players)])


class MeasuredOrPredicted:
    """Value function for the Shapley step: the measured utility where a mask was evaluated, the surrogate's
    prediction elsewhere. With every coalition measured the estimate is exact, whatever the surrogate."""

    def __init__(self, surrogate, masks: np.ndarray, utilities: np.ndarray):
        self.surrogate = surrogate
        self.known = {np.packbits(m).tobytes(): u for m, u in zip(masks, utilities)}

    def __call__(self, masks: np.ndarray) -> np.ndarray:
        values = self.surrogate.predict(masks)
        if self.known:
            packed = np.packbits(masks, axis=1)
            for row, key in enumerate(map(bytes, packed)):
                hit = self.known.get(key)
                if hit is not None:
                    values[row] = hit
        return values


def estimate(game: LayerGame, store: EvaluationStore, settings: EstimateSettings) -> Estimate:
    """Run the whole estimate on a game, reusing whatever the store already holds."""
    started = time.perf_counter()
    settings.check(game.n_players)
    if settings.utility != game.utility.name:
        raise LayershapError(f"the game measures {game.utility.name!r} but the settings ask for {settings.utility!r}")
    masks = sample_masks(settings, game.n_players, game_blocks(game))
    measured = Measured()
    nlls, evaluated, reused = evaluate_masks(game, store, masks, measured=measured)
    result = estimate_from_measurements(game.utility, masks, nlls, settings)
    result.evaluations, result.reused, result.seconds = evaluated, reused, time.perf_counter() - started
    result.measured = measured
    return result


def game_blocks(game: LayerGame) -> int:
    """The model's blocks (the players, or half of them in the sublayer game)."""
    return game.n_players // (2 if getattr(game, "granularity", "block") == "sublayer" else 1)


def estimate_from_measurements(utility: Utility, masks: np.ndarray, nlls: np.ndarray,
                               settings: EstimateSettings) -> Estimate:
    """Surrogate and Shapley values from masks already measured (the first mask is the full model)."""
    base_nll = float(nlls[0])
    utilities = np.array([utility(v, base_nll) for v in nlls])
    fit = held_out_fit(settings.surrogate, masks, utilities, seed=settings.seed, holdout_fraction=settings.holdout)
    result, surrogate = values_from_utilities(masks, utilities, settings)
    return Estimate(n_layers=masks.shape[1], shapley=np.asarray(result.values), stderr=np.asarray(result.stderr),
                    shapley_method=result.method, masks=masks, nlls=nlls, utilities=utilities, base_nll=base_nll,
                    evaluations=0, reused=0, surrogate_fit=fit, settings=settings, seconds=0.0, surrogate=surrogate)


def values_from_utilities(masks: np.ndarray, utilities: np.ndarray, settings: EstimateSettings):
    """The Shapley step on its own, for any value function's measurements: the surrogate fitted to them, and
    every player's value (exact enumeration up to 20 players, measured coalitions at their measured value;
    stratified samples of the surrogate above). Returns (ShapleyResult, fitted surrogate)."""
    n = masks.shape[1]
    surrogate = make_surrogate(settings.surrogate, n, settings.seed).fit(masks, utilities)
    if n <= EXACT_MAX_PLAYERS:
        result = shapley_values(MeasuredOrPredicted(surrogate, masks, utilities), n, seed=settings.seed)
    else:
        result = surrogate_shapley(surrogate, n, samples_per_player=settings.shapley_samples, seed=settings.seed)
    return result, surrogate


def check_sublayer_plan_utility(settings: EstimateSettings | None) -> None:
    """Refuse `--utility kl` for the sublayer plan (prune and compare with --granularity sublayer):
    `plan/sublayer.py` reports its plans' calibration perplexity as exp(measured loss), which for a KL is no
    perplexity. The sublayer estimate itself takes every utility."""
    if settings is not None and get_utility(settings.utility).loss != "nll":
        raise LayershapError(f"--utility {settings.utility} with --granularity sublayer is not supported yet by prune "
                             "and compare (the sublayer plan reports calibration perplexity from the measured "
                             "loss); use neg_nll there, or `layershap estimate --granularity sublayer --utility "
                             f"{settings.utility}` for the sublayers' values")


def with_overrides(settings: EstimateSettings, **overrides) -> EstimateSettings:
    return replace(settings, **{k: v for k, v in overrides.items() if v is not None})
