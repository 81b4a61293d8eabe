"""What every pruning method returns: a `Plan` naming the blocks to remove and what finding them cost."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from layershap.errors import LayershapError
from layershap.plan.cost import Cost

__all__ = ["Cost", "Plan", "lowest_scoring"]


@dataclass
class Plan:
    """The blocks a method chose to remove.

    scores: one importance per block where the method has them (higher means more worth keeping).
    forward_passes: real-model forward passes over the calibration windows the method used (a backward
        pass counts as one more), served from the evaluation store or not; `cost` splits them into used and
        paid and counts token-passes too (see `Cost`). `select_layers` fills `cost` for a method that leaves
        it out, from its forward passes.
    """

    method: str
    n_layers: int
    remove: list[int]
    scores: list[float] | None = None
    forward_passes: int = 0
    seconds: float = 0.0
    details: dict = field(default_factory=dict)
    cost: Cost | None = None

    @property
    def kept(self) -> list[int]:
        removed = set(self.remove)
        return [i for i in range(self.n_layers) if i not in removed]

    def to_dict(self) -> dict:
        return {**asdict(self), "kept": self.kept}


def lowest_scoring(scores: Sequence[float], k: int, protect: Sequence[int] = ()) -> list[int]:
    """The k blocks with the lowest scores, never a protected one; ties go to the later block."""
    scores = np.asarray(scores, dtype=float)
    protected = set(protect)
    candidates = [i for i in range(len(scores)) if i not in protected]
    if k > len(candidates):
        raise LayershapError(f"cannot remove {k} layers: only {len(candidates)} are not protected; "
                             "protect fewer layers or lower --ratio")
    order = sorted(candidates, key=lambda i: (scores[i], -i))
    return sorted(order[:k])
