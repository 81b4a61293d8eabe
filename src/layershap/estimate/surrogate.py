"""Surrogates: cheap models of the layer game, trained on the masks we paid forward passes for.

Like a shapiq approximator, a surrogate is fitted on (keep-mask, utility) pairs and then stands in for the
game: `predict` gives the utility of any mask, so Shapley values can be computed from millions of
coalitions without touching the model. Every surrogate here is deterministic given its seed (a local
`torch.Generator` / numpy `Generator`; global RNG state is never touched). Small training problems run on
one torch thread, with the global thread count restored afterwards. Adding one is an entry in `SURROGATES`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from scipy.stats import spearmanr

from layershap.errors import LayershapError

# Masks per chunk in `predict`, so predicting all 2^20 coalitions never builds one huge tensor.
PREDICT_CHUNK = 1 << 16
# Work on at most this many tensor entries runs on one thread (see `_one_thread`).
SMALL_PROBLEM = 1 << 20


@runtime_checkable
class Surrogate(Protocol):
    n_players: int

    def fit(self, masks: np.ndarray, y: np.ndarray) -> Surrogate: ...

    def predict(self, masks: np.ndarray) -> np.ndarray: ...


def _masks(masks, n_players: int) -> np.ndarray:
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim == 1:
        masks = masks[None]
    if masks.ndim != 2 or masks.shape[1] != n_players:
        raise LayershapError(f"masks must be a [coalitions, {n_players}] array; got shape {masks.shape}")
    return masks


def _training_data(masks, y, n_players: int) -> tuple[np.ndarray, np.ndarray]:
    masks = _masks(masks, n_players)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if y.shape[0] != masks.shape[0]:
        raise LayershapError(f"got {masks.shape[0]} masks but {y.shape[0]} utilities")
    if masks.shape[0] < 2:
        raise LayershapError(f"a surrogate needs at least 2 evaluated masks; got {masks.shape[0]}")
    if not np.all(np.isfinite(y)):
        raise LayershapError("utilities must be finite to fit a surrogate (bound diverged losses first)")
    return masks, y


def _init_linear_(weight: torch.Tensor, bias: torch.Tensor, fan_in: int, generator: torch.Generator) -> None:
    """nn.Linear's default init (kaiming_uniform a=sqrt(5), i.e. U(+-1/sqrt(fan_in))), locally seeded."""
    bound = 1.0 / math.sqrt(fan_in)
    with torch.no_grad():
        weight.uniform_(-bound, bound, generator=generator)
        bias.uniform_(-bound, bound, generator=generator)


