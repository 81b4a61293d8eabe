"""Compare pruning methods side by side: per method and ratio, the removed blocks, held-out perplexity on every
evaluation text, zero-shot accuracy (when asked for), and what choosing the blocks cost.

Every method chooses on the same calibration windows (the calibration half of `data`) and on the unmodified
model; every plan is measured on the same held-out windows (the evaluation half of each eval text, so never
the calibration windows, even when both come from the same text) with the chosen blocks skipped, which gives
exactly the perplexity of the model with those blocks removed. The dense model is the first row (ratio 0).

`compare_methods` returns the record written to `compare.json`; `compare_output.write_compare` writes it as
`compare.json`, `compare.csv`, `compare.md` and `compare.png` (perplexity against ratio, one line per method).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from copy import deepcopy
from dataclasses import asdict, replace

import numpy as np

from layershap import __version__
from layershap.data.windows import mixture_texts, text_windows
from layershap.errors import LayershapError
from layershap.evaluate.compare_output import DENSE, write_compare
from layershap.game.nll import perplexities_of
from layershap.models.layers import block_list, keep_only, normalise_layer_list, num_layers, prune_layers
from layershap.models.load import model_label
from layershap.plan.methods import get_method, select_layers
from layershap.plan.ratio import check_ratio, layers_to_remove


def check_methods(methods: Sequence[str], granularity: str = "block") -> list[str]:
    """The method names, each registered and none twice (a LayershapError naming the valid ones otherwise).
    With granularity "sublayer" the sublayer methods (`plan.sublayer.SUBLAYER_METHODS`) are valid too."""
    methods = list(methods)
    if not methods:
        raise LayershapError("no methods given; use `layershap methods` to list them")
    for name in methods:
        if granularity == "sublayer":
            from layershap.plan.sublayer import SUBLAYER_METHODS

            if name in SUBLAYER_METHODS:
                continue
        get_method(name)
    if len(set(methods)) != len(methods):
        raise LayershapError(f"a method is listed twice in {', '.join(methods)}")
    from layershap.plan.methods.shapiq_estimators import ESTIMATORS, import_shapiq

    if set(methods) & set(ESTIMATORS):
        import_shapiq()  # fails before any work when shapiq is missing; its import is no method's cost
    return methods


def check_ratios(ratios: Sequence[float]) -> list[float]:
    ratios = [float(r) for r in ratios]
    if not ratios:
        raise LayershapError("no ratios given; use e.g. --ratios 0.2,0.35")
    for r in ratios:
        check_ratio(r)
    if len(set(ratios)) != len(ratios):
        raise LayershapError(f"a ratio is listed twice in {ratios}")
    return ratios


def check_tasks(tasks: Sequence[str] | None, limit: int | None, offline: bool | None = None) -> list[str] | None:
    """Zero-shot task names and --limit, checked (names, and offline data where it is used) before any work."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise LayershapError(f"--limit must be a positive integer; got {limit}")
    if tasks is None:
        return None
    from layershap.evaluate import zeroshot

    zeroshot._plan(list(tasks), offline)  # unknown or duplicate names, missing offline data
    return list(tasks)


def check_gradients(model, methods: Sequence[str]) -> None:
    """Refuse up front what the taylor method would refuse after the cheaper methods had run."""
    if "taylor" not in methods:
        return
    import torch

    for p in block_list(model).parameters():
        if not p.is_floating_point():
            raise LayershapError(f"taylor needs gradients but a block holds {p.dtype} parameters (a quantized "
                                 "model); drop taylor from --methods")
        if p.device.type == "cpu" and p.dtype in (torch.float16, torch.bfloat16):
            raise LayershapError(f"taylor needs gradients and the model is in {p.dtype} on the CPU; load the "
                                 "model with --dtype float32 or drop taylor from --methods")


def check_budgets(methods: Sequence[str], settings, n_layers: int) -> None:
    """Refuse up front a budget that the shapley method or a shapiq estimator would refuse later."""
    from layershap.plan.methods.shapiq_estimators import DEFAULT_BUDGET, ESTIMATORS

    if settings is not None and "shapley" in methods:
        settings.check(n_layers)
    budget = settings.budget if settings is not None else DEFAULT_BUDGET
    shapiq_methods = [m for m in methods if m in ESTIMATORS]
    if shapiq_methods and budget < n_layers + 1:
        raise LayershapError(f"--budget {budget} is too small for {', '.join(shapiq_methods)} on {n_layers} "
                             f"blocks: they need at least {n_layers + 1} evaluations")


