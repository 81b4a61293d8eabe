"""Which coalitions to spend real forward passes on: stratified Monte Carlo over Hamming weight.

A coalition is a boolean keep-mask over the n layers; its stratum is its size (how many layers it keeps).
`stratified_masks` draws distinct masks with equal counts per stratum, and a preset in `SAMPLERS` says which
strata to use.

Resumability is built into the order: masks come from one deterministic stream that visits the strata
round-robin, each stratum with its own random stream keyed by (seed, n, size). The masks for budget B are
therefore exactly the first B masks for any larger budget, so a rerun with a bigger budget only has to
evaluate the new ones.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from layershap.errors import LayershapError

# A stratum with at most this many masks is enumerated and shuffled (exact, cheap); a bigger one is sampled
# by rejection, which is only slow when a budget asks for a large share of a huge stratum.
ENUMERATE_LIMIT = 50_000
MAX_REJECTIONS = 10_000


def stratified_masks(n_players: int, budget: int, keep_sizes: Sequence[int], *, seed: int,
                     paired: bool = False, exclude: np.ndarray | None = None,
                     complete_first: Sequence[int] = ()) -> np.ndarray:
    """`budget` distinct keep-masks, `[budget, n_players]` bool, spread equally over the `keep_sizes` strata.

    The strata are visited round-robin in the given order (duplicates dropped), so counts differ by at most
    one and the remainder goes to the strata listed first. A stratum that runs out of distinct masks drops
    out of the rotation and the others take its share. Strata in `complete_first` are given in full before
    the rotation (see `iter_stratified_masks`). Masks equal to a row of `exclude` (say, masks
    already evaluated) are never returned.

    paired: every drawn mask is followed by its complement (a size-s draw brings a size n-s mask), both
    counting against the budget; a draw is skipped if either half was already used. The strata then
    count draws, not the sizes of the complements.

    Same seed and strata give the same masks, and a smaller budget gives a prefix of a larger one.
    """
    if budget < 0:
        raise LayershapError(f"the sampling budget must be >= 0; got {budget}")
    stream = iter_stratified_masks(n_players, keep_sizes, seed=seed, paired=paired, exclude=exclude,
                                   complete_first=complete_first)
    rows = list(itertools.islice(stream, budget))
    if len(rows) < budget:
        raise LayershapError(f"only {len(rows)} distinct masks exist in strata {list(keep_sizes)} of "
                             f"{n_players} players (after exclusions); lower the budget to {len(rows)}")
    if not rows:
        return np.zeros((0, n_players), dtype=bool)
    return np.stack(rows)


def iter_stratified_masks(n_players: int, keep_sizes: Sequence[int], *, seed: int, paired: bool = False,
                          exclude: np.ndarray | None = None,
                          complete_first: Sequence[int] = ()) -> Iterator[np.ndarray]:
    """The endless-until-exhausted stream behind `stratified_masks`; take as many masks as you need.

    complete_first: strata given in full, each in its own order, before the round-robin over `keep_sizes`
    begins (a stratum in both is then exhausted and leaves the rotation at once).
    """
    sizes = _check_sizes(n_players, keep_sizes)
    first = _check_sizes(n_players, complete_first) if len(complete_first) else []
    seen: set[bytes] = set()
    if exclude is not None:
        exclude = np.asarray(exclude, dtype=bool)
        if exclude.ndim != 2 or exclude.shape[1] != n_players:
            raise LayershapError(f"exclude must be a [masks, {n_players}] array; got shape {exclude.shape}")
        seen.update(row.tobytes() for row in exclude)

    def emit(mask: np.ndarray) -> Iterator[np.ndarray]:
        """The mask, then its complement when paired, each marked as seen."""
        for row in (mask, ~mask) if paired else (mask,):
            seen.add(row.tobytes())
            yield row

    for size in first:
        stratum = _Stratum(n_players, size, seed)
        while (mask := stratum.next_unused(seen, paired)) is not None:
            yield from emit(mask)
    streams = [_Stratum(n_players, size, seed) for size in sizes]
    active = list(range(len(streams)))
    while active:
        for index in list(active):
            mask = streams[index].next_unused(seen, paired)
            if mask is None:
                active.remove(index)
                continue
            yield from emit(mask)


class _Stratum:
    """All masks of one size in a fixed pseudo-random order, depending only on (seed, n, size)."""

    def __init__(self, n: int, size: int, seed: int):
        self.n, self.size = n, size
        self.rng = np.random.default_rng([seed, n, size])
        self.total = math.comb(n, size)
        self.order: list[tuple[int, ...]] | None = None
        self.position = 0
        if self.total <= ENUMERATE_LIMIT:
            # Enumerate the smaller side (kept or dropped players) and shuffle once.
            small = min(size, n - size)
            combos = list(itertools.combinations(range(n), small))
            self.order = [combos[i] for i in self.rng.permutation(len(combos))]
            self.flip = small != size

    def _mask(self, players) -> np.ndarray:
        mask = np.zeros(self.n, dtype=bool)
        mask[list(players)] = True
        return mask

    def next_unused(self, seen: set[bytes], paired: bool) -> np.ndarray | None:
        def unused(mask: np.ndarray) -> bool:
            return mask.tobytes() not in seen and not (paired and (~mask).tobytes() in seen)

        if self.order is not None:
            while self.position < len(self.order):
                mask = self._mask(self.order[self.position])
                self.position += 1
                if self.flip:
                    mask = ~mask
                if unused(mask):
                    return mask
            return None
        for _ in range(MAX_REJECTIONS):
            mask = self._mask(self.rng.permutation(self.n)[:self.size])
            if unused(mask):
                return mask
        raise LayershapError(f"no unused mask of size {self.size} among {self.n} players after "
                             f"{MAX_REJECTIONS} tries; the budget nears the {self.total} that exist")


def _check_sizes(n_players: int, keep_sizes: Sequence[int]) -> list[int]:
    if n_players < 1:
        raise LayershapError(f"a game needs at least one player; got {n_players}")
    sizes = list(dict.fromkeys(int(s) for s in keep_sizes))
    bad = [s for s in sizes if not 0 <= s <= n_players]
    if bad:
        raise LayershapError(f"keep sizes must lie in 0..{n_players}; got {bad}")
    if not sizes:
        raise LayershapError("give at least one keep size (stratum)")
    return sizes


# --- presets: which strata to sample ---------------------------------------------------------------------


@dataclass(frozen=True)
class SamplerPreset:
    """Maps (n_players, target_removed) to the keep sizes (strata) to sample, in round-robin order."""

    name: str
    fn: Callable[[int, int | None], list[int]]
    description: str
    complete: Callable[[int, int | None], list[int]] = lambda n, k: []

    def keep_sizes(self, n_players: int, target_removed: int | None = None) -> list[int]:
        if target_removed is not None and not 0 <= target_removed < n_players:
            raise LayershapError(f"can remove 0..{n_players - 1} of {n_players} layers; got {target_removed}")
        return _check_sizes(n_players, self.fn(n_players, target_removed))

    def complete_sizes(self, n_players: int, target_removed: int | None = None) -> list[int]:
        """Strata measured in full before the rotation starts."""
        return list(self.complete(n_players, target_removed))

    def stream(self, n_players: int, *, target_removed: int | None = None, seed: int, paired: bool = False,
               exclude: np.ndarray | None = None) -> Iterator[np.ndarray]:
        return iter_stratified_masks(n_players, self.keep_sizes(n_players, target_removed), seed=seed,
                                     paired=paired, exclude=exclude,
                                     complete_first=self.complete_sizes(n_players, target_removed))

    def masks(self, n_players: int, budget: int, *, target_removed: int | None = None, seed: int,
              paired: bool = False, exclude: np.ndarray | None = None) -> np.ndarray:
        return stratified_masks(n_players, budget, self.keep_sizes(n_players, target_removed), seed=seed,
                                paired=paired, exclude=exclude,
                                complete_first=self.complete_sizes(n_players, target_removed))


def _clip(sizes, n: int) -> list[int]:
    return list(dict.fromkeys(min(max(int(s), 1), n - 1) for s in sizes)) if n > 1 else [0]


PAPER_STRATA_32 = (30, 27, 24, 21, 18)


def paper_sizes(n: int, target_removed: int | None = None) -> list[int]:
    """The official code's strata (keep 30, 27, 24, 21, 18 of 32 layers), scaled to n with half-up rounding.

    Half-up rather than Python's banker's rounding, so n=30 gives (28, 25, 23, 20, 17).
    """
    return _clip((math.floor(n * s / 32 + 0.5) for s in PAPER_STRATA_32), n)


def shapley_sizes(n: int, target_removed: int | None = None) -> list[int]:
    """Every coalition size: the full model, the empty model, then n-1, ..., 1.

    This preset only gives the surrogate coverage of every size; the Shapley estimate stays a true Shapley
    value because the estimator (`layershap.estimate.shapley`) applies the size weighting s!(n-s-1)!/n! itself,
    whatever the sampling density. The full and empty models (one mask each) come first: together they
    fix the sum of all values (v(full) - v(empty)), and the empty coalition carries weight 1/n in every
    layer's value, so a surrogate left to extrapolate it shifts every value by the same error
    (`benchmarks/estimators.py` measured the error falling up to sevenfold on a real 12-player game once
    it is measured). A model with no blocks left is a valid, terrible model; its NLL is bounded like any
    diverged coalition's.
    """
    return [n, 0, *range(n - 1, 0, -1)] if n > 1 else [n, 0]


def target_sizes(n: int, target_removed: int | None = None) -> list[int]:
    """Keep sizes n-k-2 .. n-k+2 around the pruning target k, plus n-1 and n-2 so single-layer effects are
    seen; without a target, the `shapley` strata. Larger keep sizes come first in the rotation."""
    if target_removed is None:
        return shapley_sizes(n)
    k = target_removed
    return sorted(_clip([*range(n - k - 2, n - k + 3), n - 1, n - 2], n), reverse=True)


def every_single_removal(n: int, target_removed: int | None = None) -> list[int]:
    """With a target, the n masks that each drop one block come first, all of them: they give the surrogate
    every block's cost alone, and the leave-one-out plan for free (`seeds.leave_one_out_seed`). A surrogate
    that saw only some of them misjudged the rest: on SmolLM2 at k = 10 (other calibration text) the search
    never measured the plan one swap from its choice that leave-one-out found with 31 passes, 15% better on
    calibration."""
    return [n - 1] if target_removed is not None and n > 1 else []


SAMPLERS: dict[str, SamplerPreset] = {}


def register_sampler(preset: SamplerPreset) -> None:
    SAMPLERS[preset.name] = preset


register_sampler(SamplerPreset("paper", paper_sizes, "the official code's strata: keep 30,27,24,21,18 of 32"))
register_sampler(SamplerPreset("shapley", shapley_sizes, "every coalition size n..0, for Shapley coverage"))
register_sampler(SamplerPreset("target", target_sizes, "every single removal, then sizes around the pruning "
                               "target plus n-1, n-2", every_single_removal))


def get_sampler(name: str) -> SamplerPreset:
    try:
        return SAMPLERS[name]
    except KeyError:
        raise LayershapError(f"unknown sampler {name!r}; use one of {', '.join(SAMPLERS)}") from None
