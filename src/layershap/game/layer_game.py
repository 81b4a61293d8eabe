"""The layer game: players are blocks, a coalition is the set of kept blocks, its worth is the model's quality.

Like a shapiq `Game`, a `LayerGame` is just a value function: call it with a boolean keep-mask (or a
`[coalitions, players]` array of them) and get the utility. Each call runs the real model with the dropped
blocks truly skipped. The game knows nothing of samplers, surrogates or Shapley values.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from layershap.errors import LayershapError
from layershap.game.nll import mean_nll
from layershap.game.prefix import PrefixSharingEvaluator, visiting_order
from layershap.models.layers import num_layers
from layershap.models.sublayers import check_sublayers, keep, sublayer_names

# A broken coalition can give inf/NaN loss; its NLL counts as this many nats above the full model's, so it
# stays in the data with a bounded utility instead of being dropped.
DIVERGED_NLL_MARGIN = 20.0


@dataclass(frozen=True)
class Utility:
    """Maps a coalition's mean NLL (and the full model's) to the value the game reports, and back.

    inverse: the NLL a utility value stands for, so surrogate predictions can be shown as perplexities.
    """

    name: str
    fn: Callable[[float, float], float]
    inverse: Callable[[float, float], float]
    description: str

    def __call__(self, nll: float, base_nll: float) -> float:
        return float(self.fn(bounded_nll(nll, base_nll), base_nll))

    def nll_of(self, utility: float, base_nll: float) -> float:
        return float(self.inverse(utility, base_nll))


def bounded_nll(nll: float, base_nll: float) -> float:
    """NLL with inf/NaN (a model that diverged) and anything worse replaced by a finite ceiling."""
    ceiling = base_nll + DIVERGED_NLL_MARGIN
    return ceiling if not math.isfinite(nll) else min(nll, ceiling)


UTILITIES: dict[str, Utility] = {}


def register_utility(utility: Utility) -> None:
    UTILITIES[utility.name] = utility


register_utility(Utility("ppl_ratio", lambda nll, base: math.exp(base - nll),
                         lambda u, base: base - math.log(max(u, 1e-300)),
                         "full-model perplexity / coalition perplexity (the paper's); in (0, ~1]"))
register_utility(Utility("neg_nll", lambda nll, base: -nll, lambda u, base: -u,
                         "minus the mean token NLL: linear in log-perplexity, keeps resolving broken models"))
register_utility(Utility("log_ratio", lambda nll, base: base - nll, lambda u, base: base - u,
                         "log(full perplexity / coalition perplexity): neg_nll shifted so the full model is 0"))


def get_utility(name: str) -> Utility:
    try:
        return UTILITIES[name]
    except KeyError:
        raise LayershapError(f"unknown utility {name!r}; use one of {', '.join(UTILITIES)}") from None


GRANULARITIES = ("block", "sublayer")


def check_granularity(granularity: str) -> str:
    if granularity not in GRANULARITIES:
        raise LayershapError(f"--granularity must be one of {', '.join(GRANULARITIES)}; got {granularity!r}")
    return granularity


class LayerGame:
    """Value function over coalitions of blocks, measured on calibration windows.

    model: a loaded causal LM (see `load_model`); windows: a `TextWindows` or a `[samples, seq_len]` tensor.
    granularity: "block" (n players, one per block) or "sublayer" (2n players: attn.0, mlp.0, attn.1, ...;
        `models/sublayers.py`).
    """

    def __init__(self, model, windows, *, utility: str = "neg_nll", batch_size: int = 8,
                 granularity: str = "block"):
        self.model = model
        self.tokens = getattr(windows, "tokens", windows)
        self.utility = get_utility(utility)
        self.batch_size = batch_size
        self.granularity = check_granularity(granularity)
        if granularity == "sublayer":
            check_sublayers(model)
        self.n_players = num_layers(model) * (2 if granularity == "sublayer" else 1)
        self.forward_passes = 0
        self._base_nll: float | None = None
        self._prefix: PrefixSharingEvaluator | None = None

    @property
    def base_nll(self) -> float:
        """Mean NLL of the full model (evaluated once)."""
        if self._base_nll is None:
            self._base_nll = self.nll(np.ones(self.n_players, dtype=bool))
        return self._base_nll

    def nll(self, mask) -> float:
        """Mean token NLL with only the kept blocks (one real forward pass over the windows)."""
        mask = self._check(mask)
        with keep(self.model, mask):
            value = mean_nll(self.model, self.tokens, batch_size=self.batch_size)
        self.forward_passes += 1
        return value

    def measure(self, masks) -> Iterator[tuple[int, float, float]]:
        """Mean NLL of many masks, yielding `(row, nll, seconds)` as each is known.

        Rows are visited in the order that shares the most leading blocks and resumed from cached hidden
        states (`game/prefix.py`), which gives the same values as `nll` at a fraction of the cost.
        """
        masks = np.asarray(masks, dtype=bool)
        for mask in masks:
            self._check(mask)
        if self._prefix is None:
            self._prefix = PrefixSharingEvaluator(self.model, self.tokens, batch_size=self.batch_size)
        for row in visiting_order(masks):
            started = time.perf_counter()
            value = self._prefix.nll(masks[row])
            self.forward_passes += 1
            yield int(row), value, time.perf_counter() - started

    @property
    def player_names(self) -> list[str]:
        n = num_layers(self.model)
        return sublayer_names(n) if self.granularity == "sublayer" else [str(i) for i in range(n)]

    def utility_of_nll(self, nll: float) -> float:
        return self.utility(nll, self.base_nll)

    def __call__(self, masks) -> float | np.ndarray:
        masks = np.asarray(masks, dtype=bool)
        if masks.ndim == 1:
            return self.utility_of_nll(self.nll(masks))
        return np.array([self.utility_of_nll(self.nll(m)) for m in masks])

    def _check(self, mask) -> np.ndarray:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (self.n_players,):
            raise LayershapError(f"a keep-mask needs {self.n_players} entries; got shape {mask.shape}")
        return mask
