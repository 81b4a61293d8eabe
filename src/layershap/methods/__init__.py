"""Pruning methods, registered by name; each takes (model, calibration windows, k) and returns a `Plan`.

Adding a method is one entry in `METHODS`.
"""

from __future__ import annotations

from collections.abc import Callable

from layershap.errors import LayershapError
from layershap.methods.base import Plan
from layershap.methods.shortgpt import shortgpt

METHODS: dict[str, Callable[..., Plan]] = {
    "shortgpt": shortgpt,
}


def get_method(name: str) -> Callable[..., Plan]:
    try:
        return METHODS[name]
    except KeyError:
        raise LayershapError(f"unknown method {name!r}; use one of {', '.join(METHODS)}") from None


def select_layers(method: str, model, windows, k: int, **options) -> Plan:
    """Run a registered method: which k blocks to remove."""
    return get_method(method)(model, windows, k, **options)
