"""What a pruning ratio means: how many whole blocks it removes."""

from __future__ import annotations

from layershap.errors import LayershapError


def check_ratio(ratio: float) -> None:
    if not 0.0 < ratio < 1.0:
        raise LayershapError(f"--ratio must lie strictly between 0 and 1; got {ratio}")


def layers_to_remove(ratio: float, n_layers: int) -> int:
    """round(ratio * n), refused when that would remove no block or every block."""
    check_ratio(ratio)
    k = round(ratio * n_layers)
    if k < 1:
        raise LayershapError(f"--ratio {ratio} removes no block of {n_layers} (round({ratio} * {n_layers}) = 0); "
                             f"use at least {0.5 / n_layers:.3f}")
    if k >= n_layers:
        raise LayershapError(f"--ratio {ratio} would remove all {n_layers} blocks; use a smaller ratio")
    return k
