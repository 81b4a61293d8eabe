"""The layer game: players are blocks, a coalition is the set of kept blocks, its worth is the model's quality.

Like a shapiq `Game`, a `LayerGame` is just a value function: call it with a boolean keep-mask (or a
`[coalitions, players]` array of them) and get the utility. Each call runs the real model with the dropped
blocks truly skipped. The game knows nothing of samplers, surrogates or Shapley values.

What a call measures is the utility's loss: the mean token NLL on the calibration windows (every utility but
`kl`), or the mean KL(dense || pruned) of the next-token distribution (`kl`, `game/kl.py`). The methods
keep the NLL's names (`nll`, `base_nll`, `nlls`) for the measured loss whichever it is.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from layershap.errors import LayershapError
from layershap.game.kl import KL_TOP_K, DenseReference, dense_reference
from layershap.game.nll import BatchLoss, batch_nll, mean_loss
from layershap.game.prefix import PrefixSharingEvaluator, visiting_order
from layershap.game.sweep import BlockSweep, supports_sweep
from layershap.models.layers import num_layers
from layershap.models.stream import streamer_of
from layershap.models.sublayers import check_sublayers, keep, sublayer_names

# A broken coalition can give inf/NaN loss; its NLL counts as this many nats above the full model's, so it
# stays in the data with a bounded utility instead of being dropped.
DIVERGED_NLL_MARGIN = 20.0


@dataclass(frozen=True)
class Utility:
    """Maps a coalition's measured loss (and the full model's) to the value the game reports, and back.

    inverse: the loss a utility value stands for, so surrogate predictions can be shown as perplexities (of
        an NLL; a KL is no perplexity).
    loss: what the game measures for this utility: "nll" (mean token NLL) or "kl" (mean KL from the dense
        model, `game/kl.py`).
    """

    name: str
    fn: Callable[[float, float], float]
    inverse: Callable[[float, float], float]
    description: str
    loss: str = "nll"

    @property
    def loss_name(self) -> str:
        """The measured loss as the store's context names it ("mean_nll", "mean_kl_top64")."""
        return loss_name(self.loss)

    def __call__(self, nll: float, base_nll: float) -> float:
        return float(self.fn(bounded_nll(nll, base_nll), base_nll))

    def nll_of(self, utility: float, base_nll: float) -> float:
        return float(self.inverse(utility, base_nll))


def loss_name(loss: str) -> str:
    return "mean_nll" if loss == "nll" else f"mean_kl_top{KL_TOP_K}"


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
register_utility(Utility("kl", lambda kl, base: -kl, lambda u, base: -u,
                         f"minus the mean KL(dense || pruned) of the next-token distribution (the dense model's "
                         f"top {KL_TOP_K} tokens and the rest); the full model is 0", loss="kl"))


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
    utility: a registered utility's name; it also decides the measured loss (`Utility.loss`). With "kl" the
        game measures the dense model's reference once, before its first masked evaluation
        (`reference_passes` counts that pass; `forward_passes` counts masked evaluations only).
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
        self.reference_passes = 0
        self.reference: DenseReference | None = None
        self._base_nll: float | None = None
        self._prefix: PrefixSharingEvaluator | None = None
        self._sweep: BlockSweep | None = None

    @property
    def loss(self) -> str:
        """What the game measures: "nll" or "kl" (`Utility.loss`)."""
        return self.utility.loss

    @property
    def loss_name(self) -> str:
        """The measured loss as the store's context names it (`Utility.loss_name`)."""
        return self.utility.loss_name

    @property
    def base_nll(self) -> float:
        """The full model's measured loss: its mean NLL (evaluated once), or for KL exactly 0 (the full model
        is the reference; tests check that measuring it gives 0)."""
        if self._base_nll is None:
            self._base_nll = 0.0 if self.loss == "kl" else self.nll(np.ones(self.n_players, dtype=bool))
        return self._base_nll

    def batch_loss(self) -> BatchLoss:
        """The per-batch loss every evaluation runs; for KL the dense reference, measured on first use (the
        model must be whole then, as it is outside the game's evaluations)."""
        if self.loss == "nll":
            return batch_nll
        if self.reference is None:
            self.reference = dense_reference(self.model, self.tokens, batch_size=self.batch_size)
            self.reference_passes += 1
        return self.reference

    def nll(self, mask) -> float:
        """The measured loss (mean token NLL, or mean KL for `kl`) with only the kept blocks: one real
        forward pass over the windows."""
        mask = self._check(mask)
        loss = self.batch_loss()
        with keep(self.model, mask):
            value = mean_loss(self.model, self.tokens, batch_size=self.batch_size, loss=loss)
        self.forward_passes += 1
        return value

    def measure(self, masks) -> Iterator[tuple[int, float, float]]:
        """Measured loss of many masks, yielding `(row, nll, seconds)` as each is known.

        Rows are visited in the order that shares the most leading blocks and resumed from cached hidden
        states (`game/prefix.py`), which gives the same values as `nll` at a fraction of the cost.
        """
        masks = np.asarray(masks, dtype=bool)
        for mask in masks:
            self._check(mask)
        if self.granularity == "block" and streamer_of(self.model) is not None and supports_sweep(self.model):
            yield from self._swept(masks)
            return
        if self._prefix is None:
            self._prefix = PrefixSharingEvaluator(self.model, self.tokens, batch_size=self.batch_size,
                                                  loss=self.batch_loss())
        for row in visiting_order(masks):
            started = time.perf_counter()
            value = self._prefix.nll(masks[row])
            self.forward_passes += 1
            yield int(row), value, time.perf_counter() - started

    def _swept(self, masks: np.ndarray) -> Iterator[tuple[int, float, float]]:
        """A streamed model's masks, block by block (`game/sweep.py`): each block loaded once per chunk."""
        if self._sweep is None:
            self._sweep = BlockSweep(self.model, self.tokens, batch_size=self.batch_size, loss=self.batch_loss())
        for row, value, seconds in self._sweep.measure(masks):
            self.forward_passes += 1
            yield row, value, seconds

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
