"""Leave-one-out perplexity (Shortened LLaMA's PPL criterion): remove the blocks missed least alone.

From Kim et al., 2024, "Shortened LLaMA: Depth Pruning for Large Language Models".

Each block is removed on its own and the calibration NLL of the rest of the model is measured. A block's
score is how much its removal alone raises the NLL, score_i = NLL(without i) - NLL(full) (higher means more
worth keeping, as in every `Plan`); the k blocks whose individual removal hurts least are removed. Ranking by
-(NLL without i), the worth of the coalition without i, would invert this order, so the score is the
increase instead.

Cost: n + 1 forward passes (the full model once, then every block left out once; protected blocks are
measured too so that every block has a score). A diverged model (inf/NaN loss) counts as the full model's
NLL plus `DIVERGED_NLL_MARGIN`, as in the layer game.

Shortened LLaMA's pruning script by default also never removes the first four and the last two blocks (the
"+" of its Taylor+); pass those as `protect` to reproduce it.
"""

from __future__ import annotations

import time

import numpy as np

from layershap.game.layer_game import LayerGame, bounded_nll
from layershap.models.layers import num_layers
from layershap.plan.methods._common import removable, tokens_of
from layershap.plan.methods.base import Cost, Plan, lowest_scoring


def leave_one_out_nll(game: LayerGame) -> list[float]:
    """Mean calibration NLL with each block left out in turn (n passes), measured together (`game.measure`:
    the same values as one pass per mask, with shared prefixes, and a streamed model's blocks read once)."""
    n = game.n_players
    masks = ~np.eye(n, dtype=bool)
    nlls = [0.0] * n
    for row, nll, _ in game.measure(masks):
        nlls[row] = nll
    return nlls


def loo_scores(base_nll: float, nlls_without) -> list[float]:
    """Each block's score: how much the calibration NLL rises when it alone is removed (bounded)."""
    return [bounded_nll(v, base_nll) - base_nll for v in nlls_without]


def loo(model, windows, k: int, *, protect=(), batch_size: int = 8, **_) -> Plan:
    start = time.perf_counter()
    n = num_layers(model)
    removable(n, k, protect)
    game = LayerGame(model, windows, batch_size=batch_size)
    base = game.base_nll
    nlls = [bounded_nll(v, base) for v in leave_one_out_nll(game)]
    scores = loo_scores(base, nlls)
    tokens = int(tokens_of(windows).numel())
    cost = Cost.full_passes(1, tokens, n)
    cost.add(tokens, n, passes=n)  # every block left out once: n - 1 blocks and the head
    return Plan("loo", n, lowest_scoring(scores, k, protect), scores, forward_passes=game.forward_passes,
                seconds=time.perf_counter() - start, details={"base_nll": base, "nll_without": nlls}, cost=cost)
