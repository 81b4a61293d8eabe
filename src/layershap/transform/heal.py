"""Heal a pruned model: a short LoRA fine-tune on calibration text, merged back into plain weights.

Removing blocks leaves the kept ones expecting inputs they no longer get; a few hundred steps of low-rank
adaptation on ordinary text recovers much of the lost perplexity. The adapters (PEFT LoRA) go on every linear
layer inside the blocks, found generically (`nn.Linear`, and GPT-2's `Conv1D` with `fan_in_fan_out`), are
trained with AdamW on the next-token loss over calibration windows (the first half of the text), and are then
merged into the weights with `merge_and_unload`, so the saved model is a plain checkpoint with no PEFT
module left. Perplexity before and after is measured on held-out windows (the second half of `--eval-data`).
"""

from __future__ import annotations

import importlib.util
import math
import time
import warnings
from pathlib import Path

import torch

from layershap.errors import LayershapError

INSTALL_HINT = "pip install 'layershap[heal]'"
# Layers PEFT refuses to adapt in Mamba-like models: the fused CUDA kernels read their weights directly.
LORA_INCOMPATIBLE: dict[str, tuple[str, ...]] = {t: ("out_proj", "conv1d") for t in ("mamba", "mamba2",
                                                                                     "falcon_mamba")}


def lora_targets(model) -> tuple[list[str], bool]:
    """(full names of the linear layers inside the blocks, whether they are Conv1D layers, which store their
    weight transposed and need PEFT's `fan_in_fan_out`). Layers whose weight the model reads directly, and
    those PEFT refuses for Mamba, are left out."""
    from layershap.models.architectures import architecture_of
    from layershap.transform.quantize import DIRECT_WEIGHT_READS

    arch = architecture_of(model)
    model_type = model.config.model_type
    direct = DIRECT_WEIGHT_READS.get(model_type, ()) + LORA_INCOMPATIBLE.get(model_type, ())
    prefix = arch.blocks + "."
    linear, conv1d = [], []
    for name, module in model.named_modules():
        if not name.startswith(prefix) or name.rsplit(".", 1)[-1] in direct:
            continue
        if isinstance(module, torch.nn.Linear):
            linear.append(name)
        elif type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
            conv1d.append(name)
    if not linear and not conv1d:
        raise LayershapError(f"this {arch.name} model has no linear layer inside its blocks for LoRA to adapt")
    if linear and conv1d:  # one LoraConfig has one fan_in_fan_out; the Linear layers are the usual case
        return linear, False
    return (linear, False) if linear else (conv1d, True)


def check_heal_options(*, steps: int, lr: float, rank: int, alpha: float | None, batch_size: int) -> None:
    if steps < 1:
        raise LayershapError(f"--steps must be at least 1; got {steps}")
    if not lr > 0 or not math.isfinite(lr):
        raise LayershapError(f"--lr must be a positive number; got {lr}")
    if rank < 1:
        raise LayershapError(f"--rank must be at least 1; got {rank}")
    if alpha is not None and not alpha > 0:
        raise LayershapError(f"--alpha must be positive; got {alpha}")
    if batch_size < 1:
        raise LayershapError(f"--batch-size must be at least 1; got {batch_size}")
    if importlib.util.find_spec("peft") is None:
        raise LayershapError(f"healing needs the peft package: {INSTALL_HINT}")


def check_trainable(model) -> None:
    """Refuse a model whose weights cannot take a LoRA update (a quantized model)."""
    from layershap.transform.quantize import quantization_of

    quantized = quantization_of(model)
    if quantized is not None:
        scheme = quantized.get("scheme") or quantized.get("method")
        raise LayershapError(f"this model is quantized ({scheme}), so it has no float weights left to train and "
                             "merge LoRA into; heal the unquantized model, then quantize it")
    if not any(p.is_floating_point() for p in model.parameters()):
        raise LayershapError("this model has no floating-point parameters to train")


