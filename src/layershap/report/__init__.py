"""`layershap report RUN_DIR`: one self-contained HTML page (and the same figures as PNG) for an estimate,
prune or compare run directory.

load.py reads the run into plain data, plots.py draws figures from it, html.py lays out the page.
"""

from __future__ import annotations

from pathlib import Path


def write_run_report(directory, out_dir=None) -> dict[str, Path]:
    """Write `report.html` and its PNG figures for a run directory (into it, unless `out_dir`)."""
    from layershap.report.html import write_report
    from layershap.report.load import load_run

    return write_report(load_run(directory), out_dir)
