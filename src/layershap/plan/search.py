"""Find the keep-masks a surrogate rates best among those that remove exactly k blocks.

Removing the k lowest-Shapley blocks is optimal only if blocks do not interact; the surrogate knows about
interactions (the pairwise one explicitly), so searching it directly for the best k-subset finds plans that
the ranking misses. Beam search over removal sets, then single swaps until no swap helps: every step is one
batched `predict` call, so a search over 30 blocks costs milliseconds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

Predict = Callable[[np.ndarray], np.ndarray]
POLISHED = 32  # beam members (best first) that the swap search refines; every start plan is refined too


def top_removal_masks(predict: Predict, n: int, k: int, *, protect: Sequence[int] = (), beam: int = 16,
                      count: int = 8, start: Sequence[Sequence[int]] = ()) -> list[np.ndarray]:
    """Up to `count` distinct keep-masks removing exactly k unprotected blocks, best predicted first.

    start: extra removal sets (e.g. the k lowest Shapley values) polished by the swap search and ranked
    with the beam's results.
    """
    allowed = allowed_blocks(n, protect)
    if k == 0:
        return [np.ones(n, dtype=bool)]
    frontier = [np.ones(n, dtype=bool)]
    for _ in range(k):
        children = {}
        for mask in frontier:
            for i in allowed[mask[allowed]]:
                child = mask.copy()
                child[i] = False
                children[child.tobytes()] = child
        pool = np.array(list(children.values()))
        scores = predict(pool)
        frontier = list(pool[np.argsort(-scores, kind="stable")[:beam]])
    frontier.extend(removal_mask(n, removal) for removal in start)
    polished = {m.tobytes(): m for m in (_swap_search(predict, m, allowed)
                                         for m in frontier[:POLISHED] + frontier[len(frontier) - len(start):])}
    candidates = {**{m.tobytes(): m for m in frontier}, **polished}
    pool = np.array(list(candidates.values()))
    order = np.argsort(-predict(pool), kind="stable")
    return [pool[i] for i in order[:count]]


def _swap_search(predict: Predict, mask: np.ndarray, allowed: np.ndarray, max_rounds: int = 50) -> np.ndarray:
    """Exchange one removed and one kept block while the prediction improves."""
    best = mask.copy()
    best_score = float(predict(best[None])[0])
    for _ in range(max_rounds):
        swaps = single_swaps(best, allowed)
        if len(swaps) == 0:
            break
        scores = predict(swaps)
        top = int(np.argmax(scores))
        if scores[top] <= best_score + 1e-12:
            break
        best, best_score = swaps[top], float(scores[top])
    return best


def single_swaps(mask: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Every keep-mask one exchange away from `mask`: one removed block kept and one kept block removed, both
    among `allowed`; `[0, n]` when there is nothing to exchange."""
    removed, kept = allowed[~mask[allowed]], allowed[mask[allowed]]
    swaps = np.repeat(mask[None], len(removed) * len(kept), axis=0)
    rows = np.arange(len(swaps))
    swaps[rows, np.repeat(removed, len(kept))] = True
    swaps[rows, np.tile(kept, len(removed))] = False
    return swaps


def allowed_blocks(n: int, protect: Sequence[int] = ()) -> np.ndarray:
    """The blocks a plan may remove: all n but the protected ones."""
    return np.array([i for i in range(n) if i not in set(protect)])


def removal_mask(n: int, removal: Sequence[int]) -> np.ndarray:
    """The keep-mask of n blocks without the blocks in `removal`."""
    mask = np.ones(n, dtype=bool)
    mask[list(removal)] = False
    return mask
