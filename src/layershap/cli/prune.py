"""Commands that choose blocks: `prune` (choose, remove, save, measure), `estimate` (Shapley values only)
and `methods` (the registered pruning methods).

Registered on the main app by `register(app)` (see `COMMAND_MODULES` in cli/app.py).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from layershap.cli.options import (
    BackendOption,
    BatchSize,
    Budget,
    Confirm,
    Data,
    Device,
    DryRun,
    Dtype,
    EvalData,
    EvalSamples,
    EvalSeqLen,
    Model,
    Offload,
    Paired,
    Preset,
    RayAddressOption,
    Sampler,
    Seed,
    Store,
    Surrogate,
    TrustRemoteCode,
    Utility,
    backend_from_options,
    estimate_settings,
)
from layershap.cli.options import layer_list as _ints
from layershap.cli.options import load_model_from_options as _load
from layershap.cli.options import names as _names
from layershap.config import ConfigOption, parameters_from_context
from layershap.errors import LayershapError
from layershap.io import check_out_is_not_the_model, check_writable_dir


def register(app: typer.Typer) -> None:
    app.command("prune")(prune)
    app.command("estimate")(estimate)
    app.command("methods")(methods)


def prune(ctx: typer.Context,
          out: Annotated[Path, typer.Option(help="Directory for the pruned model and layershap.json, or a .gguf "
                                                 "file (needs a GGUF --model; copies the kept blocks in their "
                                                 "own quantization).")],
          ratio: Annotated[float | None, typer.Option(help="Fraction of blocks to remove, in (0, 1); needed "
                                                           "unless --plan.")] = None,
          plan: Annotated[Path | None, typer.Option(help="layershap.json of an earlier prune (or its directory): "
                                                         "remove its blocks without choosing again.")] = None,
          out_format: Annotated[str, typer.Option("--format", help="auto (gguf when --out ends in .gguf), hf, "
                                                                   "gguf, or decilm (a sublayer plan of a Llama "
                                                                   "or Mistral as a Nemotron-NAS directory, "
                                                                   "which vLLM serves).")] = "auto",
          method: Annotated[str, typer.Option(help="Pruning method (see `layershap methods`).")] = "shapley",
          protect: Annotated[str | None, typer.Option(help="Blocks never removed, e.g. 0,-1.")] = None,
          budget: Budget = None, preset: Preset = "default", sampler: Sampler = None, surrogate: Surrogate = None,
          utility: Utility = None, paired: Paired = None, confirm: Confirm = None, store: Store = None,
          model: Model = None, data: Data = "c4",
          samples: Annotated[int | None, typer.Option(help="Calibration windows (default 8).")] = None,
          seq_len: Annotated[int | None, typer.Option("--seq-len", help="Tokens per window (default 128).")]
          = None, seed: Seed = 0,
          eval_data: EvalData = "wiki", eval_samples: EvalSamples = 16, eval_seq_len: EvalSeqLen = 256,
          batch_size: BatchSize = 8, dtype: Dtype = "auto", device: Device = "auto",
          trust_remote_code: TrustRemoteCode = False, offload: Offload = "auto", backend: BackendOption = "local",
          ray_address: RayAddressOption = None, config: ConfigOption = None,
          quantize: Annotated[str | None, typer.Option(help="Then quantize the pruned model with torchao: int8 or "
                                                            "int4 (see `layershap quantize`).")] = None,
          repair: Annotated[str, typer.Option(help="Training-free repair of each removed run, folded into the kept "
                                                   "weights (same architecture): auto (scale where it folds "
                                                   "exactly, none elsewhere), none, scale (layershap's), "
                                                   "prunecomp (Prune&Comp), replaceme-lstsq, replaceme-cosine "
                                                   "(ReplaceMe). See docs/repair.md.")] = "auto",
          repair_samples: Annotated[int, typer.Option(help="Calibration windows the repair is fitted on, apart "
                                                           "from the ones the blocks were chosen on.")] = 32,
          repair_choice: Annotated[bool, typer.Option(help="With --repair and the Shapley search: judge the "
                                                           "search's finalists after their repair and keep the "
                                                           "best repaired plan.")] = True,
          granularity: Annotated[str, typer.Option(help="Players: block (remove whole blocks) or sublayer (attention "
                                                        "and MLP sublayers; --ratio is then a share of the blocks' "
                                                        "parameters, one --budget is split half to the block plan "
                                                        "and half to the sublayer game, and the saved model loads "
                                                        "with trust_remote_code).")] = "block"):
    """Remove round(ratio * n) blocks chosen by a method (or the blocks an earlier run's --plan lists), save
    the model (a directory, or a GGUF holding the kept blocks in their own quantization), and measure
    held-out perplexity before and after."""
    from layershap.api import PruneSettings, prune_model
    from layershap.game.layer_game import check_granularity
    from layershap.models.layers import num_layers
    from layershap.plan.methods import get_method
    from layershap.plan.ratio import check_ratio, layers_to_remove
    from layershap.transform.gguf_export import wants_gguf
    from layershap.transform.write import gguf_source

    if plan is None and ratio is None:
        raise LayershapError("give --ratio (the fraction of blocks to remove) or --plan (an earlier run's "
                             "layershap.json)")
    if ratio is not None:
        check_ratio(ratio)
    get_method(method)
    check_granularity(granularity)
    if repair not in ("none", "auto"):
        from layershap.transform.repair import recipe_for

        recipe_for(repair)
        if repair_samples < 1:
            raise LayershapError(f"--repair-samples must be at least 1; got {repair_samples}")
    if quantize is not None:
        from layershap.models.load import resolve_device
        from layershap.transform.quantize import check_scheme

        check_scheme(quantize, resolve_device(device))
    check_out_is_not_the_model(out, model)
    if wants_gguf(out, out_format):
        gguf_source(model, quantize, granularity)  # refuse before loading and choosing
        check_writable_dir(out.parent)
    elif out_format == "decilm":
        from layershap.transform.write import check_decilm_output

        check_decilm_output(None, quantize, granularity)
        check_writable_dir(out)
    else:
        check_writable_dir(out)
    with backend_from_options(backend, ray_address, model=model, dtype=dtype, device=device,
                              trust_remote_code=trust_remote_code) as runner:
        loaded, tokenizer = _load(model, dtype, device, trust_remote_code, offload, batch_size=batch_size,
                                  seq_len=max(seq_len or 128, eval_seq_len))
        k = layers_to_remove(ratio, num_layers(loaded)) if plan is None else None
        settings, window = estimate_settings(preset, budget=budget, sampler=sampler, surrogate=surrogate,
                                              utility=utility, paired=paired, seed=seed, samples=samples,
                                              seq_len=seq_len, target_removed=k, confirm=confirm)
        prune_settings = PruneSettings(out=out, ratio=ratio, method=method, protect=_ints(protect), model_name=model,
                                       data=data, seed=seed, eval_data=_names(eval_data), eval_samples=eval_samples,
                                       eval_seq_len=eval_seq_len, batch_size=batch_size, granularity=granularity,
                                       plan_file=plan, out_format=out_format, quantize=quantize, repair=repair,
                                       repair_samples=repair_samples, repair_choice=repair_choice,
                                       estimate=settings,
                                       store=store, config=parameters_from_context(ctx), **window)
        record = prune_model(loaded, tokenizer, prune_settings, backend=runner)
    if granularity == "sublayer":
        typer.echo(f"removed {len(record['removed'])} of {2 * record['n_layers']} sublayers "
                   f"({record['parameter_fraction_removed']:.1%} of block parameters, "
                   f"{record['kv_cache_fraction_removed']:.1%} of the KV cache): {', '.join(record['removed'])}")
    else:
        typer.echo(f"removed {len(record['removed'])} of {record['n_layers']} blocks: {record['removed']}"
                   + (f" (plan from {plan})" if plan is not None else ""))
    if record.get("repair", {}).get("note"):
        typer.echo(record["repair"]["note"])
    elif "repair" in record:
        cuts = record["repair"]["cuts"]
        typer.echo(f"repaired ({record['repair']['recipe']}): " + "; ".join(
            f"blocks {c['removed'][0]}-{c['removed'][1]} " + (f"x{c['scale']:.3f}" if "scale" in c else c["kind"])
            for c in cuts) + f" ({record['repair']['seconds']:.1f} s)")
    choice = (record.get("plan") or {}).get("repair_choice")
    if choice and "finalists" in choice:
        typer.echo(f"judged {len(choice['finalists'])} finalists after repair: "
                   + ("chose another plan than before repair" if choice["changed"] else "the same plan won"))
    for name in record["ppl_before"]:
        typer.echo(f"{name} perplexity: {record['ppl_before'][name]:.3f} -> {record['ppl_after'][name]:.3f}")
    for name, value in record.get("quantization", {}).get("ppl", {}).items():
        typer.echo(f"{name} perplexity after {quantize}: {value:.3f}")
    for note in record.get("gguf", {}).get("notes", []):
        typer.echo(f"note: {note}")
    if "gguf" in record:
        gguf = record["gguf"]
        deci = " as llama.cpp's deci architecture" if gguf.get("architecture") == "deci" else ""
        edited = gguf.get("repaired_tensors", {})
        typer.echo(f"wrote {out}{deci}: {len(gguf['kept'])} blocks, {gguf['tensors']} tensors copied in their own "
                   f"types ({gguf['bytes'] / 2**20:.1f} MiB"
                   + (f"; {len(edited)} of them rescaled or requantized by the repair" if edited else "")
                   + f"); record in {Path(gguf['file']).stem}.layershap.json")
    typer.echo(f"saved to {out} ({record['forward_passes']} calibration forward passes, "
               f"{record['seconds']:.1f} s to choose)")


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
             trust_remote_code: TrustRemoteCode = False, offload: Offload = "auto",
             backend: BackendOption = "local", ray_address: RayAddressOption = None, config: ConfigOption = None,
             granularity: Annotated[str, typer.Option(help="Players: block, or sublayer (attn.i and mlp.i of every "
                                                           "block, 2n players).")] = "block"):
    """Estimate every layer's Shapley value: sample masks, evaluate them (reusing the store), fit the
    surrogate, and write shapley.json / shapley.csv."""
    from layershap.api import estimate_dry_run, estimate_run
    from layershap.game.layer_game import check_granularity
    from layershap.models.layers import num_layers
    from layershap.plan.ratio import check_ratio, layers_to_remove

    check_granularity(granularity)
    if target_ratio is not None:
        check_ratio(target_ratio)
    if not dry_run:
        check_writable_dir(out)
    with backend_from_options(backend, ray_address, model=model, dtype=dtype, device=device,
                              trust_remote_code=trust_remote_code) as runner:
        loaded, tokenizer = _load(model, dtype, device, trust_remote_code, offload, batch_size=batch_size,
                                  seq_len=seq_len or 128)
        n = num_layers(loaded)
        if granularity == "sublayer":
            from layershap.models.sublayers import check_sublayers
            from layershap.plan.sublayer import blocks_for_parameter_ratio

            check_sublayers(loaded)
            target = 2 * blocks_for_parameter_ratio(target_ratio, n) if target_ratio is not None else None
        else:
            target = layers_to_remove(target_ratio, n) if target_ratio is not None else None
        settings, window = estimate_settings(preset, budget=budget, sampler=sampler, surrogate=surrogate,
                                              utility=utility, paired=paired, seed=seed, samples=samples,
                                              seq_len=seq_len, target_removed=target)
        common = dict(settings=settings, data=data, batch_size=batch_size, store=store, granularity=granularity,
                      **window)
        if dry_run:
            plan = estimate_dry_run(loaded, tokenizer, **common)
            typer.echo(f"would run {plan['forward_passes']} forward passes ({plan['stored']} of {plan['masks']} "
                       f"masks already stored; all {plan['masks']} = {plan['full_size_passes']:.1f} full-size "
                       f"passes), about {plan['estimated_seconds'] / 60:.1f} min on this device")
            return
        record = estimate_run(loaded, tokenizer, out=out, model_name=model, backend=runner,
                              config=parameters_from_context(ctx), **common)
    fit = record["surrogate"]
    concurrent = record.get("reused_from_concurrent_run") or 0
    typer.echo(f"{record['evaluations']} masks evaluated, {record['reused']} reused from {record['store']}"
               + (f" ({concurrent} of them measured meanwhile by a concurrent run)" if concurrent else ""))
    other = record.get("not_reused_other_conditions") or {}
    if other:
        parts = "; ".join(f"{count} under another {why}" for why, count in sorted(other.items()))
        typer.echo(f"{sum(other.values())} stored rows of these masks were measured under other conditions "
                   f"and not reused ({parts})")
    typer.echo(f"surrogate {fit['name']}: held-out r2 {fit['r2']:.3f}, spearman {fit['spearman']:.3f} "
               f"({fit['n_train']} train / {fit['n_holdout']} held out)")
    order = sorted(record["layers"], key=lambda e: e["shapley"])
    typer.echo(f"lowest-valued {'sublayers' if granularity == 'sublayer' else 'layers'}: "
               + ", ".join(f"{e.get('name', e['index'])} ({e['shapley']:.4f})" for e in order[:8]))
    typer.echo(f"wrote {out / 'shapley.json'} and {out / 'shapley.csv'}")


def methods(config: ConfigOption = None):
    """List the pruning methods."""
    from layershap.plan.methods import METHODS
    from layershap.plan.sublayer import SUBLAYER_METHODS

    for name, fn in METHODS.items():
        doc = fn.__doc__ or sys.modules[fn.__module__].__doc__ or ""
        typer.echo(f"{name}: {doc.strip().splitlines()[0] if doc.strip() else ''}")
    for name, fn in SUBLAYER_METHODS.items():
        if name not in METHODS:
            doc = sys.modules[fn.__module__].__doc__ or ""
            typer.echo(f"{name} (compare --granularity sublayer): {doc.strip().splitlines()[0] if doc.strip() else ''}")
