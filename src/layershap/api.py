"""The public workflows the CLI is built on, each a straight line through the stages.

model -> calibration windows -> method (-> masks -> evaluations -> surrogate -> Shapley) -> plan
      -> pruned model -> held-out perplexity -> record on disk.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from layershap import __version__
from layershap.config import versions, write_run_config
from layershap.data.windows import text_windows
from layershap.errors import LayershapError
from layershap.game.nll import perplexities_of, perplexity
from layershap.io import gguf_sidecar, read_json, write_json
from layershap.models.layers import normalise_layer_list, num_layers, prune_layers
from layershap.models.load import model_label
from layershap.models.save import save_pruned
from layershap.plan.methods import select_layers
from layershap.plan.ratio import layers_to_remove
from layershap.plan.saved import plan_from_record, read_plan
from layershap.transform.gguf_export import gguf_source_for, wants_gguf


def prune_model(model, tokenizer, *, ratio: float | None, method: str, out, protect=(),
                model_name: str | None = None, data: str = "c4", samples: int = 8, seq_len: int = 128,
                seed: int = 0, eval_data=("wiki",), eval_samples: int = 16, eval_seq_len: int = 256,
                batch_size: int = 8, backend=None, config: dict | None = None, quantize: str | None = None,
                granularity: str = "block", plan_file=None, out_format: str | None = None,
                **method_options) -> dict:
    """Choose blocks with `method` on calibration text, remove them, save, and return the record written to
    `out/layershap.json` (held-out perplexity before and after included).

    quantize: int8 or int4: the pruned model is then quantized with torchao (`layershap.transform.quantize`) before it
    is saved, and the record gains `quantization` (scheme, config, sizes, held-out perplexity).

    granularity: "block" removes round(ratio * n) blocks; "sublayer" removes attention and MLP sublayers whose
    parameters add up to at least ratio of the blocks' (`layershap.plan.sublayer`), and saves a directory that
    loads with trust_remote_code when single sublayers go (and still does with --quantize).

    plan_file: the `layershap.json` of an earlier run (or its directory): its blocks are removed without
    choosing again (ratio may then be None; method, forward passes and scores come from the plan).

    out_format: "hf" (a `save_pretrained` directory), "gguf", or None (gguf when `out` ends in .gguf). A GGUF
    is written from the GGUF the model was loaded from (`model_name`, or the embedded default's file): the
    kept blocks' tensors are copied in their original quantization (`transform/gguf_export.py`), and the
    record goes to `<out stem>.layershap.json` beside it.

    backend: where masked evaluations run (see `layershap.game.backends`; None: this process). config: the
    options as the CLI resolved them, written with provenance to `out/config.toml`.
    """
    from layershap.game.backends import use_backend
    from layershap.game.context import model_fingerprint
    from layershap.game.layer_game import check_granularity

    check_granularity(granularity)
    writes_gguf = wants_gguf(out, out_format)
    if granularity == "sublayer":
        from layershap.models.sublayers import check_sublayers

        check_sublayers(model)
        if plan_file is not None or writes_gguf:
            raise LayershapError("--plan and a GGUF --out take whole blocks; drop --granularity sublayer")
        from layershap.estimate.pipeline import check_sublayer_plan_utility

        check_sublayer_plan_utility(method_options.get("settings"))
    gguf_source = gguf_source_for(model_name, quantize) if writes_gguf else None
    if quantize is not None:
        from layershap.transform.quantize import check_quantizable

        check_quantizable(model, quantize)
    n = num_layers(model)
    chosen = read_plan(plan_file, model, n, ratio) if plan_file is not None else None
    k = len(chosen["removed"]) if chosen is not None else layers_to_remove(ratio, n)
    if chosen is not None:
        ratio, method, protect = chosen.get("ratio", k / n), chosen.get("method", "plan"), chosen.get("protect", [])
    protected = normalise_layer_list(protect, n)
    if n - len(protected) < k:
        raise LayershapError(f"--protect keeps {len(protected)} of {n} blocks, leaving {n - len(protected)} "
                             f"to choose {k} from; protect fewer blocks or lower --ratio")
    calibration = text_windows(data, tokenizer, samples=samples, seq_len=seq_len, seed=seed, split="calibration")
    held_out = {name: text_windows(name, tokenizer, samples=eval_samples, seq_len=eval_seq_len, seed=seed,
                                   split="evaluation") for name in eval_data}
    before = perplexities_of(model, held_out, batch_size=batch_size)
    model_fp = model_fingerprint(model)  # of the model as given, for the run's provenance
    settings = method_options.get("settings")
    parameters = _run_parameters(model, model_name, settings, config, out=out, ratio=ratio,
                                 method=method, protect=protected, data=data, samples=samples, seq_len=seq_len,
                                 seed=seed, eval_data=list(eval_data), eval_samples=eval_samples,
                                 eval_seq_len=eval_seq_len, batch_size=batch_size, store=method_options.get("store"))
    if method == "shapley" and settings is not None and settings.confirm > 0:
        from layershap.plan.confirm import confirmation_windows

        method_options["confirmation_windows"] = confirmation_windows(data, tokenizer, calibration, settings.confirm)
    started = time.perf_counter()
    if granularity == "sublayer":
        return _prune_sublayers(model, tokenizer, calibration, held_out, before, parameters, model_fp, backend,
                                ratio=ratio, method=method, out=out, protect=protected, model_name=model_name,
                                seed=seed, batch_size=batch_size, quantize=quantize, **method_options)
    if chosen is not None:
        plan = plan_from_record(chosen, n)
    else:
        with use_backend(backend):
            plan = select_layers(method, model, calibration, k, protect=protected, seed=seed,
                                 batch_size=batch_size, **method_options)
    seconds = time.perf_counter() - started
    prune_layers(model, plan.remove)
    after = perplexities_of(model, held_out, batch_size=batch_size)
    record = {
        "model": model_label(model_name),
        "model_type": model.config.model_type,
        "n_layers": n,
        "removed": plan.remove,
        "kept": plan.kept,
        "method": method,
        "ratio": ratio,
        "protect": protected,
        "ppl_before": before,
        "ppl_after": after,
        "forward_passes": plan.forward_passes,
        "cost": asdict(plan.cost) if plan.cost is not None else None,
        "seconds": seconds,
        "scores": plan.scores,
        "plan": plan.details,
        "calibration": calibration.describe(),
        "evaluation": {name: w.describe() for name, w in held_out.items()},
        "layershap_version": __version__,
        "versions": versions(),
        "model_fingerprint": model_fp,
    }
    if chosen is not None:
        record["plan_file"] = str(chosen["plan_file"])
    if gguf_source is not None:
        from layershap.transform.gguf_export import write_pruned_gguf

        record["gguf"] = write_pruned_gguf(gguf_source, out, plan.remove, record)
        write_json(gguf_sidecar(out, "layershap.json"), record)
        write_run_config(out, "prune", parameters, _provenance(model_fp, calibration, held_out, backend),
                         path=gguf_sidecar(out, "config.toml"))
        return record
    record = _save(model, tokenizer, out, record, quantize, held_out, batch_size)
    write_run_config(out, "prune", parameters, _provenance(model_fp, calibration, held_out, backend))
    return record


def _save(model, tokenizer, out, record: dict, quantize: str | None, held_out: dict, batch_size: int) -> dict:
    """Save the pruned model (quantized first with --quantize, its held-out perplexity then recorded too) and
    return the record as written; a model with single sublayers removed keeps its modeling file either way."""
    if quantize is None:
        save_pruned(model, tokenizer, Path(out), record)
        return record
    from layershap.transform.quantize import quantize_model, save_quantized

    quantize_model(model, quantize)
    record["quantization"] = {"ppl": perplexities_of(model, held_out, batch_size=batch_size)}
    save_quantized(model, tokenizer, Path(out), record)
    return read_json(Path(out) / "layershap.json")


def _prune_sublayers(model, tokenizer, calibration, held_out, before, parameters, model_fp, backend, *, ratio,
                     method, out, protect, model_name, seed, batch_size, quantize=None, **method_options) -> dict:
    """`prune_model` with --granularity sublayer: plan over 2n players, remove, save, record."""
    import numpy as np

    from layershap.game.backends import use_backend
    from layershap.models.sublayers import remove_sublayers
    from layershap.plan.sublayer import sublayer_plan

    n = num_layers(model)
    started = time.perf_counter()
    with use_backend(backend):
        plan = sublayer_plan(model, calibration, ratio, settings=method_options.get("settings"),
                             store=method_options.get("store"), batch_size=batch_size, seed=seed, protect=protect,
                             block_method=method)
    seconds = time.perf_counter() - started
    mask = np.ones(2 * n, dtype=bool)
    mask[plan.remove] = False
    remove_sublayers(model, mask)
    after = perplexities_of(model, held_out, batch_size=batch_size)
    details = plan.details
    record = {
        "model": model_label(model_name),
        "model_type": model.config.model_type,
        "n_layers": n,
        "granularity": "sublayer",
        "removed": details["removed_sublayers"],
        "removed_sublayers": details["removed_sublayers"],
        "parameters_removed": details["parameters_removed"],
        "parameter_fraction_removed": details["parameter_fraction_removed"],
        "kv_cache_fraction_removed": details["kv_cache_fraction_removed"],
        "method": method,
        "ratio": ratio,
        "protect": protect,
        "ppl_before": before,
        "ppl_after": after,
        "forward_passes": plan.forward_passes,
        "cost": asdict(plan.cost) if plan.cost is not None else None,
        "seconds": seconds,
        "plan": details,
        "calibration": calibration.describe(),
        "evaluation": {name: w.describe() for name, w in held_out.items()},
        "layershap_version": __version__,
        "versions": versions(),
        "model_fingerprint": model_fp,
    }
    record = _save(model, tokenizer, out, record, quantize, held_out, batch_size)
    write_run_config(out, "prune", {**parameters, "granularity": "sublayer"},
                     _provenance(model_fp, calibration, held_out, backend))
    return record


def estimate_run(model, tokenizer, *, out, settings, model_name: str | None = None, data: str = "c4",
                 samples: int = 8, seq_len: int = 128, batch_size: int = 8, store=None, backend=None,
                 config: dict | None = None, granularity: str = "block") -> dict:
    """Estimate every layer's Shapley value and write `out/shapley.json`, `out/shapley.csv` and
    `out/config.toml` (backend and config as for `prune_model`).

    granularity "sublayer": the players are attn.i and mlp.i (2n); the record then says `granularity`, every
    entry of `layers` has its `name`, and shapley.csv gains a name column."""
    from layershap.estimate.pipeline import estimate
    from layershap.game.backends import use_backend
    from layershap.game.layer_game import LayerGame
    from layershap.game.store import open_store

    out = Path(out)
    calibration = text_windows(data, tokenizer, samples=samples, seq_len=seq_len, seed=settings.seed,
                               split="calibration")
    game = LayerGame(model, calibration, utility=settings.utility, batch_size=batch_size, granularity=granularity)
    with open_store(model, store) as db:
        _check_run_dir(out, db.model_fp)
        with use_backend(backend):
            result = estimate(game, db, settings)
        store_path = str(db.path)
    record = {
        **result.to_dict(),
        "model": model_label(model_name),
        "model_fingerprint": db.model_fp,
        "calibration": calibration.describe(),
        "store": store_path,
        "layershap_version": __version__,
        "versions": versions(),
    }
    if granularity == "sublayer":
        record["granularity"] = granularity
        for entry, name in zip(record["layers"], game.player_names):
            entry["name"] = name
        lines = ["index,name,shapley,stderr"] + [f"{e['index']},{e['name']},{e['shapley']:.8g},{e['stderr']:.8g}"
                                                 for e in record["layers"]]
    else:
        lines = ["index,shapley,stderr"] + [f"{e['index']},{e['shapley']:.8g},{e['stderr']:.8g}"
                                            for e in record["layers"]]
    write_json(out / "shapley.json", record)
    (out / "shapley.csv").write_text("\n".join(lines) + "\n")
    parameters = _run_parameters(model, model_name, settings, config, out=out, data=data, samples=samples,
                                 seq_len=seq_len, batch_size=batch_size, store=store)
    if granularity != "block":
        parameters["granularity"] = granularity
    write_run_config(out, "estimate", parameters, _provenance(db.model_fp, calibration, {}, backend))
    return record


def estimate_dry_run(model, tokenizer, *, settings, data: str = "c4", samples: int = 8, seq_len: int = 128,
                     batch_size: int = 8, store=None, granularity: str = "block") -> dict:
    """How many forward passes an estimate would run and roughly how long; evaluates no mask.

    The time per pass comes from earlier evaluations in the store, or else from one timed full pass.
    """
    from layershap.estimate.budget import mask_share
    from layershap.estimate.pipeline import sample_masks
    from layershap.game.context import measurement_context
    from layershap.game.layer_game import LayerGame
    from layershap.game.store import mask_key, open_store

    n = num_layers(model) * (2 if granularity == "sublayer" else 1)  # the players
    settings.check(n)
    calibration = text_windows(data, tokenizer, samples=samples, seq_len=seq_len, seed=settings.seed,
                               split="calibration")
    game = LayerGame(model, calibration, utility=settings.utility, batch_size=batch_size, granularity=granularity)
    masks = sample_masks(settings, n, num_layers(model))
    with open_store(model, store) as db:
        context = measurement_context(game)
        known = db.get_many(context, masks)
        per_layer_pass = db.mean_seconds_per_block(context)
    todo = [m for m in masks if mask_key(m) not in known]
    if per_layer_pass is None:
        started = time.perf_counter()
        perplexity(model, calibration.tokens, batch_size=batch_size)
        per_layer_pass = (time.perf_counter() - started) / n
    seconds = sum(per_layer_pass * max(int(m.sum()), 1) for m in todo)
    share = mask_share(num_layers(model), settings.budget_unit)
    reference = 1 if todo and game.loss == "kl" else 0  # --utility kl: the dense model's reference pass first
    return {"masks": len(masks), "stored": len(masks) - len(todo), "forward_passes": len(todo) + reference,
            "full_size_passes": float(sum(share(m) for m in masks)),
            "estimated_seconds": seconds + reference * per_layer_pass * n}


def _run_parameters(model, model_name, settings, config, **values) -> dict:
    """What a run directory's config.toml records: the CLI's options, with the values actually used (preset
    and defaults resolved, the dtype the model was loaded in) taking their place."""
    resolved = {"model": model_name, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                **values}
    if settings is not None:
        resolved.update({key: getattr(settings, key) for key in ("budget", "sampler", "surrogate", "utility",
                                                                   "paired", "seed")})
    return {**(config or {}), **{key: value for key, value in resolved.items() if value is not None}}


def _provenance(model_fp: str, calibration, held_out: dict, backend) -> dict:
    return {"model_fingerprint": model_fp, "calibration_fingerprint": calibration.fingerprint(),
            "evaluation_fingerprints": [f"{name}:{w.fingerprint()}" for name, w in held_out.items()] or None,
            "backend": getattr(backend, "name", "local"), "ray_address": getattr(backend, "address", None)}


def _check_run_dir(out: Path, model_fp: str) -> None:
    existing = out / "shapley.json"
    if existing.is_file():
        try:
            previous = read_json(existing).get("model_fingerprint")
        except ValueError:
            previous = None
        if previous not in (None, model_fp):
            raise LayershapError(f"{out} holds an estimate of another model (fingerprint {previous}); "
                                 "give another --out")