def heal_model(model, windows, *, steps: int, lr: float = 2e-4, rank: int = 8, alpha: float | None = None,
               batch_size: int = 4, seed: int = 0, progress: bool = True):
    """Fine-tune LoRA adapters on `windows` (a TextWindows or a [n, seq_len] token tensor) for `steps` steps,
    merge them into the weights, and return `(model, stats)`; the returned model is a plain transformers
    model in eval mode (the input model is changed in place)."""
    check_heal_options(steps=steps, lr=lr, rank=rank, alpha=alpha, batch_size=batch_size)
    check_trainable(model)
    from peft import LoraConfig, get_peft_model

    from layershap.progress import progress_bar

    tokens = getattr(windows, "tokens", windows)
    targets, fan_in_fan_out = lora_targets(model)
    alpha = float(alpha if alpha is not None else 2 * rank)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none", target_modules=targets,
                        fan_in_fan_out=fan_in_fan_out)
    torch.manual_seed(seed)  # before the adapters exist: their initial weights are drawn from it
    with warnings.catch_warnings():  # PEFT calls a transformers method that is deprecated in favour of another
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(model, config)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    if not trainable:
        raise LayershapError("LoRA left no trainable parameter in this model; it cannot be healed")
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    n = tokens.shape[0]  # epochs of shuffled windows, cut into batches
    stream = torch.cat([torch.randperm(n, generator=generator) for _ in range(-(-steps * batch_size // n))])
    batches = stream[:steps * batch_size].view(steps, batch_size)
    losses = []
    started = time.perf_counter()
    peft_model.train()
    with progress_bar(steps if progress else 0, "healing (LoRA steps)") as advance:
        for step in range(steps):
            batch = tokens[batches[step]].to(device)
            loss = peft_model(input_ids=batch, labels=batch, use_cache=False).loss
            if not torch.isfinite(loss):
                raise LayershapError(f"the training loss became {float(loss)} at step {step + 1}; lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            losses.append(float(loss.detach()))
            advance()
    seconds = time.perf_counter() - started
    merged = peft_model.merge_and_unload()
    merged.eval()
    for p in merged.parameters():
        p.requires_grad_(False)
    stats = {
        "steps": steps, "lr": lr, "rank": rank, "alpha": alpha, "batch_size": batch_size, "seed": seed,
        "target_layers": len(targets), "target_kinds": sorted({n.rsplit(".", 1)[-1] for n in targets}),
        "fan_in_fan_out": fan_in_fan_out, "trainable_parameters": sum(p.numel() for p in trainable),
        "loss_first": losses[0], "loss_last": losses[-1], "losses": losses, "seconds": seconds,
    }
    return merged, stats


def heal_run(model, tokenizer, *, out, steps: int, model_name: str | None = None, data: str = "c4",
             lr: float = 2e-4, rank: int = 8, alpha: float | None = None, batch_size: int = 4, samples: int = 64,
             seq_len: int = 128, seed: int = 0, eval_data=("wiki",), eval_samples: int = 16,
             eval_seq_len: int = 256) -> dict:
    """Heal a loaded model on the calibration half of `data`, measure held-out perplexity before and after,
    and save the merged model to `out` with `layershap.json` (the source's record, if any, plus `heal`)."""
    from layershap.data.windows import text_windows
    from layershap.game.nll import perplexities_of
    from layershap.models.save import inherited_record, save_pruned

    check_heal_options(steps=steps, lr=lr, rank=rank, alpha=alpha, batch_size=batch_size)
    check_trainable(model)
    calibration = text_windows(data, tokenizer, samples=samples, seq_len=seq_len, seed=seed, split="calibration")
    held_out = {name: text_windows(name, tokenizer, samples=eval_samples, seq_len=eval_seq_len, seed=seed,
                                   split="evaluation") for name in eval_data}
    eval_batch = max(batch_size, 8)
    before = perplexities_of(model, held_out, batch_size=eval_batch)
    healed, stats = heal_model(model, calibration, steps=steps, lr=lr, rank=rank, alpha=alpha,
                               batch_size=batch_size, seed=seed)
    after = perplexities_of(healed, held_out, batch_size=eval_batch)
    record = inherited_record(model_name, healed)
    record["heal"] = {**stats, "ppl_before": before, "ppl_after": after, "calibration": calibration.describe(),
                      "evaluation": {name: w.describe() for name, w in held_out.items()}}
    save_pruned(healed, tokenizer, Path(out), record)
    return record
