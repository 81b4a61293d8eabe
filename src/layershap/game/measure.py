"""The one place where a game's measurements meet the store: read what is known, measure the rest, commit.

Whoever needs NLLs of many masks (the estimate, the plan search, a method checking its plan) calls
`evaluate_masks`, so every evaluation is paid for once and a killed run resumes where it stopped.
"""

from __future__ import annotations

import numpy as np

from layershap.game.context import measurement_context
from layershap.game.layer_game import LayerGame
from layershap.game.store import EvaluationStore, mask_key
from layershap.progress import progress_bar


def evaluate_masks(game: LayerGame, store: EvaluationStore, masks: np.ndarray, *,
                   description: str = "evaluating masks") -> tuple[np.ndarray, int, int]:
    """NLL of every mask, from the store where present, else measured and committed at once.

    The masks are measured by the active backend (in this process unless `layershap.game.backends.use_backend`
    set another, e.g. Ray workers); only this function writes the store, one commit per result.

    Returns (nlls, evaluated now, reused from the store).
    """
    from layershap.game.backends import active_backend

    context = measurement_context(game)
    known = store.get_many(context, masks)
    todo = [i for i, m in enumerate(masks) if mask_key(m) not in known]
    nlls = np.array([known.get(mask_key(m), np.nan) for m in masks], dtype=float)
    if todo:
        with progress_bar(len(todo), description) as advance:
            for position, nll, seconds in active_backend().evaluate(game, masks[todo], context=context,
                                                                    model_fp=store.model_fp):
                i = todo[position]
                nlls[i] = nll
                store.put(context, masks[i], nlls[i], seconds)
                advance()
    return nlls, len(todo), len(masks) - len(todo)
