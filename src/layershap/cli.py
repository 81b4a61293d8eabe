"""The `layershap` command: parses options, calls the API, prints. No logic of its own.

Every mistake a user can fix ends as one line on stderr and exit code 2 (see `main`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

try:  # typer >= 0.29 vendors its own copy of click
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover - older typer uses click itself
    from click import ClickException

from layershap import __version__
from layershap.errors import LayershapError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="Prune whole layers of a language model by their Shapley value.")

# Options shared by several commands.
Model = Annotated[Optional[str], typer.Option(
    "--model", "-m", help="Hugging Face id, local directory, or .gguf file; default: embedded SmolLM2-135M.")]
Dtype = Annotated[str, typer.Option(help="auto (float32 on CPU, checkpoint dtype on GPU), float32, bfloat16, "
                                         "float16.")]
Device = Annotated[str, typer.Option(help="auto (CUDA when present), cpu, cuda, cuda:N.")]
TrustRemoteCode = Annotated[bool, typer.Option("--trust-remote-code", help="Allow code from the model repo.")]
Data = Annotated[str, typer.Option(help="Calibration text: .txt/.jsonl file, packaged text (wiki, c4, code, "
                                        "tiny, technical, multilingual) or hub dataset (wikitext2, ptb, hf:c4).")]
Samples = Annotated[int, typer.Option(help="Number of calibration windows.")]
SeqLen = Annotated[int, typer.Option("--seq-len", help="Tokens per window.")]
Seed = Annotated[int, typer.Option(help="Seed for window choice, mask sampling and surrogate training.")]
EvalData = Annotated[str, typer.Option("--eval-data", help="Comma-separated texts for held-out perplexity "
                                                          "(their evaluation half; never the calibration "
                                                          "windows).")]
EvalSamples = Annotated[int, typer.Option("--eval-samples", help="Held-out windows per text.")]
EvalSeqLen = Annotated[int, typer.Option("--eval-seq-len", help="Tokens per held-out window.")]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Windows per forward pass.")]


def _version(value: bool):
    if value:
        typer.echo(f"layershap {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                 help="Print the version and exit.")] = False):
    """Prune whole layers of a language model by their Shapley value."""


def _load(model, dtype, device, trust_remote_code):
    from layershap.models.load import load_model

    return load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)


def _names(csv: str) -> list[str]:
    names = [part.strip() for part in csv.split(",") if part.strip()]
    if not names:
        raise LayershapError("expected at least one name in a comma-separated list")
    return names


def _ints(csv: str | None) -> list[int]:
    if not csv:
        return []
    try:
        return [int(part) for part in csv.split(",") if part.strip()]
    except ValueError:
        raise LayershapError(f"expected comma-separated layer indices such as 0,-1; got {csv!r}") from None


@app.command()
def layers(model: Model = None, dtype: Dtype = "auto", device: Device = "auto",
           trust_remote_code: TrustRemoteCode = False):
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
        as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False):
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
def prune(ratio: Annotated[float, typer.Option(help="Fraction of blocks to remove, in (0, 1).")],
          out: Annotated[Path, typer.Option(help="Directory for the pruned model and layershap.json.")],
          method: Annotated[str, typer.Option(help="Pruning method (see `layershap methods`).")] = "shortgpt",
          protect: Annotated[Optional[str], typer.Option(help="Blocks never removed, e.g. 0,-1.")] = None,
          model: Model = None, data: Data = "c4", samples: Samples = 8, seq_len: SeqLen = 128, seed: Seed = 0,
          eval_data: EvalData = "wiki", eval_samples: EvalSamples = 16, eval_seq_len: EvalSeqLen = 256,
          batch_size: BatchSize = 8, dtype: Dtype = "auto", device: Device = "auto",
          trust_remote_code: TrustRemoteCode = False):
    """Remove round(ratio * n) blocks chosen by a method, save the model, and measure perplexity before and
    after."""
    from layershap.api import check_ratio, prune_model

    check_ratio(ratio)
    loaded, tokenizer = _load(model, dtype, device, trust_remote_code)
    record = prune_model(loaded, tokenizer, ratio=ratio, method=method, out=out, protect=_ints(protect),
                         model_name=model, data=data, samples=samples, seq_len=seq_len, seed=seed,
                         eval_data=_names(eval_data), eval_samples=eval_samples, eval_seq_len=eval_seq_len,
                         batch_size=batch_size)
    typer.echo(f"removed {len(record['removed'])} of {record['n_layers']} blocks: {record['removed']}")
    for name in record["ppl_before"]:
        typer.echo(f"{name} perplexity: {record['ppl_before'][name]:.3f} -> {record['ppl_after'][name]:.3f}")
    typer.echo(f"saved to {out} ({record['forward_passes']} calibration forward passes, "
               f"{record['seconds']:.1f} s to choose)")


@app.command()
def methods():
    """List the pruning methods."""
    from layershap.methods import METHODS

    for name, fn in METHODS.items():
        typer.echo(f"{name}: {(fn.__module__ and sys.modules[fn.__module__].__doc__ or '').strip().splitlines()[0]}")


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
