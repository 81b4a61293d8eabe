"""A comparison's record as files: compare.json (the record), compare.csv, compare.md and compare.png
(perplexity against ratio, one line per method, one panel per evaluation text).

The cost columns: `forward_passes` and `token_passes` are what each method used (measured now or served
from the evaluation store, so a rerun on a warm store shows the same), `paid_*` what this run measured
(see `layershap.plan.methods.base.Cost`)."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np

from layershap.io import write_json

DENSE = "dense"  # the method name of the unpruned model's row (ratio 0)


def write_compare(record: dict, out, *, plot: bool = True) -> dict[str, Path]:
    """Write compare.json, compare.csv, compare.md and (with plot, when matplotlib is there) compare.png."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "compare.json", "csv": out / "compare.csv", "md": out / "compare.md"}
    write_json(paths["json"], record)
    paths["csv"].write_text(compare_csv(record))
    paths["md"].write_text(markdown_table(record) + "\n")
    if plot:
        png = out / "compare.png"
        note = plot_compare(record, png)
        if note is None:
            paths["png"] = png
        else:
            record.setdefault("notes", []).append(note)
            write_json(paths["json"], record)
    return paths


def _texts(record: dict) -> list[str]:
    return list(record["rows"][0]["ppl"]) if record["rows"] else list(record.get("evaluation", {}))


def _has_zero_shot(record: dict) -> bool:
    return any("zero_shot_average" in row for row in record["rows"])


def compare_csv(record: dict) -> str:
    texts = _texts(record)
    header = ["method", "ratio", "k", "removed", *[f"ppl_{name}" for name in texts]]
    if _has_zero_shot(record):
        header.append("zero_shot_average")
    header += ["forward_passes", "token_passes", "paid_passes", "paid_token_passes", "seconds"]
    sub = _sublayer(record)
    if sub:
        header += ["granularity", "parameter_fraction_removed", "kv_cache_fraction_removed"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in record["rows"]:
        line = [row["method"], row["ratio"], row["k"], " ".join(map(str, row["removed"])),
                *[f"{row['ppl'][name]:.6g}" for name in texts]]
        if _has_zero_shot(record):
            line.append(f"{row['zero_shot_average']:.6g}" if "zero_shot_average" in row else "")
        cost = row.get("cost") or {}
        line += [row["forward_passes"], cost.get("token_passes", ""), cost.get("paid_passes", ""),
                 cost.get("paid_token_passes", ""), f"{row['seconds']:.3f}"]
        if sub:
            line += [row.get("granularity", "block"), f"{row.get('parameter_fraction_removed', 0.0):.6g}",
                     f"{row.get('kv_cache_fraction_removed', 0.0):.6g}"]
        writer.writerow(line)
    return buffer.getvalue()


def markdown_table(record: dict) -> str:
    texts = _texts(record)
    zero = _has_zero_shot(record)
    header = ["method", "ratio", "removed", *[f"ppl {name}" for name in texts]]
    if zero:
        header.append("zero-shot avg")
    header += ["forward passes", "token-passes (M)", "paid passes", "seconds"]
    sub = _sublayer(record)
    if sub:
        header += ["params removed", "KV cache removed"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in record["rows"]:
        cells = [row["method"], f"{row['ratio']:g}", ", ".join(map(str, row["removed"])) or "-",
                 *[_number(row["ppl"][name]) for name in texts]]
        if zero:
            cells.append(f"{row['zero_shot_average']:.4f}" if "zero_shot_average" in row else "")
        cost = row.get("cost") or {}
        cells += [str(row["forward_passes"]), _millions(cost.get("token_passes")),
                  str(cost.get("paid_passes", "")), f"{row['seconds']:.1f}"]
        if sub:
            cells += [f"{row.get('parameter_fraction_removed', 0.0):.1%}", f"{row.get('kv_cache_fraction_removed', 0.0):.0%}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _sublayer(record: dict) -> bool:
    return record.get("granularity") == "sublayer"


def _millions(value) -> str:
    return "" if value is None else f"{value / 1e6:.2f}"


def _number(value: float) -> str:
    return "inf" if not math.isfinite(value) else f"{value:.3f}"


def plot_compare(record: dict, path) -> str | None:
    """Perplexity against ratio, one line per method (the dense model at ratio 0 starts every line), one panel
    per evaluation text, log y-axis. Returns None, or a note saying why no plot was drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no compare.png: matplotlib is not installed (pip install 'layershap[report]')"
    texts = _texts(record)
    if not texts:
        return "no compare.png: no rows to plot"
    dense = next((row for row in record["rows"] if row["method"] == DENSE), None)
    methods = [m for m in dict.fromkeys(row["method"] for row in record["rows"]) if m != DENSE]
    fig, axes = plt.subplots(1, len(texts), figsize=(6 * len(texts), 4.5), squeeze=False)
    for ax, name in zip(axes[0], texts):
        for number, method in enumerate(methods):
            rows = sorted((row for row in record["rows"] if row["method"] == method), key=lambda r: r["ratio"])
            if dense is not None:
                rows = [dense, *rows]
            y = [row["ppl"][name] if math.isfinite(row["ppl"][name]) else np.nan for row in rows]
            ax.plot([row["ratio"] for row in rows], y, label=method, marker="os^vDP*X"[number % 8],
                    linestyle=("-", "--", "-.", ":")[number // 8 % 4], alpha=0.85)
        ax.set_yscale("log")
        ax.set_xlabel("fraction of block parameters removed" if record.get("granularity") == "sublayer"
                      else "fraction of blocks removed")
        ax.set_ylabel(f"perplexity ({Path(name).name})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(f"{record.get('model', '')}: held-out perplexity by pruning method")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None
