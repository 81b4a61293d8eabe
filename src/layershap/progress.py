"""Progress bars with rate and ETA for every long step, on stderr so stdout stays clean for results."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


@contextmanager
def progress_bar(total: int, description: str) -> Iterator[Callable[[], None]]:
    """Yield an `advance()` callable; shows nothing when total is 0 or LAYERSHAP_NO_PROGRESS is set."""
    if total <= 0 or os.environ.get("LAYERSHAP_NO_PROGRESS"):
        yield lambda: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        task = progress.add_task(description, total=total, rate="")

        def advance() -> None:
            progress.advance(task)
            speed = progress.tasks[0].speed
            progress.update(task, rate=f"{1 / speed:.2f} s/it" if speed else "")

        yield advance
