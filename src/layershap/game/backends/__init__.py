"""Where masked evaluations run: in this process (`local`, the default) or on a Ray cluster (`ray`).

A backend only measures: given a game and a batch of keep-masks it yields `(position, nll, seconds)` for
each mask as results arrive. The driver (`layershap.game.measure.evaluate_masks`) alone writes them to the
evaluation store, so a run resumes exactly the same way whichever backend measured it.

The backend in use is set for a block of code with `use_backend(backend)`, so that every evaluation inside
it (the estimate, a method's check of its plan) goes to the same workers without each caller passing it on.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Protocol

from layershap.errors import LayershapError
from layershap.game.backends.spec import ModelSpec

if TYPE_CHECKING:
    import numpy as np

BACKENDS = ("local", "ray")


class Backend(Protocol):
    name: str

    def evaluate(self, game, masks: np.ndarray, *, context: str, model_fp: str) -> Iterator[tuple[int, float, float]]:
        """Yield (row of `masks`, mean NLL, seconds spent) for every row, in any order."""

    def close(self) -> None: ...


_ACTIVE: ContextVar[Backend | None] = ContextVar("layershap_backend", default=None)


@contextmanager
def use_backend(backend: Backend | None):
    """Send every mask evaluation inside the block to `backend` (None: evaluate in this process)."""
    token = _ACTIVE.set(backend)
    try:
        yield backend
    finally:
        _ACTIVE.reset(token)


def active_backend() -> Backend:
    """The backend set by `use_backend`, else in-process evaluation."""
    from layershap.game.backends.local import LocalBackend

    return _ACTIVE.get() or LocalBackend()


def make_backend(name: str = "local", *, spec: ModelSpec | None = None, address: str | None = None,
                 **options) -> Backend:
    """A backend by name. `ray` checks now that Ray is installed and `address` (if any) answers."""
    if name == "local":
        if address:
            raise LayershapError("--ray-address needs --backend ray")
        from layershap.game.backends.local import LocalBackend

        return LocalBackend()
    if name == "ray":
        from layershap.game.backends.ray_backend import RayBackend

        return RayBackend(spec or ModelSpec(), address=address, **options)
    raise LayershapError(f"unknown backend {name!r}; use one of {', '.join(BACKENDS)}")
