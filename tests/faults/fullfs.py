"""A small tmpfs that tests fill up, so that writes fail with ENOSPC at a chosen moment.

Mounting needs root (CI and the development VM run the tests as root); without it the
test is skipped with the reason. The mount is always undone, even when the test fails.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def small_tmpfs(path: Path, size: int) -> Iterator[Path]:
    """Mount a tmpfs of `size` bytes at `path` (created if needed) for the block's life."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill up (needs root): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        # Lazy: a process the test started may still hold a file open there.
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def fill(directory: Path, name: str = "filler", leave: int = 0) -> Path:
    """Write a file in `directory` until its file system is full, then give `leave` bytes
    back; returns the file (unlink it to free the space again)."""
    path = directory / name
    block = b"\0" * (64 << 10)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        while True:
            try:
                os.write(fd, block)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                if len(block) == 1:
                    break
                block = block[: len(block) // 2]
        if leave:
            os.ftruncate(fd, max(0, os.fstat(fd).st_size - leave))
    finally:
        os.close(fd)
    return path
