"""Read a run directory (estimate, prune or compare) into what the report shows; all the report's data
handling lives here, so the figures and the page only draw and lay out."""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from layershap.config import CONFIG_FILE, PROVENANCE_TABLE
from layershap.errors import LayershapError

RUN_FILES = {"compare": "compare.json", "prune": "layershap.json", "estimate": "shapley.json"}
HOLDOUT_KEY = "holdout"  # RUN/shapley.json: surrogate.holdout = [{"measured": u, "predicted": u}, ...]


@dataclass
class LayerValues:
    label: str  # e.g. "Shapley value (neg_nll utility)"
    values: list[float]
    stderr: list[float] | None
    removed: list[int]
    source: str  # where in the run the values come from


@dataclass
class SurrogateFit:
    name: str
    utility: str
    metrics: dict
    measured: list[float]
    predicted: list[float]


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class RunData:
    kind: str
    directory: Path
    model: str
    n_layers: int | None
    layer_values: LayerValues | None = None
    plans: list[tuple[str, list[int]]] = field(default_factory=list)
    surrogate: SurrogateFit | None = None
    ppl: dict[str, dict[str, list[tuple[float, float]]]] = field(default_factory=dict)
    table: Table | None = None
    table_title: str = ""
    commands: list[tuple[str, str]] = field(default_factory=list)  # (what it is, command)
    versions: dict[str, str] = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    config_text: str | None = None
    notes: dict[str, str] = field(default_factory=dict)  # section -> why it is missing or partial


def run_kind(directory: Path) -> str:
    directory = Path(directory)
    if not directory.exists():
        raise LayershapError(f"run directory {directory} does not exist; give the --out directory of an estimate, "
                             "prune or compare run")
    if not directory.is_dir():
        raise LayershapError(f"{directory} is not a directory; give the --out directory of an estimate, prune or "
                             "compare run")
    for kind, name in RUN_FILES.items():
        if (directory / name).is_file():
            return kind
    raise LayershapError(f"{directory} is not a layershap run directory (no {', '.join(RUN_FILES.values())}); "
                         "give the --out directory of an estimate, prune or compare run")


def load_run(directory) -> RunData:
    directory = Path(directory)
    kind = run_kind(directory)
    path = directory / RUN_FILES[kind]
    try:
        record = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise LayershapError(f"{path} is not valid JSON ({exc}); was the run interrupted while writing?") from None
    if not isinstance(record, dict):
        raise LayershapError(f"{path} does not hold a layershap record")
    try:
        data = {"estimate": _estimate, "prune": _prune, "compare": _compare}[kind](directory, record)
    except (KeyError, TypeError, IndexError) as exc:
        missing = f"no {exc} key" if isinstance(exc, KeyError) else f"{type(exc).__name__}: {exc}"
        raise LayershapError(f"{path} is not a complete {kind} record ({missing}); was it written by another "
                             "layershap version?") from None
    _add_provenance(data, record)
    return data


# --- per kind ------------------------------------------------------------------------------------------------


def _estimate(directory: Path, record: dict) -> RunData:
    data = RunData("estimate", directory, record.get("model", "?"), record["n_layers"])
    k = (record.get("settings") or {}).get("target_removed")
    data.layer_values = _shapley_values(record, k, "shapley.json")
    if k:
        data.plans = [(f"lowest {k} Shapley values", data.layer_values.removed)]
    else:
        data.notes["depth"] = "this estimate has no target number of removed blocks to draw"
    data.surrogate = _surrogate(record, data.notes)
    data.notes["ppl"] = ("an estimate measures no held-out perplexity; run `layershap report` on a prune or "
                         "compare directory for perplexity against ratio")
    data.table_title = "Layers by Shapley value"
    order = sorted(range(len(data.layer_values.values)), key=lambda i: data.layer_values.values[i])
    rank = {layer: position + 1 for position, layer in enumerate(order)}
    data.table = Table(["layer", "Shapley value", "std. error", "rank (1 = least valuable)"],
                       [[str(i), _num(v, 6), _num(s, 3), str(rank[i])] for i, (v, s) in
                        enumerate(zip(data.layer_values.values, data.layer_values.stderr or []))])
    return data


