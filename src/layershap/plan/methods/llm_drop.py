"""LLM-Drop's attention drop (He et al., 2024, arXiv 2406.15786), at a parameter ratio of sublayers.

An attention sublayer whose output barely turns the residual stream matters little: with h the stream
entering the block and a the attention branch's output, its importance is 1 - cos(h, h + a), averaged over
every token of one traced pass over the calibration windows. Attention sublayers are dropped from the least
important up until their parameters reach the ratio of the blocks' parameters. When every allowed attention
is dropped and the ratio is still not reached (an attention of a grouped-query model holds a small share of
its block), the MLP sublayers follow, least important first by the same measure on the MLP branch (the
paper's joint drop); `details["mlps_needed"]` says so.

Scores: one per player (attn.0, mlp.0, ...), 1 - cos of its branch (higher: more worth keeping).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from layershap.models.architectures import architecture_of
from layershap.models.layers import block_list, num_layers
from layershap.models.sublayers import check_sublayers
from layershap.plan.cost import Cost
from layershap.plan.methods._common import model_device, tokens_of
from layershap.plan.methods._sublayers import (
    allowed_players,
    drop_in_order,
    parameter_target,
    sublayer_plan_result,
)


def branch_influence(model, tokens: torch.Tensor, *, batch_size: int = 8) -> list[float]:
    """1 - mean cos(h, h + branch(h)) of every sublayer (attn.0, mlp.0, ...), from one forward pass.

    h for the attention is the block's input; for the MLP it is the stream after the attention's residual sum
    (for blocks that run both branches on the same input, such as GPT-NeoX's parallel blocks, the block's
    input too)."""
    arch = check_sublayers(model)
    n = num_layers(model)
    sums = torch.zeros(2 * n, dtype=torch.float64)
    block_in: dict[int, torch.Tensor] = {}
    attn_out: dict[int, torch.Tensor] = {}
    parallel = bool(getattr(model.config, "use_parallel_residual", False))
    handles = []

    def output(value) -> torch.Tensor:
        return value[0] if isinstance(value, (tuple, list)) else value

    def add(player: int, h: torch.Tensor, branch: torch.Tensor) -> None:
        cos = F.cosine_similarity(h.float(), (h + branch).float(), dim=-1)
        sums[player] += (1.0 - cos).double().sum().cpu()

    for i, block in enumerate(block_list(model)):
        def pre(module, args, kwargs, i=i):
            block_in[i] = args[0] if args else kwargs["hidden_states"]

        def on_attn(module, args, out, i=i):
            attn_out[i] = output(out)
            add(2 * i, block_in[i], attn_out[i])

        def on_mlp(module, args, out, i=i):
            h = block_in[i] if parallel else block_in[i] + attn_out[i]
            add(2 * i + 1, h, output(out))

        handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
        for layout, hook in ((arch.attention, on_attn), (arch.mlp, on_mlp)):
            last = (layout.after or (layout.module,))[-1]
            handles.append(block._modules[last].register_forward_hook(hook))
    device = model_device(model)
    try:
        with torch.inference_mode():
            for start in range(0, tokens.shape[0], batch_size):
                model(input_ids=tokens[start:start + batch_size].to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return (sums / tokens.numel()).tolist()


def llm_drop(model, windows, ratio: float, *, protect=(), batch_size: int = 8, **_):
    started = time.perf_counter()
    tokens = tokens_of(windows)
    params, target = parameter_target(model, ratio)
    n = num_layers(model)
    scores = branch_influence(model, tokens, batch_size=batch_size)
    allowed = allowed_players(n, protect)
    attentions = sorted((j for j in allowed if j % 2 == 0), key=lambda j: (scores[j], -j))
    mlps = sorted((j for j in allowed if j % 2 == 1), key=lambda j: (scores[j], -j))
    mask = drop_in_order([*attentions, *mlps], params, target)
    details = {"mlps_needed": bool((~mask[1::2]).any()), "architecture": architecture_of(model).name}
    cost = Cost.full_passes(1, int(tokens.numel()), n)  # the one traced pass of the full model
    return sublayer_plan_result("llmdrop", model, mask, scores, 1, time.perf_counter() - started, details, cost)
