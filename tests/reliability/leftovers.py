"""What a torpord leaves behind, read from /proc and its state directory.

The faults suite asserts after every trial that no worker process, temp chunk file, orphan
chunk file or socket is left that the daemon does not account for; the load suite reads
torpord's RSS and open files here.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

WORKER_MODULE = "torpor.worker.main"
KEEPER_MODULE = "torpor.worker.pager.keeper"


@dataclass(frozen=True)
class WorkerProc:
    """A live torpor-worker process of one state directory, as /proc shows it."""

    pid: int
    socket: Path


def workers_of(state_dir: Path, module: str = WORKER_MODULE) -> list[WorkerProc]:
    """Every live worker (or, with KEEPER_MODULE, keeper) whose socket lies in this state
    dir's runtime directory (the tests' start_torpord puts it at <state>/run), whoever its
    parent is: a worker orphaned by a killed torpord is reparented, and must still be found."""
    run = str(state_dir / "run") + "/"
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            state = _proc_state(entry)
        except OSError:  # gone while we looked
            continue
        args = [a.decode(errors="replace") for a in argv]
        if module not in args or "--socket" not in args or state == "Z":
            continue
        socket = args[args.index("--socket") + 1]
        if socket.startswith(run):
            found.append(WorkerProc(int(entry.name), Path(socket)))
    return found


def _proc_state(entry: Path) -> str:
    for line in (entry / "status").read_text().splitlines():
        if line.startswith("State:"):
            return line.split()[1]
    return "?"


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        return _proc_state(Path(f"/proc/{pid}")) != "Z"
    except OSError:
        return False


def temp_files(state_dir: Path) -> list[Path]:
    """Chunk-store temp files (`.tmp-*`): writes in progress, or debris of a killed one."""
    return sorted((state_dir / "snapshots").rglob(".tmp-*"))


def chunk_files(state_dir: Path) -> dict[str, Path]:
    """Every chunk file on disk, by hash."""
    root = state_dir / "snapshots" / "chunks"
    return {p.name: p for p in root.glob("??/??/*") if not p.name.startswith(".")}


def catalog_chunks(state_dir: Path) -> set[str]:
    """Hashes of the chunk rows in the SQLite catalog (read-only; WAL lets torpord write on)."""
    uri = f"file:{state_dir / 'catalog.db'}?mode=ro"
    with sqlite3.connect(uri, uri=True, timeout=10) as db:
        return {row[0] for row in db.execute("SELECT hash FROM chunks")}


def orphan_chunks(state_dir: Path) -> list[Path]:
    """Chunk files with no catalog row (a writer killed between the file and the row)."""
    known = catalog_chunks(state_dir)
    return sorted(p for h, p in chunk_files(state_dir).items() if h not in known)


def stray_sockets(state_dir: Path, live: list[WorkerProc]) -> list[Path]:
    """Worker sockets that no live worker serves."""
    served = {w.socket for w in live}
    workers = state_dir / "run" / "workers"
    if not workers.exists():
        return []
    return sorted(p for p in workers.glob("*.sock") if p not in served)


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (VmRSS in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def open_fds(pid: int) -> int:
    """Open file descriptors of a process (entries of /proc/PID/fd)."""
    return sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir())
