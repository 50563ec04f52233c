"""Private files and directories: torpord's state is readable by its own user only.

Snapshots hold model weights and the catalog holds every model's source path, so neither may
be readable by other users of a shared host, whatever umask torpord was started with (a
shell's 022 would make them 0644 in 0755 directories; issue 12). Directories torpord creates
are 0700 and its files 0600; directories that already exist keep their mode (an operator, or
systemd's StateDirectoryMode, chose it).
"""

from __future__ import annotations

import os
from pathlib import Path

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


def make_dirs(path: str | os.PathLike[str], mode: int = PRIVATE_DIR) -> Path:
    """Create `path` and its missing parents with exactly `mode`; return it.

    chmod after mkdir, because the umask is applied to mkdir's mode and only narrows it.
    """
    path = Path(path)
    missing: list[Path] = []
    d = path
    while not d.is_dir():
        missing.append(d)
        if d.parent == d:
            break
        d = d.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, mode)
        except FileExistsError:
            continue  # a concurrent creator won; its mode stands
        os.chmod(d, mode)
    return path


def make_dir(path: str | os.PathLike[str], mode: int = PRIVATE_DIR) -> bool:
    """Create the one directory `path` with exactly `mode`; False if it existed."""
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        return False
    os.chmod(path, mode)
    return True


def make_file(path: str | os.PathLike[str]) -> None:
    """Create `path` empty and 0600 unless it exists; an existing file is narrowed to 0600
    (it is ours: the catalog and its journals)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE)
    try:
        if os.fstat(fd).st_mode & 0o077:
            os.fchmod(fd, PRIVATE_FILE)
    finally:
        os.close(fd)
