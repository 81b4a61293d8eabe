"""Plans worth measuring before any surrogate has an opinion: the cheap baselines' choices.

The surrogate's search is blind to plans that the sampled masks never came near. Removing a whole run of
neighbouring blocks is such a plan: random masks almost never drop six adjacent blocks together, so no
surrogate fitted to them learns that the run is cheap to lose as a whole (on SmolLM2 at k = 7, blocks 12-17
and 26 give calibration perplexity 123 where the best plan the surrogate found gave 137). ShortGPT's
block influence and the angular distance of runs see exactly this from one forward pass, so the search
measures their plans first and builds on whichever is best. The seeds cost one traced pass, counted in
the method's forward passes. The leave-one-out plan costs nothing more: the `target` sampler measures every
single removal first, which is all leave-one-out needs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from layershap.models.layers import num_layers
from layershap.models.trace import traced_pass
from layershap.plan.methods._common import removable, tokens_of
from layershap.plan.methods.angular import LastTokenStates, closest_run, run_distances, run_starts
from layershap.plan.methods.base import lowest_scoring
from layershap.plan.methods.loo import loo_scores
from layershap.plan.methods.shortgpt import BlockInfluence
from layershap.plan.search import removal_mask


def one_pass_seeds(model, windows, k: int, *, protect: Sequence[int] = (), batch_size: int = 8) -> list[list[int]]:
    """Removal sets of ShortGPT (k lowest block influences) and of the angular distance (the closest run of k
    blocks avoiding protected ones), from a single forward pass watched by both methods' recorders;
    duplicates dropped."""
    n = num_layers(model)
    removable(n, k, protect)
    if k == 0:
        return []
    tokens = tokens_of(windows)
    influence, states = BlockInfluence(n), LastTokenStates(n)

    def record(index, hidden_in, hidden_out):
        influence(index, hidden_in, hidden_out)
        states(index, hidden_in, hidden_out)

    traced_pass(model, tokens, record, batch_size=batch_size)
    seeds = [lowest_scoring(influence.scores(tokens.numel()), k, protect)]
    starts = run_starts(n, k, protect)
    if starts:
        best = closest_run(run_distances(*states.tensors(), k), starts)
        seeds.append(list(range(best, best + k)))
    return [seed for i, seed in enumerate(seeds) if seed not in seeds[:i]]


def leave_one_out_seed(masks: np.ndarray, nlls: np.ndarray, k: int, *, protect: Sequence[int] = ()) -> list[int] | None:
    """The leave-one-out plan (`methods.loo`) read off measurements that include the full model and every
    single removal; None when some are missing or k is 0."""
    masks = np.asarray(masks, dtype=bool)
    n = masks.shape[1]
    if k == 0:
        return None
    nll_of = {m.tobytes(): float(v) for m, v in zip(masks, nlls)}
    wanted = [removal_mask(n, []), *(removal_mask(n, [i]) for i in range(n))]
    if any(m.tobytes() not in nll_of for m in wanted):
        return None
    base, *without = (nll_of[m.tobytes()] for m in wanted)
    return lowest_scoring(loo_scores(base, without), k, protect)