def compare_methods(model, tokenizer, *, methods: Sequence[str], ratios: Sequence[float], data: str = "c4",
                    samples: int = 8, seq_len: int = 128, eval_data: Sequence[str] = ("wiki",),
                    eval_samples: int = 16, eval_seq_len: int = 256, seed: int = 0, batch_size: int = 8,
                    tasks: Sequence[str] | None = None, limit: int | None = None, settings=None, store=None,
                    offline: bool | None = None, protect: Sequence[int] = (), model_name: str | None = None,
                    out=None, quantize: Sequence[str] = (), granularity: str = "block",
                    repairs: Sequence[str] = (), repair_samples: int = 32,
                    log: Callable[[str], None] | None = None) -> dict:
    """Run every method at every ratio on `model` (left unmodified) and measure each plan.

    settings: an `EstimateSettings` for the shapley method (its `target_removed` is set per ratio) and the
    budget of the shapiq estimators. offline: passed to `zero_shot` (None: offline data when installed). out: when given, the result is written there after every row (see
    `write_compare`), so an interrupted comparison keeps what it had measured. log: called with one line per
    finished row. quantize: torchao schemes (int8, int4); every plan, and the dense model, is then also
    measured pruned and quantized, as rows named `METHOD+SCHEME` with `weight_bytes`. repairs: recipes of
    `transform/repair.py`; every plan is then also measured repaired, as rows named `METHOD+repair:RECIPE` with
    the repair's fit (`repair`), fitted on `repair_samples` calibration windows apart from the choice's.

    Returns {"rows": [...], ...}: the dense row first (method "dense", ratio 0), then one row per method and
    ratio with `method`, `ratio`, `k`, `removed`, `kept`, `ppl` ({eval text: perplexity}), `forward_passes`
    and `cost` (what choosing the blocks used and what this run paid, in passes and token-passes, see
    `plan.methods.base.Cost`: the used figures are the same on a cold and a warm store) and `seconds`
    (spent choosing the blocks), `scores`, `details`, and with tasks `zero_shot` and
    `zero_shot_average`.

    granularity: "block", or "sublayer": each ratio is then a share of the decoder blocks' parameters; a
    sublayer method (`plan.sublayer.SUBLAYER_METHODS`; `shapley` is the sublayer game's plan) removes attention
    and MLP sublayers whose parameters reach it, and a block method removes the fewest blocks whose parameters
    reach it. Rows then say `granularity`, `parameter_fraction_removed` and `kv_cache_fraction_removed`, name
    removed sublayers as `attn.i` / `mlp.i`, and `shapley` adds a `shapley-block` row: the block plan the
    sublayer plan was seeded with (its passes are part of the sublayer plan's).
    """
    from layershap.game.layer_game import check_granularity

    check_granularity(granularity)
    methods = check_methods(methods, granularity)
    if granularity == "sublayer":
        from layershap.models.sublayers import check_sublayers

        check_sublayers(model)
        if quantize:
            raise LayershapError("--quantize with --granularity sublayer is not supported yet")
        from layershap.estimate.pipeline import check_sublayer_plan_utility

        check_sublayer_plan_utility(settings)
    ratios = check_ratios(ratios)
    tasks = check_tasks(tasks, limit, offline)
    eval_data = list(dict.fromkeys(eval_data))
    if not eval_data:
        raise LayershapError("no evaluation texts given; use e.g. --eval-data wiki")
    n = num_layers(model)
    if granularity == "sublayer":
        from layershap.plan.sublayer import blocks_for_parameter_ratio

        ks = {r: blocks_for_parameter_ratio(r, n) for r in ratios}
    else:
        ks = {r: layers_to_remove(r, n) for r in ratios}
    protected = normalise_layer_list(protect, n)
    if n - len(protected) < max(ks.values()):
        raise LayershapError(f"--protect keeps {len(protected)} of {n} blocks, leaving {n - len(protected)} to "
                             f"choose {max(ks.values())} from; protect fewer blocks or lower --ratios")
    check_gradients(model, methods)
    check_budgets([m for m in methods if granularity == "block" or m != "shapley"], settings, n)
    repairs = [r for r in dict.fromkeys(repairs) if r != "none"]
    if repairs:
        from layershap.transform.repair import check_repairable, resolve_repair

        if granularity != "block":
            raise LayershapError("--repair with --granularity sublayer is not supported; compare block plans")
        # auto as prune means it (rows are named by the recipe that ran)
        repairs = [r for r in dict.fromkeys(resolve_repair(model, r)[0] for r in repairs) if r != "none"]
        for recipe in repairs:
            check_repairable(model, recipe)
    quantize = list(dict.fromkeys(quantize))
    if quantize:
        from layershap.transform.quantize import check_quantizable

        for scheme in quantize:
            check_quantizable(model, scheme)

    calibration = text_windows(data, tokenizer, samples=samples, seq_len=seq_len, seed=seed, split="calibration")
    fresh = None
    if "shapley" in methods and settings is not None and settings.confirm > 0:
        from layershap.plan.confirm import confirmation_windows

        fresh = confirmation_windows(data, tokenizer, calibration, settings.confirm)
    held_out = {name: text_windows(name, tokenizer, samples=eval_samples, seq_len=eval_seq_len, seed=seed,
                                   split="evaluation") for name in eval_data}
    repair_windows = None
    if repairs:
        from layershap.data.windows import windows_apart

        repair_windows = windows_apart(data, tokenizer, calibration, repair_samples) or calibration

    started = time.perf_counter()
    record = {
        "model": model_label(model_name),
        "model_type": model.config.model_type,
        "n_layers": n,
        "methods": methods,
        "ratios": ratios,
        **({"granularity": granularity} if granularity != "block" else {}),
        "protect": protected,
        "seed": seed,
        "calibration": calibration.describe(),
        "evaluation": {name: {**w.describe(), "same_text_as_calibration": name in mixture_texts(data)}
                       for name, w in held_out.items()},
        "tasks": tasks,
        "limit": limit,
        "settings": asdict(settings) if settings is not None else None,
        "rows": [],
        "seconds": 0.0,
        "layershap_version": __version__,
    }

    def measure(mask, target=model, context=None) -> dict:
        """Held-out perplexity (and zero-shot) of `target` with only `mask`'s blocks, or under `context`."""
        row: dict = {}
        if granularity == "sublayer":
            from layershap.models.sublayers import keep as keeping  # block masks too
        else:
            keeping = keep_only
        with context if context is not None else keeping(target, mask):
            row["ppl"] = perplexities_of(target, held_out, batch_size=batch_size)
            if tasks:
                from layershap.evaluate.zeroshot import zero_shot

                scores = zero_shot(target, tokenizer, tasks, limit=limit, batch_size=batch_size, seed=seed,
                                   offline=offline)
                row["zero_shot"] = scores
                row["zero_shot_average"] = scores["average"]
        return row

    def add_quantized(row: dict) -> None:
        """The same plan removed for good from a copy of the model, then quantized with each scheme."""
        from layershap.transform.quantize import quantize_model, weight_bytes

        for scheme in quantize:
            copy = prune_layers(deepcopy(model), row["removed"])
            quantize_model(copy, scheme)
            add({**row, "method": f"{row['method']}+{scheme}", "quantization": scheme,
                 **measure(np.ones(len(row["kept"]), dtype=bool), copy), "weight_bytes": weight_bytes(copy)})
            del copy

    def add_repaired(row: dict) -> None:
        """The same plan with each repair fitted for it and hooked in (`transform/repair.py`)."""
        from layershap.transform.repair import fit_repair, repaired

        for recipe in repairs:
            fitted = time.perf_counter()
            repair = fit_repair(model, row["removed"], repair_windows.tokens, recipe, batch_size=batch_size)
            repair.seconds = time.perf_counter() - fitted
            repair.calibration = repair_windows.describe()
            add({**row, "method": f"{row['method']}+repair:{recipe}", "repair": repair.describe(),
                 **measure(None, context=repaired(model, row["removed"], repair))})

    def add(row: dict) -> None:
        record["rows"].append(row)
        record["seconds"] = time.perf_counter() - started
        if out is not None:
            write_compare(record, out, plot=False)
        if log is not None:
            ppl = ", ".join(f"{name} {value:.3f}" for name, value in row["ppl"].items())
            log(f"{row['method']} at ratio {row['ratio']}: removed {row['removed']}; perplexity {ppl}")

    full = np.ones(n, dtype=bool)
    dense = {"method": DENSE, "ratio": 0.0, "k": 0, "removed": [], "kept": list(range(n)), **measure(full),
             "forward_passes": 0, "cost": None, "seconds": 0.0, "scores": None, "details": {}}
    add(dense)
    add_quantized(dense)
    for method in methods:
        for ratio in ratios:
            if granularity == "sublayer":
                for row in _sublayer_rows(model, calibration, method, ratio, ks[ratio], measure, protect=protected,
                                          seed=seed, batch_size=batch_size, store=store, settings=settings):
                    add(row)
                continue
            k = ks[ratio]
            options = {"protect": protected, "seed": seed, "batch_size": batch_size, "store": store}
            if settings is not None:
                options["settings"] = replace(settings, target_removed=k)
            if method == "shapley" and fresh is not None:
                options["confirmation_windows"] = fresh
            chosen = time.perf_counter()
            plan = select_layers(method, model, calibration, k, **options)
            seconds = time.perf_counter() - chosen
            mask = full.copy()
            mask[plan.remove] = False
            row = {"method": method, "ratio": ratio, "k": k, "removed": list(plan.remove), "kept": plan.kept,
                   **measure(mask), "forward_passes": plan.forward_passes,
                   "cost": asdict(plan.cost) if plan.cost is not None else None, "seconds": seconds,
                   "scores": plan.scores, "details": plan.details}
            add(row)
            add_quantized(row)
            add_repaired(row)
    if out is not None:
        write_compare(record, out)
    return record


