"""Who a pid is, from /proc: so that torpord stops a leftover worker or keeper of its own, and
never whatever process reused a pid written down by an earlier torpord (issue 12).

A pid names a process only while that process lives; after it exits the kernel hands the
number out again. A process is named for good by its pid plus its start time (clock ticks
since boot, /proc/PID/stat field 22) plus the boot it started in
(/proc/sys/kernel/random/boot_id: the runtime directory of `make run` outlives a reboot).
Its command line says what it is: `python -m torpor.worker.main --socket PATH ...`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

_PROC = Path("/proc")


@dataclass(frozen=True)
class ProcessStart:
    """When a process started; with its pid it names one process, whatever reuses the pid."""

    boot_id: str
    ticks: int  # start time in clock ticks since boot


def boot_id() -> str:
    try:
        return (_PROC / "sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def started(pid: int) -> ProcessStart | None:
    """When `pid` started; None if there is no such process (or no /proc)."""
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except (OSError, ValueError):
        return None
    # `comm` (field 2) is in parentheses and may hold spaces or ')': the fields after the
    # last ')' start at field 3 (state), so field 22 (starttime) is the 20th of them.
    fields = stat[stat.rindex(")") + 2 :].split()
    return ProcessStart(boot_id(), int(fields[19]))


def cmdline(pid: int) -> list[str] | None:
    """The argv of `pid`; None if it is gone or unreadable."""
    try:
        raw = (_PROC / str(pid) / "cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return [os.fsdecode(arg) for arg in raw.split(b"\0")[:-1]]


def not_ours(pid: int, module: str, socket: Path, start: ProcessStart | None = None) -> str:
    """Why `pid` is not the `python -m <module> --socket <socket>` process we expect (that
    started at `start`, when known); "" when it is."""
    argv = cmdline(pid)
    if argv is None:
        return "no such process"
    if start is not None and started(pid) != start:
        return "started at another time: the pid was reused"
    if not _has(argv, "-m", module):
        return f"not a {module} process"
    if not any(_same_path(arg, socket) for arg in _values(argv, "--socket")):
        return f"not serving {socket}"
    return ""


def _has(argv: list[str], flag: str, value: str) -> bool:
    return value in _values(argv, flag)


def _values(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i in range(len(argv) - 1) if argv[i] == flag]


def _same_path(arg: str, path: Path) -> bool:
    if arg == str(path):
        return True
    try:
        return Path(arg).is_absolute() and os.path.samefile(arg, path)
    except OSError:
        return False
