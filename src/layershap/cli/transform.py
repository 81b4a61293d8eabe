"""Commands that turn a (pruned) model into another saved model: `quantize` and `heal`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from layershap.cli.options import (
    BatchSize,
    Data,
    Device,
    Dtype,
    EvalData,
    EvalSamples,
    EvalSeqLen,
    Model,
    Seed,
    TrustRemoteCode,
    config_writer,
)
from layershap.cli.options import load_model_from_options as _load
from layershap.cli.options import names as _names
from layershap.config import ConfigOption
from layershap.io import check_out_is_not_the_model, check_writable_dir

Scheme = Annotated[str, typer.Option(help="int8 (weight-only, per row) or int4 (weight-only, groups of 32 on "
                                          "CPU; tinygemm on CUDA with bfloat16).")]


def quantize(ctx: typer.Context, scheme: Scheme, out: Annotated[Path, typer.Option(help="Directory for the quantized model.")],
             model: Model = None, eval_data: EvalData = "wiki", eval_samples: EvalSamples = 16,
             eval_seq_len: EvalSeqLen = 256, seed: Seed = 0, batch_size: BatchSize = 8, dtype: Dtype = "auto",
             device: Device = "auto", trust_remote_code: TrustRemoteCode = False, config: ConfigOption = None):
    """Quantize a model's linear weights with torchao, measure held-out perplexity before and after, and save
    it so that plain transformers (with torchao) reloads it."""
    from layershap.models.load import resolve_device
    from layershap.transform.quantize import check_scheme, quantize_run

    check_scheme(scheme, resolve_device(device))
    check_out_is_not_the_model(out, model)
    check_writable_dir(out)
    eval_names = _names(eval_data)
    loaded, tokenizer = _load(model, dtype, device, trust_remote_code)
    fingerprint_and_options = config_writer(ctx, out, "quantize", loaded)
    record = quantize_run(loaded, tokenizer, scheme=scheme, out=out, model_name=model, eval_data=eval_names,
                          eval_samples=eval_samples, eval_seq_len=eval_seq_len, seed=seed, batch_size=batch_size)
    fingerprint_and_options()
    q = record["quantization"]
    typer.echo(f"{scheme}: {q['quantized_layers']} linear layers quantized ({q['config']}), "
               f"{len(q['float_layers'])} kept in float")
    for name in q["ppl_before"]:
        typer.echo(f"{name} perplexity: {q['ppl_before'][name]:.3f} -> {q['ppl_after'][name]:.3f}")
    typer.echo(f"weights {q['weight_bytes_before'] / 2**20:.1f} MiB -> {q['weight_bytes_after'] / 2**20:.1f} MiB "
               f"in memory, {q['checkpoint_bytes'] / 2**20:.1f} MiB on disk; saved to {out}")


def heal(ctx: typer.Context, out: Annotated[Path, typer.Option(help="Directory for the healed model.")],
         steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 100,
         lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 2e-4,
         rank: Annotated[int, typer.Option(help="LoRA rank.")] = 8,
         alpha: Annotated[float | None, typer.Option(help="LoRA alpha (default 2 x rank).")] = None,
         batch_size: Annotated[int, typer.Option("--batch-size", help="Windows per training step.")] = 4,
         samples: Annotated[int, typer.Option(help="Calibration windows to train on.")] = 64,
         seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per training window.")] = 128,
         model: Model = None, data: Data = "c4", eval_data: EvalData = "wiki", eval_samples: EvalSamples = 16,
         eval_seq_len: EvalSeqLen = 256, seed: Seed = 0, dtype: Dtype = "auto", device: Device = "auto",
         trust_remote_code: TrustRemoteCode = False, config: ConfigOption = None):
    """LoRA fine-tune on calibration text, merge the adapters into the weights, save a plain model, and
    report held-out perplexity before and after."""
    from layershap.transform.heal import check_heal_options, check_trainable, heal_run

    check_heal_options(steps=steps, lr=lr, rank=rank, alpha=alpha, batch_size=batch_size)
    check_out_is_not_the_model(out, model)
    check_writable_dir(out)
    eval_names = _names(eval_data)
    loaded, tokenizer = _load(model, dtype, device, trust_remote_code)
    check_trainable(loaded)
    fingerprint_and_options = config_writer(ctx, out, "heal", loaded)
    record = heal_run(loaded, tokenizer, out=out, steps=steps, model_name=model, data=data, lr=lr, rank=rank,
                      alpha=alpha, batch_size=batch_size, samples=samples, seq_len=seq_len, seed=seed,
                      eval_data=eval_names, eval_samples=eval_samples, eval_seq_len=eval_seq_len)
    h = record["heal"]
    fingerprint_and_options(alpha=h["alpha"])
    typer.echo(f"healed {h['target_layers']} layers ({', '.join(h['target_kinds'])}) with LoRA rank {rank}: "
               f"{steps} steps, training loss {h['loss_first']:.3f} -> {h['loss_last']:.3f}")
    for name in h["ppl_before"]:
        typer.echo(f"{name} perplexity: {h['ppl_before'][name]:.3f} -> {h['ppl_after'][name]:.3f}")
    typer.echo(f"saved to {out}")


def register(app: typer.Typer) -> None:
    app.command()(quantize)
    app.command()(heal)

