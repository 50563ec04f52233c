"""Progress of loads, restores and evictions on a terminal, and nothing anywhere else.

Progress goes to stderr, and only when both stdout and stderr are terminals and the output
is not `--json`: stdout carries only the command's data, so a pipe or a redirect never
sees a bar or an escape code. `for_output(as_json)` picks the view.
"""

from __future__ import annotations

import sys
from typing import Protocol

from rich.console import Console, RenderableType
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.text import Text


class ProgressView(Protocol):
    """What a command reports while it waits; every method may be a no-op."""

    def note(self, text: str) -> None:
        """One line of news (an eviction started), printed above any bars."""

    def waiting(self, key: str, description: str) -> None:
        """Start or update a phase with no byte count (queued, waiting for the daemon)."""

    def transfer(self, key: str, description: str, done: int, total: int) -> None:
        """Start or update a phase that moves `total` bytes (0 while unknown)."""

    def close(self) -> None:
        """Stop drawing; what was drawn stays on the terminal."""


class NullProgress:
    """The view when progress is not shown."""

    def note(self, text: str) -> None:
        pass

    def waiting(self, key: str, description: str) -> None:
        pass

    def transfer(self, key: str, description: str, done: int, total: int) -> None:
        pass

    def close(self) -> None:
        pass


class _BytesOnly(ProgressColumn):
    """A column drawn only for phases that move bytes (a spinner has no byte count)."""

    def __init__(self, inner: ProgressColumn) -> None:
        super().__init__()
        self.inner = inner

    def render(self, task: Task) -> RenderableType:
        return self.inner.render(task) if task.fields.get("moves_bytes") else Text("")


class TerminalProgress:
    """rich progress bars: bytes done of total, speed and elapsed time per phase.

    A phase that moves bytes ends the phases that were only waiting before it (a queued
    request that starts restoring is no longer queued).
    """

    def __init__(self, console: Console) -> None:
        self._bars = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}", markup=False),
            _BytesOnly(BarColumn()),
            _BytesOnly(DownloadColumn(binary_units=True)),
            _BytesOnly(TransferSpeedColumn()),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self._tasks: dict[str, TaskID] = {}
        self._waiting: set[str] = set()
        self._started = False

    def note(self, text: str) -> None:
        self._start()
        self._bars.console.print(text, markup=False, highlight=False)

    def waiting(self, key: str, description: str) -> None:
        self._start()
        if key in self._tasks:
            self._bars.update(self._tasks[key], description=description)
            return
        self._tasks[key] = self._bars.add_task(description, total=None)
        self._waiting.add(key)

    def transfer(self, key: str, description: str, done: int, total: int) -> None:
        self._start()
        for other in self._waiting - {key}:
            self._bars.remove_task(self._tasks.pop(other))
        self._waiting &= {key}
        if key not in self._tasks:
            self._tasks[key] = self._bars.add_task(
                description, total=total or None, moves_bytes=True
            )
        self._bars.update(
            self._tasks[key], description=description, completed=done, total=total or None
        )

    def close(self) -> None:
        for key in self._waiting:  # a spinner left spinning would claim we still wait
            self._bars.remove_task(self._tasks.pop(key))
        self._waiting.clear()
        if self._started:
            self._bars.stop()
            self._started = False

    def _start(self) -> None:
        if not self._started:
            self._bars.start()
            self._started = True


def for_output(as_json: bool) -> ProgressView:
    """Bars on stderr when a person watches (stdout and stderr are terminals, no --json)."""
    if as_json or not (sys.stdout.isatty() and sys.stderr.isatty()):
        return NullProgress()
    return TerminalProgress(Console(stderr=True, highlight=False, markup=False, emoji=False))