def _prune(directory: Path, record: dict) -> RunData:
    n = record["n_layers"]
    data = RunData("prune", directory, record.get("model", "?"), n)
    removed = list(record["removed"])
    method, ratio = record["method"], record["ratio"]
    estimate = (record.get("plan") or {}).get("estimate")
    if estimate:
        data.layer_values = _shapley_values(estimate, None, "layershap.json plan.estimate", removed=removed)
        data.surrogate = _surrogate(estimate, data.notes)
    else:
        _method_scores(data, record.get("scores"), method, removed)
        data.notes["surrogate"] = f"the {method} method fits no surrogate"
    data.plans = [(f"{method} at {ratio:g}", removed)]
    before, after = record.get("ppl_before") or {}, record.get("ppl_after") or {}
    data.ppl = {text: {method: [(0.0, before[text]), (ratio, after[text])]} for text in after if text in before}
    texts = list(after)
    data.table_title = "Plan"
    data.table = Table(["method", "ratio", "removed", *[f"ppl {t} (before → after)" for t in texts],
                        "forward passes", "seconds"],
                       [[method, f"{ratio:g}", _layers(removed),
                         *[f"{_num(before.get(t), 4)} → {_num(after[t], 4)}" for t in texts],
                         str(record.get("forward_passes", "")), _num(record.get("seconds"), 3)]])
    return data


def _compare(directory: Path, record: dict) -> RunData:
    rows = record["rows"]
    n = record.get("n_layers") or (max((max(r.get("kept") or [0]) for r in rows), default=0) + 1)
    data = RunData("compare", directory, record.get("model", "?"), n)
    plans = [row for row in rows if row.get("removed")]
    data.plans = [(f"{row['method']} at {row['ratio']:g}", list(row["removed"])) for row in plans]
    if not plans:
        data.notes["depth"] = "no row of this comparison removes a block"
    with_estimate = [row for row in rows if (row.get("details") or {}).get("estimate")]
    if with_estimate:
        row = with_estimate[0]
        data.layer_values = _shapley_values(row["details"]["estimate"], None,
                                            f"compare.json, {row['method']} at ratio {row['ratio']:g}",
                                            removed=list(row["removed"]))
        data.surrogate = _surrogate(row["details"]["estimate"], data.notes)
        if len(with_estimate) > 1:
            data.notes["shapley"] = (f"{len(with_estimate)} rows hold an estimate; shown: the first "
                                     f"({row['method']} at ratio {row['ratio']:g})")
    else:
        scored = next((row for row in rows if row.get("scores")), None)
        if scored is not None:
            _method_scores(data, scored["scores"], scored["method"], list(scored["removed"]))
        else:
            data.notes["shapley"] = "no method in this comparison scored the layers"
        data.notes["surrogate"] = "no method in this comparison fitted a surrogate"
    texts = list(rows[0]["ppl"]) if rows else []
    dense = next((row for row in rows if row["method"] == "dense"), None)
    for text in texts:
        per_method: dict[str, list[tuple[float, float]]] = {}
        for row in rows:
            if row["method"] == "dense":
                continue
            points = per_method.setdefault(row["method"], [] if dense is None else [(0.0, dense["ppl"][text])])
            points.append((float(row["ratio"]), float(row["ppl"][text])))
        data.ppl[text] = per_method
    if not rows:
        data.notes["ppl"] = "compare.json has no rows yet"
    zero = any("zero_shot_average" in row for row in rows)
    header = ["method", "ratio", "removed", *[f"ppl {t}" for t in texts]]
    header += ["zero-shot avg"] * zero + ["forward passes", "seconds"]
    table_rows = []
    for row in rows:
        cells = [row["method"], f"{row['ratio']:g}", _layers(row.get("removed") or []),
                 *[_num(row["ppl"][t], 4) for t in texts]]
        if zero:
            cells.append(_num(row.get("zero_shot_average"), 4))
        cells += [str(row.get("forward_passes", "")), _num(row.get("seconds"), 3)]
        table_rows.append(cells)
    data.table_title = "Comparison"
    data.table = Table(header, table_rows)
    return data


