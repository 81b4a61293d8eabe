"""The `layershap` command: parses options, calls the API, prints. No logic of its own.

Every mistake a user can fix ends as one line on stderr and exit code 2 (see `main`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

try:  # typer >= 0.29 vendors its own copy of click
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover - older typer uses click itself
    from click import ClickException

from layershap import __version__
from layershap.backends.options import BackendOption, RayAddressOption, backend_from_options
from layershap.cli_options import (
    BatchSize,
    Budget,
    Data,
    Device,
    DryRun,
    Dtype,
    EvalData,
    EvalSamples,
    EvalSeqLen,
    Model,
    Paired,
    Preset,
    Sampler,
    Samples,
    Seed,
    SeqLen,
    Store,
    Surrogate,
    TrustRemoteCode,
    Utility,
)
from layershap.cli_options import layer_list as _ints
from layershap.cli_options import load_model_from_options as _load
from layershap.cli_options import names as _names
from layershap.config import ConfigOption, parameters_from_context, remember_invocation
from layershap.errors import LayershapError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="Prune whole layers of a language model by their Shapley value.")



def _version(value: bool):
    if value:
        typer.echo(f"layershap {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                 help="Print the version and exit.")] = False):
    """Prune whole layers of a language model by their Shapley value."""


@app.command()
def layers(model: Model = None, dtype: Dtype = "auto", device: Device = "auto",
           trust_remote_code: TrustRemoteCode = False, config: ConfigOption = None):
    """Show the model's architecture and how many blocks it has."""
    from layershap.models.architectures import architecture_of
    from layershap.models.layers import num_layers

    loaded, _ = _load(model, dtype, device, trust_remote_code)
    arch = architecture_of(loaded)
    typer.echo(f"{loaded.config.model_type}: {num_layers(loaded)} blocks at {arch.blocks} ({arch.kind}), "
               f"{sum(p.numel() for p in loaded.parameters()) / 1e6:.1f}M parameters")


@app.command()
def ppl(model: Model = None, data: Annotated[str, typer.Option(help="Comma-separated texts (see prune "
                                                                    "--data).")] = "wiki",
        samples: Samples = 16, seq_len: SeqLen = 256, split: Annotated[str, typer.Option(
            help="Which half of each text: evaluation or calibration.")] = "evaluation",
        seed: Seed = 0, batch_size: BatchSize = 8, dtype: Dtype = "auto", device: Device = "auto",
        trust_remote_code: TrustRemoteCode = False,
        as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
        config: ConfigOption = None):
    """Perplexity of a model on one or more texts."""
    from layershap.api import perplexities

    names = _names(data)
    loaded, tokenizer = _load(model, dtype, device, trust_remote_code)
    result = perplexities(loaded, tokenizer, names, samples=samples, seq_len=seq_len, seed=seed, split=split,
                          batch_size=batch_size)
    if as_json:
        typer.echo(json.dumps({"model": model, "seq_len": seq_len, "samples": samples, "split": split,
                               "ppl": result}, indent=2))
    else:
        for name, value in result.items():
            typer.echo(f"{name}: perplexity {value:.3f} ({samples} windows x {seq_len} tokens, {split} half)")


