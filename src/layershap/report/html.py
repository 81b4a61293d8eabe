"""The report page: one self-contained HTML file (figures inlined as base64 PNG, styles inline, nothing
fetched), plus the same figures as PNG files beside it."""

from __future__ import annotations

import base64
import datetime
import html
from pathlib import Path

from layershap import __version__
from layershap.report import plots
from layershap.report.load import RunData

REPORT_FILE = "report.html"
# Figure id -> file written next to the page.
PNG_FILES = {"shapley": "report-shapley.png", "depth": "report-depth.png", "surrogate": "report-surrogate.png",
             "ppl": "report-ppl.png"}

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 72em;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { font-size: 1.2em; margin-top: 2em;
     border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
.meta { color: #555; font-size: 0.95em; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } tr:nth-child(even) td { background: #fafafa; }
pre { background: #f6f6f6; padding: 0.7em; overflow-x: auto; font-size: 0.85em; }
.note { color: #7a4b00; background: #fff6e0; padding: 0.4em 0.7em; border-left: 3px solid #e0a800; }
"""

# Marks the page once every figure has decoded, so headless checks can tell a broken image from a good one.
CHECK_SCRIPT = """
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.querySelectorAll("figure img"));
  var good = images.filter(function (img) { return img.complete && img.naturalWidth > 0; });
  document.body.setAttribute("data-figures", String(images.length));
  document.body.setAttribute("data-figures-rendered", String(good.length));
});
"""


def write_report(data: RunData, out_dir=None) -> dict[str, Path]:
    """Draw every figure the run allows, write them as PNG and the page as report.html; return the paths."""
    out = Path(out_dir or data.directory)
    out.mkdir(parents=True, exist_ok=True)
    figures = _figures(data)
    paths: dict[str, Path] = {}
    images: dict[str, tuple[bytes, str]] = {}
    for key, (fig, caption) in figures.items():
        path = out / PNG_FILES[key]
        images[key] = (plots.save_png(fig, path), caption)
        paths[key] = path
    page = out / REPORT_FILE
    tmp = page.with_suffix(".html.tmp")
    tmp.write_text(render(data, images), encoding="utf-8")
    tmp.replace(page)
    paths["html"] = page
    for name in set(PNG_FILES.values()) - {p.name for p in paths.values()}:
        (out / name).unlink(missing_ok=True)  # a figure an earlier report drew but this one cannot
    return paths


def _figures(data: RunData) -> dict:
    figures = {}
    values = data.layer_values
    if values is not None:
        title = f"{values.label} per layer" + (" (red: removed)" if values.removed else "")
        figures["shapley"] = (plots.layer_values(values.values, values.stderr, values.removed, title=title,
                                                 ylabel=values.label),
                              f"{values.label} of every layer, error bars one standard error; from {values.source}.")
    if data.plans and data.n_layers:
        figures["depth"] = (plots.depth_map(data.n_layers, data.plans, title="Kept and removed layers along depth"),
                            "Each row is one plan; each cell one block, from the input (left) to the output (right).")
    fit = data.surrogate
    if fit is not None:
        summary = "\n".join(f"{key} {_fmt(value)}" for key, value in fit.metrics.items())
        figures["surrogate"] = (
            plots.surrogate_fit(fit.measured, fit.predicted, title=f"Surrogate fit ({fit.name})",
                                label=f"utility ({fit.utility})", summary=summary),
            (f"Held-out masks: the {fit.name} surrogate's predicted utility against the measured one."
             if fit.measured else f"Scores of the {fit.name} surrogate on held-out masks (no per-mask predictions "
                                  "were saved)."))
    if data.ppl and any(data.ppl.values()):
        figures["ppl"] = (plots.ppl_against_ratio(data.ppl, title=f"{data.model}: held-out perplexity"),
                          ("Held-out perplexity against the fraction of blocks removed, one line per method "
                           "(ratio 0 is the dense model)."))
    return figures


def render(data: RunData, images: dict[str, tuple[bytes, str]]) -> str:
    esc = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>layershap report: {esc(data.model)}</title>", f"<style>{STYLE}</style>",
             f"<script>{CHECK_SCRIPT}</script>", "</head><body>",
             f"<h1>layershap {esc(data.kind)} report</h1>",
             f'<p class="meta">Model: <b>{esc(str(data.model))}</b>'
             + (f", {data.n_layers} layers" if data.n_layers else "")
             + f" &middot; run directory <code>{esc(str(data.directory))}</code></p>"]
    sections = [("shapley", "Layer values"), ("depth", "Kept and removed layers"), ("surrogate", "Surrogate fit"),
                ("ppl", "Perplexity against pruning ratio")]
    for key, heading in sections:
        parts.append(f'<section id="section-{key}"><h2>{esc(heading)}</h2>')
        if key in images:
            png, caption = images[key]
            source = base64.b64encode(png).decode("ascii")
            parts.append(f'<figure><img id="plot-{key}" alt="{esc(heading)}" src="data:image/png;base64,{source}">'
                         f"<figcaption>{esc(caption)} (also <code>{PNG_FILES[key]}</code>)</figcaption></figure>")
        if key in data.notes:
            parts.append(f'<p class="note">{esc(data.notes[key])}</p>')
        parts.append("</section>")
    parts.append(f'<section id="section-table"><h2>{esc(data.table_title or "Table")}</h2>')
    if data.table is not None:
        parts.append(_table(data.table.header, data.table.rows, "table-main"))
    else:
        parts.append('<p class="note">no table for this run</p>')
    parts.append("</section>")
    parts.append('<section id="section-commands"><h2>Commands and versions</h2>')
    if data.commands:
        parts.append('<pre id="commands">' + "\n".join(f"# {esc(label)}\n{esc(command)}"
                                                       for label, command in data.commands) + "</pre>")
    if "commands" in data.notes:
        parts.append(f'<p class="note">{esc(data.notes["commands"])}</p>')
    rows = [[name, str(value)] for name, value in data.versions.items()]
    rows += [[name, ", ".join(map(str, value)) if isinstance(value, list) else str(value)]
             for name, value in data.provenance.items()]
    parts.append(_table(["", ""], rows, "table-versions", show_header=False))
    if data.config_text:
        parts.append(f"<details><summary>config.toml</summary><pre>{esc(data.config_text)}</pre></details>")
    parts.append("</section>")
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts.append(f'<p class="meta">Written by layershap {__version__} on {now}.</p></body></html>')
    return "\n".join(parts) + "\n"


def _table(header: list[str], rows: list[list[str]], table_id: str, *, show_header: bool = True) -> str:
    esc = html.escape
    lines = [f'<table id="{table_id}">']
    if show_header:
        lines.append("<thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr></thead>")
    lines.append("<tbody>")
    lines += ["<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in row) + "</tr>" for row in rows]
    lines.append("</tbody></table>")
    return "\n".join(lines)


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
