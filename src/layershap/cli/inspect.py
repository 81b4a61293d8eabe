"""Commands that look at a model without changing it: `layers` (architecture and block count) and `ppl`
(held-out perplexity on named texts).

Registered on the main app by `register(app)` (see `COMMAND_MODULES` in cli/app.py).
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from layershap.cli.options import (
    BatchSize,
    Device,
    Dtype,
    Model,
    Offload,
    Samples,
    Seed,
    SeqLen,
    TrustRemoteCode,
)
from layershap.cli.options import load_model_from_options as _load
from layershap.cli.options import names as _names
from layershap.config import ConfigOption


def register(app: typer.Typer) -> None:
    app.command("layers")(layers)
    app.command("ppl")(ppl)


def layers(model: Model = None, dtype: Dtype = "auto", device: Device = "auto",
           trust_remote_code: TrustRemoteCode = False, offload: Offload = "auto", config: ConfigOption = None):
    """Show the model's architecture and how many blocks it has."""
    from layershap.models.architectures import architecture_of
    from layershap.models.layers import num_layers

    loaded, _ = _load(model, dtype, device, trust_remote_code, offload)
    arch = architecture_of(loaded)
    typer.echo(f"{loaded.config.model_type}: {num_layers(loaded)} blocks at {arch.blocks} ({arch.kind}), "
               f"{sum(p.numel() for p in loaded.parameters()) / 1e6:.1f}M parameters")


def ppl(model: Model = None, data: Annotated[str, typer.Option(help="Comma-separated texts (see prune "
                                                                    "--data).")] = "wiki",
        samples: Samples = 16, seq_len: SeqLen = 256, split: Annotated[str, typer.Option(
            help="Which half of each text: evaluation or calibration.")] = "evaluation",
        seed: Seed = 0, batch_size: BatchSize = 8, dtype: Dtype = "auto", device: Device = "auto",
        trust_remote_code: TrustRemoteCode = False, offload: Offload = "auto",
        as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
        config: ConfigOption = None):
    """Perplexity of a model on one or more texts."""
    from layershap.evaluate.perplexity import perplexities

    names = _names(data)
    loaded, tokenizer = _load(model, dtype, device, trust_remote_code, offload, batch_size=batch_size,
                              seq_len=seq_len)
    result = perplexities(loaded, tokenizer, names, samples=samples, seq_len=seq_len, seed=seed, split=split,
                          batch_size=batch_size)
    if as_json:
        typer.echo(json.dumps({"model": model, "seq_len": seq_len, "samples": samples, "split": split,
                               "ppl": result}, indent=2))
    else:
        for name, value in result.items():
            typer.echo(f"{name}: perplexity {value:.3f} ({samples} windows x {seq_len} tokens, {split} half)")