@app.command()
def prune(ctx: typer.Context, ratio: Annotated[float, typer.Option(help="Fraction of blocks to remove, in (0, 1).")],
          out: Annotated[Path, typer.Option(help="Directory for the pruned model and layershap.json.")],
          method: Annotated[str, typer.Option(help="Pruning method (see `layershap methods`).")] = "shapley",
          protect: Annotated[str | None, typer.Option(help="Blocks never removed, e.g. 0,-1.")] = None,
          budget: Budget = None, preset: Preset = "default", sampler: Sampler = None, surrogate: Surrogate = None,
          utility: Utility = None, paired: Paired = None, store: Store = None,
          model: Model = None, data: Data = "c4",
          samples: Annotated[int | None, typer.Option(help="Calibration windows (default 8).")] = None,
          seq_len: Annotated[int | None, typer.Option("--seq-len", help="Tokens per window (default 128).")]
          = None, seed: Seed = 0,
          eval_data: EvalData = "wiki", eval_samples: EvalSamples = 16, eval_seq_len: EvalSeqLen = 256,
          batch_size: BatchSize = 8, dtype: Dtype = "auto", device: Device = "auto",
          trust_remote_code: TrustRemoteCode = False, backend: BackendOption = "local",
          ray_address: RayAddressOption = None, config: ConfigOption = None,
          quantize: Annotated[str | None, typer.Option(help="Then quantize the pruned model with torchao: int8 or "
                                                            "int4 (see `layershap quantize`).")] = None):
    """Remove round(ratio * n) blocks chosen by a method, save the model, and measure held-out perplexity
    before and after."""
    from layershap.api import check_ratio, layers_to_remove, prune_model
    from layershap.methods import get_method
    from layershap.models.layers import num_layers

    check_ratio(ratio)
    get_method(method)
    if quantize is not None:
        from layershap.models.load import resolve_device
        from layershap.quantize import check_scheme

        check_scheme(quantize, resolve_device(device))
    with backend_from_options(backend, ray_address, model=model, dtype=dtype, device=device,
                              trust_remote_code=trust_remote_code) as runner:
        loaded, tokenizer = _load(model, dtype, device, trust_remote_code)
        k = layers_to_remove(ratio, num_layers(loaded))
        settings, window = _estimate_settings(preset, budget=budget, sampler=sampler, surrogate=surrogate,
                                              utility=utility, paired=paired, seed=seed, samples=samples,
                                              seq_len=seq_len, target_removed=k)
        record = prune_model(loaded, tokenizer, ratio=ratio, method=method, out=out, protect=_ints(protect),
                             model_name=model, data=data, seed=seed, eval_data=_names(eval_data),
                             eval_samples=eval_samples, eval_seq_len=eval_seq_len, batch_size=batch_size,
                             settings=settings, store=store, backend=runner,
                             config=parameters_from_context(ctx), quantize=quantize, **window)
    typer.echo(f"removed {len(record['removed'])} of {record['n_layers']} blocks: {record['removed']}")
    for name in record["ppl_before"]:
        typer.echo(f"{name} perplexity: {record['ppl_before'][name]:.3f} -> {record['ppl_after'][name]:.3f}")
    for name, value in record.get("quantization", {}).get("ppl", {}).items():
        typer.echo(f"{name} perplexity after {quantize}: {value:.3f}")
    typer.echo(f"saved to {out} ({record['forward_passes']} calibration forward passes, "
               f"{record['seconds']:.1f} s to choose)")


def _estimate_settings(preset: str, *, budget, sampler, surrogate, utility, paired, seed, target_removed,
                       samples, seq_len):
    """Preset values, overridden by whatever the user gave explicitly."""
    from layershap.estimate import EstimateSettings, preset_settings, with_overrides

    base = preset_settings(preset)
    window = {"samples": samples if samples is not None else base.pop("samples", 8),
              "seq_len": seq_len if seq_len is not None else base.pop("seq_len", 128)}
    base.pop("samples", None), base.pop("seq_len", None)
    settings = with_overrides(EstimateSettings(**base, seed=seed, target_removed=target_removed), budget=budget,
                              sampler=sampler, surrogate=surrogate, utility=utility, paired=paired)
    return settings, window