# --- pieces --------------------------------------------------------------------------------------------------


def _shapley_values(estimate: dict, k: int | None, source: str, removed: list[int] | None = None) -> LayerValues:
    layers = sorted(estimate["layers"], key=lambda e: e["index"])
    values = [float(e["shapley"]) for e in layers]
    stderr = [float(e.get("stderr", 0.0)) for e in layers]
    if removed is None:
        removed = sorted(sorted(range(len(values)), key=lambda i: values[i])[:k]) if k else []
    utility = (estimate.get("settings") or {}).get("utility", "")
    method = estimate.get("shapley_method", "")
    label = f"Shapley value ({utility} utility)" if utility else "Shapley value"
    return LayerValues(label, values, stderr, removed, f"{source}; {method}".rstrip("; "))


def _method_scores(data: RunData, scores, method: str, removed: list[int]) -> None:
    if not scores or not all(isinstance(s, int | float) for s in scores):
        data.notes["shapley"] = f"the {method} method recorded no per-layer scores"
        return
    data.layer_values = LayerValues(f"{method} score", [float(s) for s in scores], None, removed,
                                    f"scores of the {method} method (no Shapley values in this run)")
    data.notes["shapley"] = f"this run used the {method} method: its per-layer scores are shown, without error bars"


def _surrogate(estimate: dict, notes: dict) -> SurrogateFit | None:
    fit = estimate.get("surrogate")
    if not isinstance(fit, dict):
        notes["surrogate"] = "this run recorded no surrogate fit"
        return None
    utility = (estimate.get("settings") or {}).get("utility", "utility")
    metrics = {key: fit[key] for key in ("r2", "spearman", "mae", "n_train", "n_holdout") if key in fit}
    points = fit.get(HOLDOUT_KEY)
    measured: list[float] = []
    predicted: list[float] = []
    if isinstance(points, list) and points:
        measured = [float(p["measured"]) for p in points]
        predicted = [float(p["predicted"]) for p in points]
    else:
        notes["surrogate"] = (f"this run's surrogate record has no `{HOLDOUT_KEY}` list of held-out "
                              "{measured, predicted} utilities, so only the fit's scores are shown")
    return SurrogateFit(str(fit.get("name", "?")), utility, metrics, measured, predicted)


def _add_provenance(data: RunData, record: dict) -> None:
    config = data.directory / CONFIG_FILE
    table: dict = {}
    if config.is_file():
        data.config_text = config.read_text()
        try:
            table = tomllib.loads(data.config_text).get(PROVENANCE_TABLE, {})
        except tomllib.TOMLDecodeError:
            data.notes["commands"] = f"{config} is not valid TOML"
    data.provenance = {key: value for key, value in table.items()
                       if key not in ("command_line", "reproduce", "layershap", "torch", "transformers", "numpy",
                                      "python")}
    for key, label in (("command_line", "as run"), ("reproduce", "to run it again")):
        command = table.get(key) or record.get(key)
        if command and all(str(command) != c for _, c in data.commands):
            data.commands.append((label, str(command)))
    if not data.commands:
        data.notes["commands"] = f"{data.directory} has no {CONFIG_FILE} recording the command that made it"
    versions = record.get("versions") if isinstance(record.get("versions"), dict) else {}
    versions = {**versions, **{key: str(table[key]) for key in ("layershap", "torch", "transformers", "numpy",
                                                                "python") if key in table}}
    if not versions and record.get("layershap_version"):
        versions = {"layershap": str(record["layershap_version"])}
    data.versions = versions


def _layers(indices) -> str:
    return ", ".join(str(i) for i in indices) or "-"


def _num(value, digits: int) -> str:
    if value is None:
        return ""
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            return "inf" if value > 0 else ("-inf" if value < 0 else "nan")
        return f"{value:.{digits}g}" if isinstance(value, float) else str(value)
    return str(value)
