"""Progress display for long stages: silent in library use, rich spinners with elapsed time once the CLI enables it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn,
)

_console: Console | None = None


def enable(console: Console) -> None:
    """Show steps on `console` (the CLI passes a stderr console so stdout stays clean for pipes)."""
    global _console
    _console = console


@contextmanager
def step(description: str) -> Iterator[None]:
    """Mark a stage that may take seconds; shows a spinner and, when done, a tick with the elapsed time."""
    if _console is None:
        yield
        return
    columns = (SpinnerColumn(finished_text="[green]✓"), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=_console, transient=False) as bar:
        task = bar.add_task(description, total=1)
        yield
        bar.update(task, completed=1)


def note(message: str) -> None:
    """A one-line message shown with the steps (nothing in library use)."""
    if _console is not None:
        _console.print(message, soft_wrap=True)


def warn(message: str) -> None:
    """Something the user must know although the work goes on: shown with the steps in the CLI, a warning in
    library use."""
    if _console is not None:
        _console.print(f"[yellow]warning:[/] {message}", soft_wrap=True, highlight=False)
    else:
        import warnings

        warnings.warn(message, RuntimeWarning, stacklevel=3)


@contextmanager
def bar(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """A progress bar with ETA for work counted in items; yields advance(n). Silent in library use."""
    if _console is None:
        yield lambda n=1: None
        return
    columns = (
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("eta"), TimeRemainingColumn(),
    )
    with Progress(*columns, console=_console, transient=False) as p:
        task = p.add_task(description, total=total)
        yield lambda n=1: p.advance(task, n)