@app.command()
def estimate(ctx: typer.Context,
             out: Annotated[Path, typer.Option(help="Run directory for shapley.json and shapley.csv.")],
             budget: Budget = None, preset: Preset = "default", sampler: Sampler = None,
             surrogate: Surrogate = None, utility: Utility = None, paired: Paired = None,
             target_ratio: Annotated[float | None, typer.Option(
                 "--target-ratio", help="Concentrate the masks on plans near this pruning ratio (the target sampler, as `prune` "
                 "does). Without it, masks cover every coalition size: the accurate choice for values.")] = None,
             store: Store = None, dry_run: DryRun = False, model: Model = None, data: Data = "c4",
             samples: Annotated[int | None, typer.Option(help="Calibration windows (default 8).")] = None,
             seq_len: Annotated[int | None, typer.Option("--seq-len", help="Tokens per window (default 128).")]
             = None, seed: Seed = 0, batch_size: BatchSize = 8, dtype: Dtype = "auto", device: Device = "auto",
             trust_remote_code: TrustRemoteCode = False, backend: BackendOption = "local",
             ray_address: RayAddressOption = None, config: ConfigOption = None):
    """Estimate every layer's Shapley value: sample masks, evaluate them (reusing the store), fit the
    surrogate, and write shapley.json / shapley.csv."""
    from layershap.api import check_ratio, estimate_dry_run, estimate_run, layers_to_remove
    from layershap.models.layers import num_layers

    if target_ratio is not None:
        check_ratio(target_ratio)
    with backend_from_options(backend, ray_address, model=model, dtype=dtype, device=device,
                              trust_remote_code=trust_remote_code) as runner:
        loaded, tokenizer = _load(model, dtype, device, trust_remote_code)
        n = num_layers(loaded)
        settings, window = _estimate_settings(preset, budget=budget, sampler=sampler, surrogate=surrogate,
                                              utility=utility, paired=paired, seed=seed, samples=samples,
                                              seq_len=seq_len,
                                              target_removed=(layers_to_remove(target_ratio, n)
                                                              if target_ratio is not None else None))
        common = dict(settings=settings, data=data, batch_size=batch_size, store=store, **window)
        if dry_run:
            plan = estimate_dry_run(loaded, tokenizer, **common)
            typer.echo(f"would run {plan['forward_passes']} forward passes ({plan['stored']} of {plan['masks']} "
                       f"masks already stored), about {plan['estimated_seconds'] / 60:.1f} min on this device")
            return
        record = estimate_run(loaded, tokenizer, out=out, model_name=model, backend=runner,
                              config=parameters_from_context(ctx, target_ratio=target_ratio or 0.25), **common)
    fit = record["surrogate"]
    typer.echo(f"{record['evaluations']} masks evaluated, {record['reused']} reused from {record['store']}")
    typer.echo(f"surrogate {fit['name']}: held-out r2 {fit['r2']:.3f}, spearman {fit['spearman']:.3f} "
               f"({fit['n_train']} train / {fit['n_holdout']} held out)")
    order = sorted(record["layers"], key=lambda e: e["shapley"])
    typer.echo("lowest-valued layers: " + ", ".join(f"{e['index']} ({e['shapley']:.4f})" for e in order[:8]))
    typer.echo(f"wrote {out / 'shapley.json'} and {out / 'shapley.csv'}")


@app.command()
def methods(config: ConfigOption = None):
    """List the pruning methods."""
    from layershap.methods import METHODS

    for name, fn in METHODS.items():
        doc = fn.__doc__ or sys.modules[fn.__module__].__doc__ or ""
        typer.echo(f"{name}: {doc.strip().splitlines()[0] if doc.strip() else ''}")


# Commands that live in modules of their own; each module has `register(app)`.
COMMAND_MODULES: tuple[str, ...] = ("layershap.cli_evaluate", "layershap.cli_report", "layershap.cli_transform")


def _register_command_modules() -> None:
    from importlib import import_module

    for name in COMMAND_MODULES:
        import_module(name).register(app)


_register_command_modules()


def _quiet_libraries() -> None:
    """Library chatter (weight-loading bars, torchao's optional-kernel notices) would bury our own output."""
    import logging
    import os

    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for name in ("torchao", "torch.utils._pytree", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr and exit code 2."""
    if not {"--version", "--help", "-h"} & set(sys.argv[1:] if argv is None else argv):
        _quiet_libraries()
    remember_invocation(sys.argv[1:] if argv is None else argv)
    try:
        rc = app(args=argv, prog_name="layershap", standalone_mode=False)
    except LayershapError as exc:
        print(f"layershap: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except ClickException as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `layershap`: the help is the answer
            print(exc.format_message())
            sys.exit(0)
        print(f"layershap: error: {exc.format_message()}", file=sys.stderr)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        print("layershap: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(rc if isinstance(rc, int) else 0)
