"""Evaluate many keep-masks cheaply by reusing the hidden states of the leading blocks they share.

The hidden state entering block j depends only on which of blocks 0..j-1 were kept. Masks visited in
lexicographic order (kept before dropped, first block first) share long prefixes, so each mask resumes from
the deepest state its predecessor left behind and runs only the blocks after it. The resumed run is the
model's own forward pass over the remaining kept blocks with the cached state put in place of the first
block's input, so attention masks, rotary embeddings and per-layer types are built exactly as in the plain
path; the result equals `mean_nll` under `keep_only` bit for bit (tests check this on every family). The
per-batch loss is a parameter (`loss`, a `game/nll.py` `BatchLoss`: the NLL by default, or the KL against a
dense reference, `game/kl.py`), and both paths run the same one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch

from layershap.game.nll import BatchLoss, batch_nll, mean_loss
from layershap.models.architectures import architecture_of
from layershap.models.layers import block_list, keep_only
from layershap.models.sublayers import block_mask, keep

# Hidden states kept for resuming, across all window batches; above this the plain path is used. On a GPU
# the states live in its memory, so the budget there is a share of what is free instead.
DEFAULT_CACHE_BYTES = 2 << 30
GPU_FREE_MEMORY_SHARE = 0.25


def visiting_order(masks: np.ndarray) -> np.ndarray:
    """Indices of `masks` in the order that maximises shared prefixes (lexicographic, kept first)."""
    keys = (~np.asarray(masks, dtype=bool)).astype(np.uint8)
    return np.lexsort(keys.T[::-1])


def state_bytes(model, tokens: torch.Tensor) -> int:
    """Bytes of one hidden state over all of `tokens`, in the model's dtype: what each cached state costs."""
    hidden = getattr(model.config, "hidden_size", 0) or getattr(model.config, "n_embd", 0)
    return tokens.numel() * hidden * next(model.parameters()).element_size()


def supports_prefix_sharing(model) -> bool:
    return architecture_of(model).prefix_sharing


