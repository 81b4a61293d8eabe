"""The one place where a game's measurements meet the store: read what is known, measure the rest, commit.

Whoever needs NLLs of many masks (the estimate, the plan search, a method checking its plan) calls
`evaluate_masks`, so every evaluation is paid for once and a killed run resumes where it stopped.

Runs that share a store share the work: a run leases a slice of the masks nobody has measured or leased
(in the order that shares leading blocks, so prefix sharing still pays), measures it, and leases the next;
masks another run holds are waited for and read from the store once that run commits them. A lease lapses
`LEASE_SECONDS` after its holder last committed a result, so the masks of a killed run are taken over.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from layershap.game.context import context_description, context_differences, context_key
from layershap.game.layer_game import LayerGame
from layershap.game.prefix import visiting_order
from layershap.game.store import EvaluationStore, mask_key
from layershap.progress import progress_bar

# A lease lapses this long after its holder's last result; one mask must take less (a 7B model's full pass
# over 8 windows of 128 tokens takes well under a second on a GPU and a few seconds on a CPU).
LEASE_SECONDS = 120.0
# How often a run waiting for another run's masks looks at the store.
POLL_SECONDS = 0.25
# Masks leased at a time: an eighth of what is left, at least this many (prefix sharing works within a slice).
MIN_SLICE = 8


@dataclass
class Measured:
    """What `evaluate_masks` did besides the values: how many masks it measured itself, how many it read
    from the store (`from_concurrent` of them measured meanwhile by a concurrent run), and the stored rows of
    the other masks that were measured under other conditions and so not reused, counted by what differed."""

    evaluated: int = 0
    reused: int = 0
    from_concurrent: int = 0
    other_contexts: dict[str, int] = field(default_factory=dict)


def evaluate_masks(game: LayerGame, store: EvaluationStore, masks: np.ndarray, *,
                   description: str = "evaluating masks", measured: Measured | None = None
                   ) -> tuple[np.ndarray, int, int]:
    """NLL of every mask, from the store where present, else measured and committed at once.

    The masks are measured by the active backend (in this process unless `layershap.game.backends.use_backend`
    set another, e.g. Ray workers); only this function writes the store, one commit per result. `measured`, if
    given, is filled in with the details (`Measured`).

    Returns (nlls, evaluated now, reused from the store).
    """
    from layershap.game.backends import active_backend

    measured = measured if measured is not None else Measured()
    masks = np.asarray(masks, dtype=bool)
    about = context_description(game)
    context = context_key(about)
    store.describe(context, about)
    known = store.get_many(context, masks)
    nlls = np.array([known.get(mask_key(m), np.nan) for m in masks], dtype=float)
    todo = [i for i, m in enumerate(masks) if mask_key(m) not in known]
    if todo:
        for other, (count, theirs) in store.elsewhere(context, masks[todo]).items():
            why = ", ".join(context_differences(about, theirs)) or other
            measured.other_contexts[why] = measured.other_contexts.get(why, 0) + count
    evaluated = 0
    if todo:
        from layershap.models.stream import streamer_of

        backend = active_backend()
        streamed = streamer_of(game.model) is not None
        # one row per distinct mask, in the order that shares leading blocks
        rows: dict[str, list[int]] = {}
        for i in todo:
            rows.setdefault(mask_key(masks[i]), []).append(i)
        pending = [rows_[0] for rows_ in rows.values()]
        pending = [pending[j] for j in visiting_order(masks[pending])]
        with progress_bar(len(todo), description) as advance:
            try:
                while pending:
                    # a streamed model claims every mask at once: its sweep brings each block in once per
                    # call (game/sweep.py), so slicing would read the weights once per slice
                    size = len(pending) if streamed else max(MIN_SLICE, math.ceil(len(pending) / 8))
                    claimed = set(store.claim(context, masks[pending], ttl=LEASE_SECONDS, limit=size))
                    mine = [i for i in pending if mask_key(masks[i]) in claimed]
                    for position, nll, seconds in (backend.evaluate(game, masks[mine], context=context,
                                                                    model_fp=store.model_fp) if mine else ()):
                        i = mine[position]
                        store.put(context, masks[i], nll, seconds)
                        store.renew(context, ttl=LEASE_SECONDS)
                        for j in rows[mask_key(masks[i])]:
                            nlls[j] = nll
                            advance()
                        evaluated += 1
                    store.release(context)
                    done = set(mine)
                    waiting = [i for i in pending if i not in done]
                    if waiting:
                        found = store.get_many(context, masks[waiting])
                        for i in waiting:
                            if mask_key(masks[i]) in found:
                                for j in rows[mask_key(masks[i])]:
                                    nlls[j] = found[mask_key(masks[i])]
                                    advance()
                                measured.from_concurrent += len(rows[mask_key(masks[i])])
                        waiting = [i for i in waiting if mask_key(masks[i]) not in found]
                        if waiting and not mine:  # all held by other runs: wait for their results
                            time.sleep(POLL_SECONDS)
                    pending = waiting
            finally:
                store.release(context)
    measured.evaluated += evaluated
    measured.reused += len(masks) - evaluated
    return nlls, evaluated, len(masks) - evaluated
