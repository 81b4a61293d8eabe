"""Screening and confirmation: the finalists are judged on fresh windows that no earlier step used.

The plan search screens about a hundred plans on the same few calibration windows and keeps the best one
measured, which is also the plan whose calibration score flatters it most (the winner's curse: of many noisy
scores, the lowest is the most likely to be low by luck). Confirmation re-measures the finalists, the best
plans the search measured and the rivals' seed plans, on calibration windows drawn apart from every window
the search saw (`text_windows(..., exclude=calibration)`), by successive halving: every finalist on the first
`samples` fresh windows, the better half on the next `2 * samples`, the better half of those on the next
`4 * samples`, until one is left or the rounds run out. A plan's score is its mean NLL over all the fresh
windows it was measured on, never over the screening windows, so the choice rests only on data the search
did not fit. Each round doubles the windows and halves the plans, so every round costs about the same.

Cost: the rounds' passes run only the kept blocks of k-removal plans over more tokens; they are counted in
token-passes and charged to `--budget` as equivalent full-size passes (`confirmation_cost` is reserved from
the plan search before it starts). Evaluations go through the store, each round under its own windows'
fingerprint, so a rerun pays nothing twice. With `--utility kl` the score is the mean KL from the dense model
instead of the NLL (each round's record says which `loss`), and each round's windows need the dense model's
reference first: one more full pass per round, counted and reserved.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from layershap.data.windows import TextWindows, text_windows
from layershap.errors import LayershapError
from layershap.game.context import measurement_context
from layershap.game.layer_game import LayerGame, bounded_nll
from layershap.game.measure import evaluate_masks
from layershap.plan.cost import Cost

MEASURED_FINALISTS = 5  # the best distinct k-removal plans the search measured; the seed plans join them


def pool_samples(samples: int, rounds: int) -> int:
    """Fresh windows that `rounds` rounds of halving need: samples * (1 + 2 + ... + 2^(rounds-1))."""
    return samples * (2 ** rounds - 1)


def confirmation_windows(data: str, tokenizer, calibration: TextWindows, rounds: int) -> TextWindows | None:
    """The fresh calibration windows for `rounds` rounds: same text(s), seed and length as `calibration`,
    none overlapping it; None when rounds is 0 or the calibration half has no room for them."""
    if rounds <= 0:
        return None
    try:
        return text_windows(data, tokenizer, samples=pool_samples(calibration.samples, rounds),
                            seq_len=calibration.seq_len, seed=calibration.seed, split=calibration.split,
                            exclude=calibration)
    except LayershapError:
        return None


def confirmation_cost(finalists: int, rounds: int, n_layers: int, k: int, *, reference: bool = False) -> float:
    """Full-size passes (over the screening windows' tokens) that halving `finalists` plans over `rounds`
    rounds spends at most: round r measures ceil(finalists / 2^r) plans on 2^r times the tokens, with only
    n - k blocks and the head running; with `reference` (the KL loss) each round also runs the full model once
    over its windows."""
    total, full, alive = 0.0, 0.0, finalists
    for r in range(rounds):
        if alive <= 1:
            break
        total += alive * 2 ** r
        full += 2 ** r if reference else 0
        alive = math.ceil(alive / 2)
    return total * (n_layers - k + 1) / (n_layers + 1) + full


def finalists(masks: np.ndarray, nlls: np.ndarray, k: int, protect, base_nll: float, seeds=(),
              measured: int = MEASURED_FINALISTS) -> list[np.ndarray]:
    """The `measured` best distinct k-removal masks by screening NLL, then the seed plans' masks not among
    them (duplicates dropped)."""
    n = masks.shape[1]
    eligible = masks.sum(axis=1) == n - k
    for p in protect:
        eligible &= masks[:, p]
    scores = np.array([bounded_nll(v, base_nll) for v in nlls])
    chosen: dict[bytes, np.ndarray] = {}
    for index in np.flatnonzero(eligible)[np.argsort(scores[eligible], kind="stable")]:
        if len(chosen) >= measured:
            break
        chosen.setdefault(masks[index].tobytes(), masks[index])
    for removal in seeds:
        mask = np.ones(n, dtype=bool)
        mask[list(removal)] = False
        chosen.setdefault(mask.tobytes(), mask)
    return list(chosen.values())


@dataclass
class Confirmation:
    """The plan that won, each round's record, and what the confirmation alone cost (its passes and its
    seconds), so the screening's own cost can be told apart from the whole run's."""

    winner: np.ndarray
    rounds: list[dict]
    cost: Cost = field(default_factory=Cost)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"chosen": [int(i) for i in np.flatnonzero(~self.winner)], "rounds": self.rounds,
                "cost": vars(self.cost), "seconds": self.seconds}


def successive_halving(model, fresh: TextWindows, candidates: list[np.ndarray], store, *, samples: int,
                       utility: str = "neg_nll", batch_size: int = 8) -> Confirmation:
    """Halve `candidates` round by round on consecutive slices of `fresh` (samples, 2 samples, 4 samples, ...
    windows) and return the best of the last round by mean NLL (the utility's loss: mean KL for `kl`) over
    every fresh window it was measured on."""
    if not candidates:
        raise ValueError("no finalists to confirm")
    started = time.perf_counter()
    alive = list(range(len(candidates)))
    total = np.zeros(len(candidates))  # NLL summed over windows (mean NLL x windows), per candidate
    windows = np.zeros(len(candidates), dtype=int)
    rounds, cost, start, r = [], Cost(), 0, 0
    while len(alive) > 1 and start + samples * 2 ** r <= fresh.samples:
        size = samples * 2 ** r
        part = TextWindows(fresh.tokens[start:start + size], fresh.source, fresh.split, fresh.seed,
                           starts=fresh.starts[start:start + size])
        game = LayerGame(model, part, utility=utility, batch_size=batch_size)
        stored = set(store.all_nlls(measurement_context(game)))
        masks = np.array([candidates[i] for i in alive])
        nlls, _, _ = evaluate_masks(game, store, masks, description=f"confirming (round {r + 1})")
        cost.add_masks(masks, int(part.tokens.numel()), stored=stored)
        if game.loss == "kl":  # the dense reference of these windows: measured unless every mask was stored
            cost.add(int(part.tokens.numel()), masks.shape[1] + 1, paid=game.reference_passes > 0)
        base = max(float(np.nanmin(nlls)), 0.0) if np.isfinite(nlls).any() else 0.0
        for i, v in zip(alive, nlls):
            total[i] += bounded_nll(float(v), base) * size
            windows[i] += size
        score = {i: total[i] / windows[i] for i in alive}
        rounds.append({"windows": size, "loss": game.loss_name, "plans": [{"remove": [int(j) for j in np.flatnonzero(~candidates[i])],
                                                   "nll": float(v), "pooled_nll": float(score[i])}
                                                  for i, v in zip(alive, nlls)]})
        ranked = sorted(alive, key=lambda i: (score[i], i))
        alive = ranked[:math.ceil(len(ranked) / 2)] if len(ranked) > 2 else ranked[:1]
        start += size
        r += 1
    best = min(alive, key=lambda i: (total[i] / windows[i] if windows[i] else math.inf, i))
    return Confirmation(candidates[best], rounds, cost, time.perf_counter() - started)