def cache_budget_bytes(device: torch.device) -> int:
    """How many bytes of cached states to allow: 2 GiB in host memory; on a CUDA device a quarter of its free
    memory, so a large calibration set (32 windows of 512 tokens on a 7B model: 4.1 GiB) still resumes
    from shared prefixes on a GPU that has the room (measured on an H200: docs/benchmarks.md)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * GPU_FREE_MEMORY_SHARE)
    return DEFAULT_CACHE_BYTES


class PrefixSharingEvaluator:
    """Mean NLL (or another per-batch `loss`) of keep-masks over fixed windows, resuming from cached block
    outputs.

    Masks can be given in any order; `nlls` visits them in `visiting_order` and reports each through
    `on_result(index, nll)` as soon as it is known, so callers can commit results one by one.
    """

    def __init__(self, model, tokens: torch.Tensor, *, batch_size: int = 8,
                 max_cache_bytes: int | None = None, loss: BatchLoss = batch_nll):
        self.model = model
        self.tokens = tokens
        self.batch_size = batch_size
        self.loss = loss
        self.n = len(block_list(model))
        self.blocks_run = 0
        self._states: dict[int, list[torch.Tensor | None]] = {}
        self._path: np.ndarray | None = None
        per_depth = state_bytes(model, tokens)
        if max_cache_bytes is None:
            max_cache_bytes = cache_budget_bytes(next(model.parameters()).device)
        self.enabled = supports_prefix_sharing(model) and per_depth * (self.n + 1) <= max_cache_bytes

    def nlls(self, masks: np.ndarray, on_result: Callable[[int, float], None] | None = None) -> np.ndarray:
        masks = np.asarray(masks, dtype=bool)
        out = np.full(len(masks), np.nan)
        for index in visiting_order(masks):
            out[index] = self.nll(masks[index])
            if on_result is not None:
                on_result(int(index), float(out[index]))
        return out

    def nll(self, mask: np.ndarray) -> float:
        """A block mask (n entries) or a sublayer mask (2n: attn.0, mlp.0, ...; `models/sublayers.py`)."""
        mask = np.asarray(mask, dtype=bool)
        sublayers = mask if len(mask) == 2 * self.n else None
        blocks = block_mask(mask) if sublayers is not None else mask
        if not self.enabled or not mask.any():  # the plain path; cached states stay but are not resumed
            self.blocks_run += int(blocks.sum())
            self._path = None
            with keep(self.model, mask):
                return mean_loss(self.model, self.tokens, batch_size=self.batch_size, loss=self.loss)
        resume = self._resume_depth(mask)
        run = [i for i in range(resume, self.n) if blocks[i]]
        if not run:  # nothing left to run after the shared prefix: no block to resume into
            resume, run = 0, [i for i in range(self.n) if blocks[i]]
        self.blocks_run += len(run)
        # Until this pass completes the cached states are a mix of the old path's and this mask's: forget the
        # path (and the states) first, so an exception anywhere in the pass leaves nothing to resume from.
        self._path = None
        try:
            value = self._run(blocks, resume, run, sublayers)
        except BaseException:
            self._states.clear()
            raise
        self._path = mask.copy()
        return value

    def _resume_depth(self, mask: np.ndarray) -> int:
        """Deepest depth j whose state is cached and whose blocks 0..j-1 are kept alike by this mask (for a
        sublayer mask: both sublayers of each of them)."""
        if self._path is None or len(self._path) != len(mask):
            return 0
        differ = np.flatnonzero(self._path != mask)
        return int(differ[0]) * self.n // len(mask) if len(differ) else self.n

    def _run(self, mask: np.ndarray, resume: int, run: list[int], sublayers: np.ndarray | None = None) -> float:
        blocks = block_list(self.model)
        device = next(self.model.parameters()).device
        batch_index = 0
        states = self._states
        handles = []

        def inject(module, args, kwargs):
            row = states[batch_index]
            cached = row[resume]
            for depth in range(resume + 1, run[0] + 1):  # dropped blocks between: the same state
                row[depth] = cached
            if args:
                return (cached, *args[1:]), kwargs
            key = "hidden_states" if "hidden_states" in kwargs else "hidden"
            return args, {**kwargs, key: cached}

        def record(position):
            def hook(module, args, kwargs, output):
                hidden = output[0] if isinstance(output, (tuple, list)) else output
                row = states[batch_index]
                # the state after block `position` is the state at every depth up to the next kept block
                following = next((i for i in range(position + 1, self.n) if mask[i]), self.n)
                for depth in range(position + 1, following + 1):
                    row[depth] = hidden
            return hook

        def record_input(module, args, kwargs):
            hidden = args[0] if args else kwargs.get("hidden_states", kwargs.get("hidden"))
            row = states[batch_index]
            for depth in range(run[0] + 1):
                row[depth] = hidden

        if resume > 0:
            handles.append(blocks[run[0]].register_forward_pre_hook(inject, with_kwargs=True))
        else:
            handles.append(blocks[run[0]].register_forward_pre_hook(record_input, with_kwargs=True))
        for position in run:
            handles.append(blocks[position].register_forward_hook(record(position), with_kwargs=True))
        total, count = 0.0, 0
        try:
            with _keep_run(self.model, run, sublayers), torch.inference_mode():
                for batch_index, start in enumerate(range(0, self.tokens.shape[0], self.batch_size)):
                    states.setdefault(batch_index, [None] * (self.n + 1))
                    summed, scored = self.loss(self.model, self.tokens[start:start + self.batch_size].to(device),
                                               start)
                    total += summed
                    count += scored
        finally:
            for handle in handles:
                handle.remove()
        return total / count


def _keep_run(model, run: list[int], sublayers: np.ndarray | None):
    """Only the blocks in `run`; of a sublayer mask, their kept sublayers."""
    if sublayers is None:
        return keep_only(model, run)
    pairs = np.zeros((len(sublayers) // 2, 2), dtype=bool)
    pairs[run] = sublayers.reshape(-1, 2)[run]
    return keep(model, pairs.reshape(-1))


def plain_nlls(model, tokens: torch.Tensor, masks: Iterable[np.ndarray], *, batch_size: int = 8,
               loss: BatchLoss = batch_nll) -> np.ndarray:
    """The reference path: each mask evaluated alone under `keep_only`."""
    values = []
    for mask in masks:
        with keep(model, mask):
            values.append(mean_loss(model, tokens, batch_size=batch_size, loss=loss))
    return np.array(values)