def _sublayer_rows(model, calibration, method: str, ratio: float, k_block: int, measure, **options) -> list[dict]:
    """`compare --granularity sublayer`: the rows of one method at one parameter ratio."""
    from layershap.plan.methods._sublayers import sublayer_record
    from layershap.plan.sublayer import SUBLAYER_METHODS, select_sublayers, sublayer_mask_of_blocks

    n = num_layers(model)
    chosen = time.perf_counter()
    if method not in SUBLAYER_METHODS:
        settings = options.pop("settings")
        if settings is not None:
            options["settings"] = replace(settings, target_removed=k_block)
        plan = select_layers(method, model, calibration, k_block, **options)
        mask = sublayer_mask_of_blocks(n, plan.remove)
        return [{"method": method, "granularity": "block", "ratio": ratio, "k": k_block,
                 "removed": list(plan.remove), "kept": plan.kept, **_fractions(sublayer_record(model, mask)),
                 **measure(mask), "forward_passes": plan.forward_passes, "cost": _cost(plan),
                 "seconds": time.perf_counter() - chosen,
                 "scores": plan.scores, "details": plan.details}]
    plan = select_sublayers(method, model, calibration, ratio, **options)
    seconds = time.perf_counter() - chosen
    mask = np.ones(2 * n, dtype=bool)
    mask[plan.remove] = False
    record = sublayer_record(model, mask)
    rows = [{"method": method, "granularity": "sublayer", "ratio": ratio, "k": len(plan.remove),
             "removed": record["removed_sublayers"], "kept": [j for j in range(2 * n) if mask[j]],
             **_fractions(record), **measure(mask), "forward_passes": plan.forward_passes, "cost": _cost(plan),
             "seconds": seconds,
             "scores": plan.scores, "details": plan.details}]
    block = plan.details.get("block_plan")
    if block is not None:
        block_mask = sublayer_mask_of_blocks(n, block["removed"])
        rows.append({"method": f"{method}-block", "granularity": "block", "ratio": ratio, "k": len(block["removed"]),
                     "removed": list(block["removed"]), "kept": [i for i in range(n) if i not in block["removed"]],
                     **_fractions(sublayer_record(model, block_mask)), **measure(block_mask),
                     "forward_passes": block["forward_passes"], "cost": block.get("cost"), "seconds": 0.0,
                     "scores": None,
                     "details": {"seed_of": method, "measured_calibration_ppl": block["measured_calibration_ppl"]}})
    return rows


def _cost(plan) -> dict | None:
    return asdict(plan.cost) if plan.cost is not None else None


def _fractions(record: dict) -> dict:
    return {key: record[key] for key in ("parameter_fraction_removed", "kv_cache_fraction_removed")}
