"""`layershap report`: the HTML report of a run directory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from layershap.config import ConfigOption


def register(app: typer.Typer) -> None:
    app.command(name="report")(report)


def report(run_dir: Annotated[Path, typer.Argument(help="Directory written by estimate, prune or compare --out.")],
           config: ConfigOption = None):
    """Write RUN_DIR/report.html: Shapley values with error bars, kept and removed layers along the depth,
    the surrogate's fit, perplexity against ratio per method, the comparison table, and the exact commands
    and versions; self-contained (figures inlined), with the figures also as PNG files beside it."""
    from layershap.errors import LayershapError
    from layershap.report import write_run_report

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise LayershapError("the report needs matplotlib: pip install 'layershap[report]'") from None
    paths = write_run_report(run_dir)
    figures = [p.name for key, p in paths.items() if key != "html"]
    typer.echo(f"wrote {paths['html']}" + (f" and {', '.join(figures)}" if figures else ""))