@contextmanager
def _one_thread():
    """Train tiny networks on one intra-op thread: for tensors this small, extra threads only add
    synchronisation (and stall badly when the cores are shared). Restores the previous setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _chunked(masks: np.ndarray, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    parts = [fn(masks[start:start + PREDICT_CHUNK]) for start in range(0, masks.shape[0], PREDICT_CHUNK)]
    return np.concatenate(parts, axis=-1) if parts else np.zeros(0)


# --- paper: the official MLP ----------------------------------------------------------------------------


class PaperMLP:
    """The official code's surrogate: Linear(n, 2n) -> CELU -> Linear(2n, 1) -> Sigmoid, MSE loss, SGD
    (lr 0.008, momentum 0.9), batch 300, 300 epochs, StepLR x0.1 every 100 epochs.

    The sigmoid output assumes the paper's utility, the perplexity ratio in (0, 1], and such targets are
    used as-is. Targets outside [0, 1] (neg_nll, log_ratio) are min-max scaled into [0, 1] on the training
    set and `predict` maps back, so the same network works for any utility (its outputs then stay within
    the training range).

    `fit` starts from fresh weights every time (seeded), so it is a pure function of seed and data.
    """

    def __init__(self, n_players: int, seed: int = 0, *, epochs: int = 300, lr: float = 0.008,
                 momentum: float = 0.9, batch_size: int = 300, step_size: int = 100, gamma: float = 0.1):
        self.n_players, self.seed = n_players, seed
        self.epochs, self.lr, self.momentum, self.batch_size = epochs, lr, momentum, batch_size
        self.step_size, self.gamma = step_size, gamma
        # skip_init: nn.Linear's own init would draw from the global RNG; ours uses a local generator.
        linear = torch.nn.utils.skip_init
        self.net = torch.nn.Sequential(linear(torch.nn.Linear, n_players, 2 * n_players), torch.nn.CELU(),
                                       linear(torch.nn.Linear, 2 * n_players, 1), torch.nn.Sigmoid())
        self._reset()
        self.scale: tuple[float, float] = (0.0, 1.0)  # y = low + span * network output
        self.optimizer_: torch.optim.SGD | None = None
        self.scheduler_: torch.optim.lr_scheduler.StepLR | None = None
        self.losses_: list[float] = []

    def _reset(self) -> None:
        self.generator = torch.Generator().manual_seed(self.seed)
        for layer in (self.net[0], self.net[2]):
            _init_linear_(layer.weight, layer.bias, layer.in_features, self.generator)

    def fit(self, masks, y) -> PaperMLP:
        masks, y = _training_data(masks, y, self.n_players)
        self._reset()
        self.losses_ = []
        if y.min() < 0.0 or y.max() > 1.0:
            span = float(y.max() - y.min()) or 1.0
            self.scale = (float(y.min()), span)
        else:
            self.scale = (0.0, 1.0)
        x = torch.from_numpy(masks.astype(np.float32))
        target = torch.from_numpy(((y - self.scale[0]) / self.scale[1]).astype(np.float32))[:, None]
        self.optimizer_ = torch.optim.SGD(self.net.parameters(), lr=self.lr, momentum=self.momentum)
        self.scheduler_ = torch.optim.lr_scheduler.StepLR(self.optimizer_, step_size=self.step_size,
                                                          gamma=self.gamma)
        self.net.train()
        with _one_thread():
            self._train(x, target)
        self.net.eval()
        return self

    def _train(self, x: torch.Tensor, target: torch.Tensor) -> None:
        loss_fn = torch.nn.MSELoss()
        for _ in range(self.epochs):
            order = torch.randperm(x.shape[0], generator=self.generator)
            total = 0.0
            for start in range(0, x.shape[0], self.batch_size):
                batch = order[start:start + self.batch_size]
                self.optimizer_.zero_grad()
                loss = loss_fn(self.net(x[batch]), target[batch])
                loss.backward()
                self.optimizer_.step()
                total += float(loss.detach()) * batch.numel()
            self.scheduler_.step()
            self.losses_.append(total / x.shape[0])

    def predict(self, masks) -> np.ndarray:
        masks = _masks(masks, self.n_players)

        def run(chunk: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                out = self.net(torch.from_numpy(chunk.astype(np.float32)))[:, 0].double().numpy()
            return self.scale[0] + self.scale[1] * out

        return _chunked(masks, run)


# --- ridge: linear and pairwise -------------------------------------------------------------------------

RIDGE_ALPHAS = tuple(10.0 ** k for k in range(-4, 4))


def _ridge_path(x: np.ndarray, y: np.ndarray, alphas) -> tuple[np.ndarray, np.ndarray]:
    """Ridge coefficients [alphas, features] and intercepts [alphas]; the intercept is not penalised.

    One SVD serves every alpha. It runs in torch: on one thread for small problems, where a threaded BLAS
    only adds synchronisation (numpy's OpenBLAS was 5-50x slower on shared cores).
    """
    x_mean, y_mean = x.mean(0), y.mean()
    small = x.size <= SMALL_PROBLEM
    with _one_thread() if small else nullcontext():
        u, s, vt = (t.numpy() for t in torch.linalg.svd(torch.from_numpy(x - x_mean), full_matrices=False))
    uty = u.T @ (y - y_mean)
    coefs = np.stack([vt.T @ (s / (s * s + a) * uty) for a in alphas])
    return coefs, y_mean - coefs @ x_mean


class RidgeSurrogate:
    """Ridge regression on the mask bits (`linear`), optionally plus all pairwise products (`pairwise`).

    The pairwise model v(S) = b + sum_i w_i x_i + sum_{i<j} w_ij x_i x_j is a second-order game, so its
    Shapley values are analytic: phi_i = w_i + 1/2 sum_j w_ij (`shapley_values`). alpha=None picks the
    ridge strength from `alphas` by K-fold CV (folds shuffled with the seed); a fixed alpha skips the CV.
    """

    def __init__(self, n_players: int, seed: int = 0, *, pairwise: bool = False, alpha: float | None = None,
                 alphas=RIDGE_ALPHAS, folds: int = 5):
        self.n_players, self.seed, self.pairwise = n_players, seed, pairwise
        self.alpha, self.alphas, self.folds = alpha, tuple(alphas), folds
        self.alpha_: float | None = None
        self.cv_mse_: dict[float, float] = {}
        self.weights: np.ndarray | None = None        # [n] first-order weights
        self.interactions: np.ndarray | None = None   # [n, n] symmetric, zero diagonal: W[i, j] = w_ij
        self.intercept = 0.0

    def features(self, masks: np.ndarray) -> np.ndarray:
        x = masks.astype(np.float64)
        if not self.pairwise:
            return x
        i, j = np.triu_indices(self.n_players, 1)
        return np.concatenate([x, x[:, i] * x[:, j]], axis=1)

    def fit(self, masks, y) -> RidgeSurrogate:
        masks, y = _training_data(masks, y, self.n_players)
        x = self.features(masks)
        self.alpha_ = self.alpha if self.alpha is not None else self._cross_validate(x, y)
        coefs, intercepts = _ridge_path(x, y, [self.alpha_])
        coef, self.intercept = coefs[0], float(intercepts[0])
        n = self.n_players
        self.weights = coef[:n]
        self.interactions = np.zeros((n, n))
        if self.pairwise:
            i, j = np.triu_indices(n, 1)
            self.interactions[i, j] = self.interactions[j, i] = coef[n:]
        return self

    def _cross_validate(self, x: np.ndarray, y: np.ndarray) -> float:
        folds = min(self.folds, x.shape[0])
        if folds < 2:
            return self.alphas[len(self.alphas) // 2]
        order = np.random.default_rng(self.seed).permutation(x.shape[0])
        errors = np.zeros(len(self.alphas))
        for part in np.array_split(order, folds):
            train = np.setdiff1d(order, part)
            coefs, intercepts = _ridge_path(x[train], y[train], self.alphas)
            pred = x[part] @ coefs.T + intercepts
            errors += ((pred - y[part][:, None]) ** 2).sum(0)
        errors /= x.shape[0]
        self.cv_mse_ = dict(zip(self.alphas, errors.tolist(), strict=True))
        # Ties (within float noise) go to the stronger penalty.
        best = errors.min()
        return max(a for a, e in zip(self.alphas, errors, strict=True) if e <= best * (1 + 1e-9) + 1e-15)

    def predict(self, masks) -> np.ndarray:
        if self.weights is None:
            raise LayershapError("fit the surrogate before predicting")
        masks = _masks(masks, self.n_players)

        def run(chunk: np.ndarray) -> np.ndarray:
            x = chunk.astype(np.float64)
            out = self.intercept + x @ self.weights
            if self.pairwise:
                out += 0.5 * np.einsum("mi,mi->m", x @ self.interactions, x)
            return out

        return _chunked(masks, run)

    def shapley_values(self) -> np.ndarray:
        """Exact Shapley values of the fitted model as a game: phi_i = w_i + 1/2 sum_j w_ij."""
        if self.weights is None:
            raise LayershapError("fit the surrogate before asking for its Shapley values")
        return self.weights + 0.5 * self.interactions.sum(1)


# --- ensemble: bootstrap MLPs with a disagreement estimate ----------------------------------------------


class EnsembleMLP:
    """K small MLPs (n -> hidden -> 1, GELU), each fitted on its own bootstrap of the data; `predict` is the
    mean and `predict_std` the members' disagreement (for active sampling).

    All members train at once as batched tensors (a bootstrap is a per-member weight on each sample), with
    full-batch AdamW on standardised targets and masks encoded as +-1. Each member early-stops on its
    out-of-bag samples: the weights with the lowest OOB error seen are kept (checked every `check_every`
    epochs, stopping once no member improved for `patience` epochs).
    """

    def __init__(self, n_players: int, seed: int = 0, *, members: int = 5, hidden: int | None = None,
                 epochs: int = 1000, lr: float = 0.01, weight_decay: float = 1e-4, patience: int = 200,
                 check_every: int = 10):
        self.n_players, self.seed, self.members = n_players, seed, members
        self.hidden = hidden or max(32, 2 * n_players)
        self.epochs, self.lr, self.weight_decay = epochs, lr, weight_decay
        self.patience, self.check_every = patience, check_every
        self.params: list[torch.Tensor] | None = None
        self.y_mean, self.y_std = 0.0, 1.0
        self.epochs_run_ = 0
        self.oob_mse_: list[float] | None = None  # per member, in utility units; None without OOB samples

    def _forward(self, params, x: torch.Tensor) -> torch.Tensor:
        w1, b1, w2, b2 = params
        h = torch.nn.functional.gelu(torch.einsum("md,kdh->kmh", x, w1) + b1[:, None, :])
        return torch.einsum("kmh,kh->km", h, w2) + b2[:, None]

    def fit(self, masks, y) -> EnsembleMLP:
        masks, y = _training_data(masks, y, self.n_players)
        g = torch.Generator().manual_seed(self.seed)
        k, n, h, m = self.members, self.n_players, self.hidden, masks.shape[0]
        self.y_mean, self.y_std = float(y.mean()), float(y.std()) or 1.0
        x = torch.from_numpy(masks.astype(np.float32) * 2 - 1)
        target = torch.from_numpy(((y - self.y_mean) / self.y_std).astype(np.float32))
        draws = torch.randint(m, (k, m), generator=g)
        counts = torch.zeros(k, m).scatter_add_(1, draws, torch.ones(k, m))
        oob = counts == 0
        use_oob = bool(oob.any(1).all())
        params = [torch.empty(k, n, h), torch.empty(k, h), torch.empty(k, h), torch.empty(k)]
        for member in range(k):
            _init_linear_(params[0][member], params[1][member], n, g)
            _init_linear_(params[2][member], params[3][member:member + 1], h, g)
        for p in params:
            p.requires_grad_(True)
        with _one_thread() if k * m * h <= SMALL_PROBLEM else nullcontext():
            best, best_err = self._train(params, x, target, counts, oob if use_oob else None)
        self.params = best if use_oob else [p.detach().clone() for p in params]
        self.oob_mse_ = (best_err * self.y_std ** 2).tolist() if use_oob else None
        return self

    def _train(self, params, x, target, counts, oob):
        best = [p.detach().clone() for p in params]
        best_err = torch.full((self.members,), float("inf"))
        last_gain = 0
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        for epoch in range(1, self.epochs + 1):
            optimizer.zero_grad()
            sq = (self._forward(params, x) - target) ** 2
            loss = ((sq * counts).sum(1) / counts.sum(1)).sum()
            loss.backward()
            optimizer.step()
            self.epochs_run_ = epoch
            if oob is None or epoch % self.check_every:
                continue
            with torch.no_grad():
                sq = (self._forward(params, x) - target) ** 2
                err = (sq * oob).sum(1) / oob.sum(1)
                better = err < best_err
                if better.any():
                    last_gain = epoch
                    best_err = torch.where(better, err, best_err)
                    for b, p in zip(best, params, strict=True):
                        b[better] = p[better]
            if epoch - last_gain >= self.patience:
                break
        return best, best_err

    def _member_predictions(self, masks) -> np.ndarray:
        if self.params is None:
            raise LayershapError("fit the surrogate before predicting")
        masks = _masks(masks, self.n_players)

        def run(chunk: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                out = self._forward(self.params, torch.from_numpy(chunk.astype(np.float32) * 2 - 1))
            return self.y_mean + self.y_std * out.double().numpy()

        return _chunked(masks, run)

    def predict(self, masks) -> np.ndarray:
        return self._member_predictions(masks).mean(0)

    def predict_std(self, masks) -> np.ndarray:
        """How much the members disagree on each mask (std over members, in utility units)."""
        return self._member_predictions(masks).std(0)


# --- registry -------------------------------------------------------------------------------------------

def linear_ridge(n_players: int, seed: int = 0, **options) -> RidgeSurrogate:
    return RidgeSurrogate(n_players, seed, pairwise=False, **options)


def pairwise_ridge(n_players: int, seed: int = 0, **options) -> RidgeSurrogate:
    return RidgeSurrogate(n_players, seed, pairwise=True, **options)


SURROGATES: dict[str, Callable[..., Surrogate]] = {
    "paper": PaperMLP,
    "linear": linear_ridge,
    "pairwise": pairwise_ridge,
    "ensemble": EnsembleMLP,
}


def make_surrogate(name: str, n_players: int, seed: int = 0, **options) -> Surrogate:
    try:
        factory = SURROGATES[name]
    except KeyError:
        raise LayershapError(f"unknown surrogate {name!r}; use one of {', '.join(SURROGATES)}") from None
    return factory(n_players, seed, **options)


def held_out_fit(surrogate_name: str, masks, y, *, seed: int, holdout_fraction: float = 0.2,
                 **options) -> dict:
    """How well a surrogate predicts masks it did not see: fit on a random split, score the rest.

    Returns {"r2", "spearman", "mae", "n_train", "n_holdout"}; refit on all data separately for use.
    """
    masks = np.asarray(masks, dtype=bool)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if not 0.0 < holdout_fraction < 1.0:
        raise LayershapError(f"holdout_fraction must be in (0, 1); got {holdout_fraction}")
    n_holdout = round(len(y) * holdout_fraction)
    if n_holdout < 2 or len(y) - n_holdout < 2:
        raise LayershapError(f"{len(y)} masks are too few to hold out {holdout_fraction:.0%} and still train")
    order = np.random.default_rng(seed).permutation(len(y))
    test, train = order[:n_holdout], order[n_holdout:]
    surrogate = make_surrogate(surrogate_name, masks.shape[1], seed, **options).fit(masks[train], y[train])
    pred = surrogate.predict(masks[test])
    truth = y[test]
    total = float(((truth - truth.mean()) ** 2).sum())
    r2 = 1.0 - float(((truth - pred) ** 2).sum()) / total if total > 0 else float("nan")
    # a surrogate that never saw a player predicts the same for every held-out mask differing only in it
    varied = np.ptp(truth) > 0 and np.ptp(pred) > 0
    return {"r2": r2, "spearman": float(spearmanr(truth, pred).statistic) if varied else float("nan"),
            "mae": float(np.abs(truth - pred).mean()), "n_train": len(train), "n_holdout": n_holdout,
            "holdout": [{"measured": float(t), "predicted": float(p)} for t, p in zip(truth, pred)]}
