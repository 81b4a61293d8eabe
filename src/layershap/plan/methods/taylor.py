"""First-order Taylor importance sum |w * dL/dw| per block (Shortened LLaMA's Taylor+ criterion).

From Kim et al., 2024, "Shortened LLaMA: Depth Pruning for Large Language Models".

With L the mean next-token NLL over the calibration windows, the importance of block b is
    I_b = sum over the parameters w of block b of |w * dL/dw|,
the first-order estimate of the loss change from zeroing each weight, summed over the block. The gradient
is of the loss over all windows (accumulated over batches before taking |.|, as the reference code
accumulates w * grad before the absolute value). Every parameter of the block counts (linear weights, norm
gains and any biases); the paper sums its weight matrices and the reference code also its norm weights.
The k blocks with the lowest importance are removed.

The "+" of Taylor+ is a heuristic of the paper: the first four and the last two blocks are never removed.
It is not applied here; pass those blocks as `protect` to reproduce it.

Cost: one forward and one backward pass over the windows, counted as 2. The gradients need float32 (or a
GPU for half precision): a float16/bfloat16 model on CPU, or parameters that cannot require gradients
(quantized), raise `LayershapError`. `requires_grad` flags and any existing `.grad` are restored afterwards.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from layershap.errors import LayershapError
from layershap.models.layers import block_list, num_layers
from layershap.plan.methods._common import model_device, removable, tokens_of
from layershap.plan.methods.base import Cost, Plan, lowest_scoring

_NEEDS_FLOAT32 = "taylor needs gradients {why}; load the model with --dtype float32"


def taylor_importance(model, tokens: torch.Tensor, *, batch_size: int = 8) -> list[float]:
    """I_b = sum |w * dL/dw| over each block's parameters (one forward and one backward pass)."""
    blocks = list(block_list(model))
    block_params = [list(block.parameters()) for block in blocks]
    in_blocks = {id(p) for params in block_params for p in params}
    for params in block_params:
        for p in params:
            if not p.is_floating_point():
                raise LayershapError(_NEEDS_FLOAT32.format(why=f"but a block holds {p.dtype} parameters "
                                                               "(a quantized model)"))
            if p.device.type == "cpu" and p.dtype in (torch.float16, torch.bfloat16):
                raise LayershapError(_NEEDS_FLOAT32.format(why=f"and the model is in {p.dtype} on the CPU"))

    saved = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    try:
        for p in model.parameters():
            p.grad = None
            p.requires_grad_(id(p) in in_blocks)  # embeddings and head need no gradient
        device = model_device(model)
        count = tokens[:, 1:].numel()
        with torch.inference_mode(False), torch.enable_grad():
            for start in range(0, tokens.shape[0], batch_size):
                batch = tokens[start:start + batch_size].to(device)
                logits = model(input_ids=batch, use_cache=False).logits
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(),
                                       reduction="sum") / count
                loss.backward()
        importance = []
        for params in block_params:
            total = torch.zeros((), dtype=torch.float64)
            for p in params:
                if p.grad is not None:
                    total += (p.detach().float() * p.grad.float()).abs().sum(dtype=torch.float64).cpu()
            importance.append(float(total))
        return importance
    except RuntimeError as exc:
        if "require" in str(exc) and "grad" in str(exc):
            raise LayershapError(_NEEDS_FLOAT32.format(why=f"but they cannot be enabled ({exc})")) from None
        raise
    finally:
        for p, flag, grad in saved:
            p.grad = grad
            p.requires_grad_(flag)


def taylor(model, windows, k: int, *, protect=(), batch_size: int = 8, **_) -> Plan:
    start = time.perf_counter()
    n = num_layers(model)
    removable(n, k, protect)
    scores = taylor_importance(model, tokens_of(windows), batch_size=batch_size)
    return Plan("taylor", n, lowest_scoring(scores, k, protect), scores, forward_passes=2,
                seconds=time.perf_counter() - start,
                cost=Cost.full_passes(2, int(tokens_of(windows).numel()), n))  # a forward and a backward pass
