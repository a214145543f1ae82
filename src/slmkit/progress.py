"""Progress display for long stages: silent in library use, rich spinners with elapsed time once the CLI enables it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

_console: Console | None = None


def enable(console: Console) -> None:
    """Show steps on `console` (the CLI passes a stderr console so stdout stays clean for pipes)."""
    global _console
    _console = console


def disable() -> None:
    global _console
    _console = None


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
