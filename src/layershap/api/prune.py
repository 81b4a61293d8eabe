"""`prune`: one settings value in, then the stages in the order the data flows through them.

    check    -> plan request (plan/choose.py) and output (transform/write.py), before any forward pass
    windows  -> calibration and held-out token windows (data/)
    choose   -> Plan: a method, the sublayer game, or an earlier run's plan (plan/choose.py)
    rejudge  -> with a repair, the search's finalists judged after it (transform/repair_choice.py)
    repair   -> a training-free correction per removed run, fitted for the plan (transform/repair.py)
    remove   -> the model without the plan's blocks or sublayers, the repair folded into its weights
    evaluate -> held-out perplexity before and after
    quantize -> optional torchao weights, measured again
    write    -> a save_pretrained directory or a GGUF, with layershap.json and config.toml

Each stage is a function from plain values to plain values, so a new stage is one line here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from layershap import __version__
from layershap.api.run import provenance, run_parameters
from layershap.config import versions, write_run_config
from layershap.data.windows import TextWindows, text_windows, windows_apart
from layershap.game.nll import perplexities_of
from layershap.models.load import model_label
from layershap.models.stream import check_streamed
from layershap.plan.choose import PlanRequest, apply_plan, choose_plan, plan_request
from layershap.plan.methods.base import Plan
from layershap.transform.write import output_for, write_output


@dataclass
class PruneSettings:
    """Everything `prune` needs besides the model: the command line's options, resolved.

    ratio: the fraction of blocks to remove (sublayer granularity: the share of the blocks' parameters);
        None with `plan_file`, whose blocks are removed without choosing again.
    out, out_format: a directory, or a .gguf file (`out_format` "gguf", or None/"auto" and a .gguf name).
    estimate: the Shapley method's `EstimateSettings` (budget, sampler, ... and `confirm`); store: its
        evaluation store.
    repair, repair_samples: the recipe (`transform/repair.py`; auto: the default recipe where it folds
        exactly, none elsewhere) and how many calibration windows it is fitted
        on, drawn from the calibration text apart from the windows the choice used; repair_choice: judge the
        search's finalists after the repair and keep the best repaired one.
    config: the options as the CLI resolved them, written with provenance to config.toml.
    """

    out: Path
    ratio: float | None = None
    method: str = "shapley"
    protect: list[int] = field(default_factory=list)
    model_name: str | None = None
    data: str = "c4"
    samples: int = 8
    seq_len: int = 128
    seed: int = 0
    eval_data: list[str] = field(default_factory=lambda: ["wiki"])
    eval_samples: int = 16
    eval_seq_len: int = 256
    batch_size: int = 8
    granularity: str = "block"
    plan_file: Path | None = None
    out_format: str | None = None
    quantize: str | None = None
    repair: str = "auto"
    repair_samples: int = 32
    repair_choice: bool = True
    estimate: object = None
    store: str | None = None
    config: dict | None = None


@dataclass(frozen=True)
class PruneWindows:
    """calibration: what the method chooses on; held_out: per evaluation text; confirmation: fresh calibration
    windows for --confirm (None without it); repair: the windows the repair is fitted on (None without one)."""

    calibration: TextWindows
    held_out: dict[str, TextWindows]
    confirmation: TextWindows | None = None
    repair: TextWindows | None = None


def prune_model(model, tokenizer, settings: PruneSettings, *, backend=None) -> dict:
    """Choose blocks on calibration text, remove them, save, and return the record written beside the model
    (`layershap.json`: held-out perplexity before and after, what choosing cost, provenance).

    backend: where masked evaluations run (`layershap.game.backends`; None: this process).
    """
    from layershap.game.backends import use_backend
    from layershap.game.context import model_fingerprint

    recipe, repair_note = check_repair(model, settings)
    check_streamed(model, granularity=settings.granularity, quantize=settings.quantize, repair=recipe)
    request = check_plan(model, settings)
    output = output_for(settings.out, settings.out_format, model_name=settings.model_name, model=model,
                        quantize=settings.quantize, granularity=settings.granularity)
    windows = prune_windows(tokenizer, settings, request, recipe)
    before = perplexities_of(model, windows.held_out, batch_size=settings.batch_size)
    model_fp = model_fingerprint(model)  # of the model as given, for the run's provenance
    parameters = run_config(model, settings, request)  # the dtype it ran in, before anything changes it
    with use_backend(backend):
        plan = choose_plan(model, windows.calibration, request, confirmation=windows.confirmation)
    if request.saved is None:  # a plan given with --plan is removed as it is
        plan = rejudge_for_repair(model, plan, windows.calibration, recipe, settings)
    repair = fit_repair(model, plan.remove, windows.repair, recipe, batch_size=settings.batch_size)
    apply_plan(model, plan, request.granularity)
    fold_repair(model, repair)
    after = perplexities_of(model, windows.held_out, batch_size=settings.batch_size)
    record = prune_record(model, settings, request, plan, windows, before, after, model_fp)
    if repair is not None:
        record["repair"] = repair.describe()
    elif repair_note is not None:
        record["repair"] = {"recipe": "none", "note": repair_note}
    if settings.quantize is not None:
        record["quantization"] = quantize_measured(model, settings.quantize, windows, settings.batch_size)
    record = write_output(model, tokenizer, record, output, repair)
    write_run_config(output.path, "prune", parameters,
                     provenance(model_fp, windows.calibration, windows.held_out, backend), path=output.config_path)
    return record


def check_plan(model, settings: PruneSettings) -> PlanRequest:
    return plan_request(model, method=settings.method, ratio=settings.ratio, protect=settings.protect,
                        granularity=settings.granularity, plan_file=settings.plan_file, seed=settings.seed,
                        batch_size=settings.batch_size, settings=settings.estimate, store=settings.store)


def check_repair(model, settings: PruneSettings) -> tuple[str, str | None]:
    """The repair recipe's name (`auto` resolved, with why it means none where it does), refused in one line
    where it cannot be folded into this model (every recipe can also be written into a GGUF:
    `transform/gguf_repair.py`)."""
    from layershap.models.stream import streamer_of
    from layershap.transform.repair import check_repairable, resolve_repair

    name, note = resolve_repair(model, settings.repair, settings.granularity,
                                streamed=streamer_of(model) is not None)
    return check_repairable(model, name, settings.granularity).name, note


def rejudge_for_repair(model, plan: Plan, calibration: TextWindows, recipe: str, settings: PruneSettings) -> Plan:
    """With a repair and `repair_choice`, the finalist that is best after repair (the plan as it is otherwise)."""
    if recipe == "none" or not settings.repair_choice:
        return plan
    from layershap.transform.repair_choice import choose_for_repair

    return choose_for_repair(model, plan, calibration, recipe, batch_size=settings.batch_size)


def fit_repair(model, removed, windows: TextWindows | None, recipe: str, *, batch_size: int):
    """The repair fitted for removing `removed` from the dense model (None without one)."""
    if windows is None:
        return None
    from layershap.transform.repair import fit_repair as fit

    repair = fit(model, removed, windows.tokens, recipe, batch_size=batch_size)
    repair.calibration = windows.describe()
    return repair


def fold_repair(model, repair) -> None:
    if repair is not None:
        from layershap.transform.repair import fold_repair as fold

        fold(model, repair)


def prune_windows(tokenizer, settings: PruneSettings, request: PlanRequest, recipe: str = "none") -> PruneWindows:
    """The calibration windows (calibration half of `data`), the held-out windows of every evaluation text
    (their evaluation halves), for the Shapley method with --confirm the fresh windows it confirms on, and
    for a repair the windows it is fitted on: more than the choice needs (a d x d map has d^2 unknowns),
    from the same calibration half but apart from the choice's windows, so that the repair is not fitted
    to the very tokens the plan was picked on."""
    calibration = text_windows(settings.data, tokenizer, samples=settings.samples, seq_len=settings.seq_len,
                               seed=settings.seed, split="calibration")
    held_out = {name: text_windows(name, tokenizer, samples=settings.eval_samples, seq_len=settings.eval_seq_len,
                                   seed=settings.seed, split="evaluation") for name in settings.eval_data}
    confirmation = None
    confirm = getattr(settings.estimate, "confirm", 0)
    if request.method == "shapley" and request.saved is None and confirm > 0:
        from layershap.plan.confirm import confirmation_windows

        confirmation = confirmation_windows(settings.data, tokenizer, calibration, confirm)
    repair = None
    if recipe != "none":  # fewer where the text has no room for them; the choice's own windows where none fits
        repair = windows_apart(settings.data, tokenizer, calibration, settings.repair_samples) or calibration
    return PruneWindows(calibration, held_out, confirmation, repair)


def prune_record(model, settings: PruneSettings, request: PlanRequest, plan: Plan, windows: PruneWindows,
                 before: dict, after: dict, model_fp: str) -> dict:
    """What `layershap.json` says: what was removed, by which method, what it cost and did, and provenance."""
    record = {"model": model_label(settings.model_name), "model_type": model.config.model_type,
              "n_layers": request.n_layers, **_removed(plan, request.granularity),
              "method": request.method, "ratio": request.ratio, "protect": request.protect,
              "ppl_before": before, "ppl_after": after, "forward_passes": plan.forward_passes,
              "cost": asdict(plan.cost) if plan.cost is not None else None, "seconds": plan.seconds}
    if request.granularity == "block":
        record["scores"] = plan.scores
    record.update({"plan": plan.details, "calibration": windows.calibration.describe(),
                   "evaluation": {name: w.describe() for name, w in windows.held_out.items()},
                   "layershap_version": __version__, "versions": versions(), "model_fingerprint": model_fp})
    if request.saved is not None:
        record["plan_file"] = str(request.saved["plan_file"])
    return record


def _removed(plan: Plan, granularity: str) -> dict:
    if granularity == "block":
        return {"removed": plan.remove, "kept": plan.kept}
    details = plan.details
    return {"granularity": "sublayer", "removed": details["removed_sublayers"],
            **{key: details[key] for key in ("removed_sublayers", "parameters_removed",
                                             "parameter_fraction_removed", "kv_cache_fraction_removed")}}


def quantize_measured(model, scheme: str, windows: PruneWindows, batch_size: int) -> dict:
    """Quantize the pruned model in place (torchao) and measure its held-out perplexity again; the write stage
    adds the scheme, config and sizes."""
    from layershap.transform.quantize import quantize_model

    quantize_model(model, scheme)
    return {"ppl": perplexities_of(model, windows.held_out, batch_size=batch_size)}


def run_config(model, settings: PruneSettings, request: PlanRequest) -> dict:
    """config.toml's parameters: the CLI's options, with the values the run actually used."""
    values = run_parameters(model, settings.model_name, settings.estimate, settings.config, out=settings.out,
                            ratio=request.ratio, method=request.method, protect=request.protect,
                            data=settings.data, samples=settings.samples, seq_len=settings.seq_len,
                            seed=settings.seed, eval_data=list(settings.eval_data),
                            eval_samples=settings.eval_samples, eval_seq_len=settings.eval_seq_len,
                            batch_size=settings.batch_size, store=settings.store)
    if request.granularity == "sublayer":
        values["granularity"] = "sublayer"
    return values


__all__ = ["PruneSettings", "PruneWindows", "prune_model"]
