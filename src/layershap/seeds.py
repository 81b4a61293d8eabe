"""Plans worth measuring before any surrogate has an opinion: the one-pass baselines' choices.

The surrogate's search is blind to plans that the sampled masks never came near. Removing a whole run of
neighbouring blocks is such a plan: random masks almost never drop six adjacent blocks together, so no
surrogate fitted to them learns that the run is cheap to lose as a whole (on SmolLM2 at k = 7, blocks 12-17
and 26 give calibration perplexity 123 where the best plan the surrogate found gave 137). ShortGPT's
block influence and the angular distance of runs see exactly this from one forward pass, so the search
measures their plans first and builds on whichever is best. The seeds cost one traced pass, counted in
the method's forward passes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from layershap.methods._common import model_device, removable, tokens_of
from layershap.methods.angular import run_distances
from layershap.methods.base import lowest_scoring
from layershap.models.layers import num_layers
from layershap.models.trace import block_io


def one_pass_seeds(model, windows, k: int, *, protect: Sequence[int] = (), batch_size: int = 8) -> list[list[int]]:
    """Removal sets of ShortGPT (k lowest block influences) and of the angular distance (the closest run of k
    blocks avoiding protected ones), from a single forward pass; duplicates dropped."""
    n = num_layers(model)
    allowed = set(removable(n, k, protect))
    if k == 0:
        return []
    influence, inputs, outputs = _trace(model, tokens_of(windows), batch_size)
    seeds = [lowest_scoring(influence, k, protect)]
    starts = [s for s in range(n - k + 1) if set(range(s, s + k)) <= allowed]
    if starts:
        distances = run_distances(inputs, outputs, k)
        best = min(starts, key=lambda s: (distances[s], -s))
        seeds.append(list(range(best, best + k)))
    unique = []
    for seed in seeds:
        if seed not in unique:
            unique.append(seed)
    return unique


def _trace(model, tokens: torch.Tensor, batch_size: int):
    """Per block: mean (1 - cos) between input and output over all tokens (ShortGPT's block influence), and
    the last token's input and output states (for the angular distance), from one pass."""
    n = num_layers(model)
    influence = torch.zeros(n, dtype=torch.float64)
    inputs: list[list[torch.Tensor]] = [[] for _ in range(n)]
    outputs: list[list[torch.Tensor]] = [[] for _ in range(n)]

    def record(index, hidden_in, hidden_out):
        cos = F.cosine_similarity(hidden_in.float(), hidden_out.float(), dim=-1)
        influence[index] += (1.0 - cos).double().sum().cpu()
        inputs[index].append(hidden_in[:, -1].detach().double().cpu())
        outputs[index].append(hidden_out[:, -1].detach().double().cpu())

    device = model_device(model)
    with torch.inference_mode(), block_io(model, record):
        for start in range(0, tokens.shape[0], batch_size):
            model(input_ids=tokens[start:start + batch_size].to(device), use_cache=False)
    influence /= tokens.numel()
    return (influence.tolist(), torch.stack([torch.cat(x) for x in inputs]),
            torch.stack([torch.cat(x) for x in outputs]))
