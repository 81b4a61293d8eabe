"""Evaluate a batch of keep-masks block by block: each block is brought in once per sweep, not once per mask.

The hidden state entering block i depends only on which of blocks 0..i-1 a mask keeps, so masks that share
a prefix share their states (the idea of `game/prefix.py`, here for all masks of a batch at once). The sweep
goes down the blocks: at block i the masks are in groups of equal prefixes, each with its states for every
window batch; a group splits into the masks that keep block i (their states go through block i, which is
brought to the device once for all groups) and those that drop it (their states pass on as they are). After
the last block every group's states go through the final norm and the head, with the run's per-batch loss.

Each block call gets exactly the arguments the model's own forward pass gives that block for that window
batch (captured once, from a pass in which the blocks only record what they are given), so the values equal
the plain path's bit for bit on a CPU (tests/game/test_sweep.py). With a streamed model
(`models/stream.py`) this is what makes a model that does not fit cheap to evaluate: the weights cross the
bus once per batch of masks, and the device holds a block or two and the batch's states.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from layershap.game.nll import BatchLoss, batch_nll
from layershap.game.prefix import cache_budget_bytes, state_bytes
from layershap.models.architectures import architecture_of
from layershap.models.layers import block_list, keep_only

# Families whose blocks return the hidden state as a tensor and whose base model applies `norm` after the
# last block (tested in tests/game/test_sweep.py); others use the per-mask path.
SWEEP_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3")


def supports_sweep(model) -> bool:
    return model.config.model_type in SWEEP_TYPES and _final_norm(model) is not None


def _final_norm(model):
    *path, _ = architecture_of(model).blocks.split(".")
    base = model
    for name in path:
        base = getattr(base, name, None)
    norm = getattr(base, "norm", None)
    return norm if isinstance(norm, torch.nn.Module) else None


class BlockSweep:
    """Mean per-position loss of many block masks over fixed windows, one pass down the blocks per chunk.

    max_state_bytes: bound on the states held at once (a chunk of masks is as many as fit; default: the
    prefix cache's budget for the device).
    """

    def __init__(self, model, tokens: torch.Tensor, *, batch_size: int = 8, loss: BatchLoss = batch_nll,
                 max_state_bytes: int | None = None):
        self.model = model
        self.tokens = tokens
        self.batch_size = batch_size
        self.loss = loss
        self.n = len(block_list(model))
        self.blocks_run = 0
        self.device = next(model.parameters()).device
        per_mask = max(1, state_bytes(model, tokens))
        budget = max_state_bytes if max_state_bytes is not None else cache_budget_bytes(self.device)
        self.chunk = max(1, budget // per_mask)
        self._calls: list[tuple[torch.Tensor, list[tuple[tuple, dict]]]] | None = None

    def measure(self, masks: np.ndarray) -> Iterator[tuple[int, float, float]]:
        """(row, loss, seconds) for every mask, a chunk at a time (seconds: the chunk's time per mask)."""
        masks = np.asarray(masks, dtype=bool)
        for start in range(0, len(masks), self.chunk):
            started = time.perf_counter()
            values = self.losses(masks[start:start + self.chunk])
            seconds = (time.perf_counter() - started) / len(values)
            for offset, value in enumerate(values):
                yield start + offset, float(value), seconds

    def losses(self, masks: np.ndarray) -> np.ndarray:
        masks = np.asarray(masks, dtype=bool)
        calls = self._captured()
        blocks = block_list(self.model)
        groups: list[tuple[np.ndarray, list[torch.Tensor]]] = [(np.arange(len(masks)), [c[0] for c in calls])]
        with torch.inference_mode():
            for i in range(self.n):
                split = []
                for rows, states in groups:
                    keeps = masks[rows, i]
                    if not keeps.all():
                        split.append((rows[~keeps], states))
                    if keeps.any():
                        ran = []
                        for batch, state in enumerate(states):
                            args, kwargs = calls[batch][1][i]
                            ran.append(_hidden(blocks[i](state, *args, **kwargs)))
                        self.blocks_run += 1
                        split.append((rows[keeps], ran))
                groups = split
            out = np.full(len(masks), np.nan)
            for rows, states in groups:
                out[rows] = self._final_loss(states)
        return out

    def _final_loss(self, states: list[torch.Tensor]) -> float:
        """The loss of final states: the model's own forward pass with no blocks, the state put in place of
        the final norm's input, so the norm, head and loss run exactly as in the plain path."""
        total, count = 0.0, 0
        current = {}

        def inject(module, args):
            return (current["state"], *args[1:])

        handle = _final_norm(self.model).register_forward_pre_hook(inject)
        try:
            with keep_only(self.model, []):
                for batch, start in enumerate(range(0, self.tokens.shape[0], self.batch_size)):
                    current["state"] = states[batch]
                    summed, scored = self.loss(self.model, self.tokens[start:start + self.batch_size].to(self.device),
                                               start)
                    total += summed
                    count += scored
        finally:
            handle.remove()
        return total / count

    def _captured(self):
        """Per window batch: the first block's input, and every block's other arguments, from one forward
        pass in which the blocks record what they get and run nothing (a streamed model loads none)."""
        if self._calls is not None:
            return self._calls
        blocks = list(block_list(self.model))
        calls = []
        with torch.inference_mode(), _recording(self.model, blocks) as record:
            for start in range(0, self.tokens.shape[0], self.batch_size):
                record.clear()
                self.model(input_ids=self.tokens[start:start + self.batch_size].to(self.device), use_cache=False)
                first = record[0][0]
                calls.append((first, [(args, kwargs) for _, args, kwargs in record]))
        self._calls = calls
        return calls


def _hidden(value):
    return value[0] if isinstance(value, (tuple, list)) else value


@contextmanager
def _recording(model, blocks):
    """Every block's forward replaced by one that records (input, other args, kwargs) and returns its input;
    a streamed model's loading hook is paused meanwhile."""
    from layershap.models.stream import streamer_of

    record: list = []
    streamer = streamer_of(model)
    paused = streamer.paused if streamer is not None else None
    for block in blocks:
        def forward(hidden_states=None, *args, **kwargs):
            record.append((hidden_states, args, kwargs))
            return hidden_states

        block.forward = forward
    if streamer is not None:
        streamer.paused = True
    try:
        yield record
    finally:
        for block in blocks:
            del block.forward
        if streamer is not None:
            streamer.paused = paused
