"""Option types and small parsing helpers shared by every command module of the CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from layershap.errors import LayershapError
from layershap.game.backends import Backend, ModelSpec, make_backend

Model = Annotated[str | None, typer.Option(
    "--model", "-m", help="Hugging Face id, local directory, or .gguf file; default: embedded SmolLM2-135M.")]
Dtype = Annotated[str, typer.Option(help="auto (float32 on CPU, checkpoint dtype on GPU), float32, bfloat16, "
                                         "float16.")]
Device = Annotated[str, typer.Option(help="auto (CUDA when present), cpu, cuda, cuda:N.")]
TrustRemoteCode = Annotated[bool, typer.Option("--trust-remote-code", help="Allow code from the model repo "
                                                                         "(a directory layershap saved with "
                                                                         "sublayers removed needs none).")]
Data = Annotated[str, typer.Option(help="Calibration text: .txt/.jsonl file, packaged text (wiki, c4, code, "
                                        "tiny, technical, multilingual) or hub dataset (wikitext2, ptb, hf:c4), or a mixture "
                                        "of them: c4,wiki,code or weighted c4:2,wiki:1 (windows drawn "
                                        "across the parts in proportion).")]
Samples = Annotated[int, typer.Option(help="Number of calibration windows.")]
SeqLen = Annotated[int, typer.Option("--seq-len", help="Tokens per window.")]
Seed = Annotated[int, typer.Option(help="Seed for window choice, mask sampling and surrogate training.")]
EvalData = Annotated[str, typer.Option("--eval-data", help="Comma-separated texts for held-out perplexity "
                                                          "(their evaluation half; never the calibration "
                                                          "windows).")]
EvalSamples = Annotated[int, typer.Option("--eval-samples", help="Held-out windows per text.")]
EvalSeqLen = Annotated[int, typer.Option("--eval-seq-len", help="Tokens per held-out window.")]
def _at_least_one(value):
    """A count of windows per pass below 1 ended every command that runs the model in a traceback."""
    if value is not None and value < 1:
        raise typer.BadParameter(f"must be at least 1; got {value}")
    return value


BatchSize = Annotated[int, typer.Option("--batch-size", help="Windows per forward pass.", callback=_at_least_one)]
Budget = Annotated[int | None, typer.Option(help="Real-model evaluations, in full-size passes: a mask costs "
                                                    "its kept blocks' share (default 128; the paper preset "
                                                    "counts 8000 masks).")]
Preset = Annotated[str, typer.Option(help="default, or paper (the official pipeline: 8000 masks, 10x128 "
                                          "windows, MLP surrogate, ppl_ratio).")]
Sampler = Annotated[str | None, typer.Option(help="Mask strata: target (around the pruning ratio), "
                                                     "shapley (every size), paper.")]
Confirm = Annotated[int | None, typer.Option(help="Rounds of successive halving that re-measure the shapley "
                                                  "method's finalists on fresh calibration windows and keep the "
                                                  "winner there (0: keep the best screened plan; default 0).")]
Surrogate = Annotated[str | None, typer.Option(help="Surrogate: pairwise, ensemble, linear, paper.")]
Utility = Annotated[str | None, typer.Option(help="Utility of a mask: neg_nll, log_ratio, ppl_ratio, or kl (minus the mean KL from the dense model).")]
Paired = Annotated[bool | None, typer.Option("--paired/--no-paired", help="Also evaluate the complement of "
                                                                            "every sampled mask.")]
Store = Annotated[Path | None, typer.Option(help="SQLite evaluation store (default: one per model in "
                                                    "$LAYERSHAP_CACHE/evaluations).")]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Print forward passes and rough time; run nothing.")]


Offload = Annotated[str, typer.Option(
    "--offload", help="Where the weights wait when the model does not fit: auto (load whole when it fits, else "
                      "stream its blocks from host memory or the checkpoint), none (load whole or stop), cpu "
                      "(stream from host memory), disk (stream from the safetensors checkpoint, read block by block).")]


def load_model_from_options(model, dtype, device, trust_remote_code, offload: str = "none", *,
                            batch_size: int = 8, seq_len: int = 256):
    """Load as the options say. Commands without --offload pass "none": they check memory and stop with the
    numbers rather than stream a model their stages cannot (quantize, heal, eval)."""
    from layershap.models.load import load_model

    return load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code, offload=offload,
                      batch_size=batch_size, seq_len=seq_len)


def names(csv: str) -> list[str]:
    """Comma-separated names, blanks dropped; at least one."""
    found = [part.strip() for part in csv.split(",") if part.strip()]
    if not found:
        raise LayershapError("expected at least one name in a comma-separated list")
    return found


def layer_list(csv: str | None) -> list[int]:
    """Comma-separated layer indices such as 0,-1 (negatives count from the end)."""
    if not csv:
        return []
    try:
        return [int(part) for part in csv.split(",") if part.strip()]
    except ValueError:
        raise LayershapError(f"expected comma-separated layer indices such as 0,-1; got {csv!r}") from None


BackendOption = Annotated[str, typer.Option(
    "--backend", help="Where masked evaluations run: local (this process) or ray (a Ray cluster: one worker "
                      "per GPU; see docs/scaling.md).")]
RayAddressOption = Annotated[str | None, typer.Option(
    "--ray-address", help="Ray cluster to join (HOST:PORT of its head, ray://HOST:PORT, or auto); default: "
                          "$RAY_ADDRESS, else a local cluster started for the run.")]


def backend_from_options(backend: str, ray_address: str | None, *, model: str | None, dtype: str, device: str,
                         trust_remote_code: bool) -> Backend:
    """The backend the options ask for; workers load the model from the same options as the driver."""
    if model is not None and Path(model).expanduser().exists():  # workers may start in another directory
        model = str(Path(model).expanduser().resolve())
    spec = ModelSpec(name=model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    return make_backend(backend, spec=spec, address=ray_address)


def estimate_settings(preset: str, *, budget, sampler, surrogate, utility, paired, seed, target_removed,
                       samples, seq_len, confirm=None):
    """Preset values, overridden by whatever the user gave explicitly."""
    from layershap.estimate.pipeline import EstimateSettings, preset_settings, with_overrides

    base = preset_settings(preset)
    window = {"samples": samples if samples is not None else base.pop("samples", 8),
              "seq_len": seq_len if seq_len is not None else base.pop("seq_len", 128)}
    base.pop("samples", None), base.pop("seq_len", None)
    settings = with_overrides(EstimateSettings(**base, seed=seed, target_removed=target_removed), budget=budget,
                              sampler=sampler, surrogate=surrogate, utility=utility, paired=paired,
                              confirm=confirm)
    return settings, window


def config_writer(ctx, out, command: str, model):
    """Fingerprint the model now (before the command changes it in place); the returned function writes
    out/config.toml once the run has succeeded, with the values defaults resolved to."""
    from layershap.config import parameters_from_context, write_run_config
    from layershap.game.context import model_fingerprint

    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    fingerprint = model_fingerprint(model)

    def write(**resolved):
        write_run_config(out, command, parameters_from_context(ctx, dtype=dtype, **resolved),
                         {"model_fingerprint": fingerprint})

    return write
