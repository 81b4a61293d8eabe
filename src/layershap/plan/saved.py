"""A plan saved by an earlier prune, read back for `prune --plan`: the blocks it removed, checked against the
model it is applied to, so a plan made for another model or granularity is refused in one line."""

from __future__ import annotations

from pathlib import Path

from layershap.errors import LayershapError
from layershap.io import gguf_sidecar, read_json
from layershap.models.layers import normalise_layer_list


def read_plan(path, model, n: int, ratio: float | None = None) -> dict:
    """The record of an earlier prune (`layershap.json`, a run directory holding one, or a GGUF run's
    `<stem>.layershap.json`), checked against the model it is applied to."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "layershap.json"
    elif path.suffix.lower() == ".gguf":
        path = gguf_sidecar(path, "layershap.json")
    if not path.is_file():
        raise LayershapError(f"plan {path} does not exist; give the layershap.json of an earlier prune")
    try:
        record = read_json(path)
    except ValueError as exc:
        raise LayershapError(f"plan {path} is not valid JSON ({exc})") from None
    if record.get("granularity") == "sublayer":
        raise LayershapError(f"plan {path} removes sublayers; --plan takes a plan of whole blocks")
    removed = record.get("removed")
    if not isinstance(removed, list) or not all(isinstance(i, int) for i in removed):
        raise LayershapError(f"plan {path} has no list of removed blocks; give the layershap.json of a prune")
    planned = record.get("n_layers")
    if planned != n:
        raise LayershapError(f"plan {path} was made for a model of {planned} blocks; this model has {n}")
    if record.get("model_type") not in (None, model.config.model_type):
        raise LayershapError(f"plan {path} was made for a {record['model_type']} model; this one is "
                             f"{model.config.model_type}")
    removed = normalise_layer_list(removed, n)
    if not removed or len(removed) >= n:
        raise LayershapError(f"plan {path} removes {len(removed)} of {n} blocks; a plan must remove some but "
                             "not all")
    if ratio is not None and round(ratio * n) != len(removed):
        raise LayershapError(f"--ratio {ratio} removes {round(ratio * n)} blocks but plan {path} removes "
                             f"{len(removed)}; drop --ratio (the plan decides)")
    return {**record, "removed": removed, "plan_file": path}


def plan_from_record(record: dict, n: int):
    from layershap.plan.methods.base import Plan

    return Plan(method=str(record.get("method", "plan")), n_layers=n, remove=record["removed"],
                scores=record.get("scores"), forward_passes=int(record.get("forward_passes") or 0),
                details={**(record.get("plan") or {}), "from_plan_file": str(record["plan_file"])})
