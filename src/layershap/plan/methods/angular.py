"""Angular distance (Gromov et al., 2024): remove the run of k blocks whose input and output differ least.

From "The Unreasonable Ineffectiveness of the Deeper Layers".

For a run of k consecutive blocks starting at l, the distance between the hidden state entering block l and
the one leaving block l+k-1 is d(l) = arccos(cos(x_l, x_{l+k})) / pi, taken on the last token of each
calibration window (as the paper) and averaged over windows. The run with the smallest d is removed as a
whole. One forward pass gives every block's input and output, hence every d(l).

Runs that contain a protected block are not allowed. Ties go to the later run.

Scores: block i scores the smallest d over the allowed runs that contain it, and 1.0 (the largest possible
angular distance) when no allowed run contains it (a protected block). Every block of the chosen run thus
scores the minimum, and no other block scores lower. `details` holds d(l) for every start l (protect
ignored) and the chosen start.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from layershap.errors import LayershapError
from layershap.models.layers import num_layers
from layershap.models.trace import traced_pass
from layershap.plan.methods._common import removable, tokens_of
from layershap.plan.methods.base import Cost, Plan


class LastTokenStates:
    """Watches a traced pass (`models.trace.traced_pass`) and keeps the last token's hidden state entering
    and leaving every block."""

    def __init__(self, n_blocks: int):
        self.inputs: list[list[torch.Tensor]] = [[] for _ in range(n_blocks)]
        self.outputs: list[list[torch.Tensor]] = [[] for _ in range(n_blocks)]

    def __call__(self, index: int, hidden_in: torch.Tensor, hidden_out: torch.Tensor) -> None:
        self.inputs[index].append(hidden_in[:, -1].detach().double().cpu())
        self.outputs[index].append(hidden_out[:, -1].detach().double().cpu())

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.stack([torch.cat(x) for x in self.inputs]), torch.stack([torch.cat(x) for x in self.outputs]))


def last_token_states(model, tokens: torch.Tensor, *, batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """The last token's hidden state entering and leaving every block: two `[blocks, samples, hidden]`
    float64 tensors, from one forward pass over the windows."""
    recorder = LastTokenStates(num_layers(model))
    traced_pass(model, tokens, recorder, batch_size=batch_size)
    return recorder.tensors()


def run_starts(n: int, k: int, protect=()) -> list[int]:
    """The first blocks of the runs of k consecutive blocks that hold no protected block."""
    allowed = set(removable(n, k, protect))
    return [s for s in range(n - k + 1) if set(range(s, s + k)) <= allowed]


def closest_run(distances: list[float], starts: list[int]) -> int:
    """The start of the run with the smallest distance among `starts`; ties go to the later run."""
    return min(starts, key=lambda s: (distances[s], -s))


def run_distances(inputs: torch.Tensor, outputs: torch.Tensor, k: int) -> list[float]:
    """d(l) for every start l in 0..n-k: mean over windows of arccos(cos(x_l, x_{l+k})) / pi."""
    n = inputs.shape[0]
    distances = []
    for start in range(n - k + 1):
        cos = F.cosine_similarity(inputs[start], outputs[start + k - 1], dim=-1).clamp(-1.0, 1.0)
        d = float((torch.arccos(cos) / math.pi).mean())
        distances.append(d if math.isfinite(d) else 1.0)  # a diverged state counts as maximally far
    return distances


def angular(model, windows, k: int, *, protect=(), batch_size: int = 8, **_) -> Plan:
    start_time = time.perf_counter()
    n = num_layers(model)
    removable(n, k, protect)
    if k == 0:
        return Plan("angular", n, [], None, forward_passes=0, seconds=time.perf_counter() - start_time, cost=Cost())
    starts = run_starts(n, k, protect)
    if not starts:
        raise LayershapError(f"angular distance removes {k} consecutive layers, but every run of {k} layers "
                             "holds a protected one; protect fewer layers or lower --ratio")
    inputs, outputs = last_token_states(model, tokens_of(windows), batch_size=batch_size)
    distances = run_distances(inputs, outputs, k)
    best = closest_run(distances, starts)
    scores = np.ones(n)
    for s in starts:
        for i in range(s, s + k):
            scores[i] = min(scores[i], distances[s])
    return Plan("angular", n, list(range(best, best + k)), scores.tolist(), forward_passes=1,
                seconds=time.perf_counter() - start_time,
                cost=Cost.full_passes(1, int(tokens_of(windows).numel()), n),
                details={"run_distances": distances, "start": best, "token": "last"})
