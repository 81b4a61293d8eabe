"""What a keep-mask costs against `--budget`.

`--budget` is a number of full-size passes (the full model over the calibration windows). A mask runs only
its kept blocks plus the head (final norm and LM head, counted as one block), so it is charged
(kept blocks + 1) / (n + 1) of a full pass: the same unit as the token-passes in `plan/cost.py`. A budget of
B therefore buys B full passes' worth of token-passes, and more masks when the masks keep fewer blocks.
In the sublayer game (2n players) an attention or MLP sublayer counts as half a block.

The paper's recipe counts masks instead (8000 of them, whatever they keep): `budget_unit="masks"` charges
every mask 1.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

BUDGET_UNITS = ("full_passes", "masks")


def blocks_run(mask, n_blocks: int) -> float:
    """The block-equivalents a keep-mask runs: its kept blocks plus the head (one block); over 2 * n_blocks
    sublayers, an attention or MLP sublayer is half a block. The one definition behind the budget's charge
    here and the token-passes of `plan/cost.py`."""
    mask = np.asarray(mask, dtype=bool)
    return float(mask.sum() * n_blocks / mask.shape[-1] + 1)


def mask_share(n_blocks: int, unit: str = "full_passes") -> Callable[[np.ndarray], float]:
    """The charge of one keep-mask (over n_blocks blocks or 2 * n_blocks sublayers) in budget units."""
    if unit == "masks":
        return lambda mask: 1.0
    return lambda mask: blocks_run(mask, n_blocks) / (n_blocks + 1)


def spent(masks: Iterable, share: Callable[[np.ndarray], float]) -> float:
    """The budget units a set of masks used."""
    return float(sum(share(m) for m in masks))


# A budget is spent when what is left buys less than this share of a full pass; it absorbs float rounding of
# the shares' sums (a budget of B full passes with B full-model masks is spent, not 1e-15 short).
SPENT_TOLERANCE = 1e-9
