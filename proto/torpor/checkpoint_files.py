"""Opening the files of a checkpoint directory safely: confined to the model roots, regular
files only, never blocking.

torpord and its workers run as the service user, which can read more than the user who
registered a model. So every file either of them opens from a checkpoint is checked at open
time, not only the directory at registration (issue 12): the directory could be swapped for a
symlink afterwards, a `model.safetensors` could be a symlink out of the roots, and a shard
index could name `../../etc/shadow`.

How a file is opened (`CheckpointDir.open`):
1. its name must be a plain file name (no `/`, not `.` or `..`);
2. its path is resolved (symlinks followed: Hugging Face caches link `snapshots/<rev>/*` to
   `blobs/<hash>`) and must lie under one of the roots;
3. the resolved path is opened with O_NOFOLLOW | O_NONBLOCK, so a FIFO or a device never
   blocks the open, and a symlink swapped in since step 2 fails the open;
4. after the open, the file the descriptor really refers to (`/proc/self/fd/N`) is checked
   against the roots again, and fstat must say it is a regular file.

Anything else is InvalidArgument naming the file. Readers that need a path (safetensors'
`safe_open`, which mmaps) get `/proc/self/fd/N`, which names the checked inode whatever
happens to the directory later.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from torpor.errors import InvalidArgument

MAX_JSON_BYTES = 64 << 20
"""Largest JSON file of a checkpoint read whole (config, index, tokenizer), in bytes."""

SMALL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)
"""The small files of a checkpoint that torpor reads (and copies into a snapshot)."""

INDEX = "model.safetensors.index.json"
"""The shard index of a checkpoint split over several safetensors files."""

_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY


@dataclass(frozen=True)
class CheckpointDir:
    """A checkpoint directory and the roots its files must resolve under.

    `roots` are the daemon's model roots (for a restore from a snapshot: the worker's own
    directory of materialized files).
    """

    path: Path
    roots: tuple[Path, ...]

    @classmethod
    def confined(
        cls, path: str | os.PathLike[str], roots: Iterable[str | os.PathLike[str]]
    ) -> CheckpointDir:
        """A CheckpointDir of `path` whose files must lie under `roots` (resolved now)."""
        resolved = tuple(Path(r).resolve(strict=False) for r in roots)
        if not resolved:
            raise InvalidArgument(
                f"no model roots given for checkpoint {os.fspath(path)!r}",
                reason="NO_MODEL_ROOTS",
            )
        return cls(Path(path), resolved)

    def _problem(self, name: str) -> str | None:
        if not name or "/" in name or "\x00" in name or name in (".", ".."):
            return "is not a plain file name inside the checkpoint directory"
        return None

    def _inside(self, real: Path) -> bool:
        return any(real.is_relative_to(root) for root in self.roots)

    def _refuse(self, name: str, why: str, reason: str = "CHECKPOINT_FILE_REFUSED") -> NoReturn:
        raise InvalidArgument(
            f"checkpoint file {name!r} in {str(self.path)!r} {why}",
            reason=reason,
            metadata={"file": name, "dir": str(self.path)},
        )

    def resolve(self, name: str) -> Path | None:
        """The real path of `name` when it exists and lies under the roots; None when it
        does not exist; InvalidArgument when it lies outside the roots."""
        problem = self._problem(name)
        if problem is not None:
            self._refuse(name, problem)
        try:
            real = (self.path / name).resolve(strict=True)
        except FileNotFoundError:
            return None
        except (OSError, RuntimeError) as exc:
            self._refuse(name, f"cannot be resolved: {exc}")
        if not self._inside(real):
            self._refuse(
                name,
                f"resolves to {str(real)!r}, outside the model roots "
                f"{[str(r) for r in self.roots]}",
                reason="CHECKPOINT_FILE_OUTSIDE_ROOTS",
            )
        return real

    def exists(self, name: str) -> bool:
        """Whether `name` exists (and lies under the roots: a file outside is refused)."""
        return self.resolve(name) is not None

    @contextmanager
    def open(self, name: str) -> Iterator[int]:
        """A read-only descriptor of the regular file `name`, checked as the module says."""
        real = self.resolve(name)
        if real is None:
            self._refuse(name, "does not exist", reason="CHECKPOINT_FILE_MISSING")
        try:
            fd = os.open(real, _OPEN_FLAGS)
        except OSError as exc:
            self._refuse(name, f"cannot be opened: {exc.strerror}")
        try:
            self._check_open(name, fd)
            yield fd
        finally:
            os.close(fd)

    def _check_open(self, name: str, fd: int) -> None:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            self._refuse(name, f"is not a regular file ({_kind(mode)})")
        real = Path(os.readlink(f"/proc/self/fd/{fd}"))
        if not self._inside(real):  # swapped between the resolve and the open
            self._refuse(
                name,
                f"was replaced by {str(real)!r}, outside the model roots",
                reason="CHECKPOINT_FILE_OUTSIDE_ROOTS",
            )
        # Reads of a regular file never block; clear O_NONBLOCK so they behave normally.
        os.set_blocking(fd, True)

    def read_bytes(self, name: str, limit: int = MAX_JSON_BYTES) -> bytes:
        """The whole file `name`; InvalidArgument when it is longer than `limit` bytes."""
        with self.open(name) as fd:
            size = os.fstat(fd).st_size
            if size > limit:
                self._refuse(name, f"is {size} bytes, more than the {limit} allowed")
            with os.fdopen(os.dup(fd), "rb") as f:
                return f.read(limit + 1)[:limit]

    def read_json_object(self, name: str) -> dict[str, Any]:
        """The JSON object in `name`; InvalidArgument when it is not one."""
        data = self.read_bytes(name)
        try:
            value = json.loads(data)
        except ValueError as exc:
            self._refuse(name, f"is not valid JSON: {exc}", reason="BAD_CHECKPOINT_JSON")
        if not isinstance(value, dict):
            self._refuse(
                name,
                f"must hold a JSON object, not {type(value).__name__}",
                reason="BAD_CHECKPOINT_JSON",
            )
        return value

    def names(self, suffix: str) -> list[str]:
        """Names of the directory's entries ending in `suffix`, sorted."""
        try:
            entries = os.listdir(self.path)
        except OSError as exc:
            raise InvalidArgument(
                f"cannot list checkpoint directory {str(self.path)!r}: {exc.strerror}",
                reason="CHECKPOINT_UNREADABLE",
                metadata={"dir": str(self.path)},
            ) from exc
        return sorted(e for e in entries if e.endswith(suffix))

    def shard_names(self) -> list[str]:
        """The safetensors files of the checkpoint: those `model.safetensors.index.json`
        names in its `weight_map` when it has one, else every `*.safetensors`. Each name
        must be a plain file name that resolves under the roots."""
        if not self.exists(INDEX):
            names = self.names(".safetensors")
        else:
            weight_map = self.read_json_object(INDEX).get("weight_map")
            if not isinstance(weight_map, dict) or not all(
                isinstance(v, str) for v in weight_map.values()
            ):
                self._refuse(
                    INDEX,
                    "must have a weight_map of tensor names to file names",
                    reason="BAD_CHECKPOINT_JSON",
                )
            names = sorted(set(weight_map.values()))
        for name in names:
            if self._problem(name) is not None:
                self._refuse(
                    name,
                    f"(named in {INDEX}) is not a plain file name inside the checkpoint directory",
                )
            self.resolve(name)
        return names

    def check_dir(self) -> Path:
        """The directory's real path, required to lie under the roots (a directory swapped
        for a symlink out of the roots since registration is refused here)."""
        real = self.path.resolve(strict=False)
        if not self._inside(real):
            raise InvalidArgument(
                f"checkpoint directory {str(self.path)!r} resolves to {str(real)!r}, outside "
                f"the model roots {[str(r) for r in self.roots]}",
                reason="SOURCE_OUTSIDE_ROOTS",
                metadata={"dir": str(self.path), "resolved": str(real)},
            )
        return real


def as_checkpoint(model_dir: str | os.PathLike[str] | CheckpointDir) -> CheckpointDir:
    """`model_dir` as a CheckpointDir; a bare path is confined to itself (a worker's own
    materialized snapshot files, tests). torpord and its workers pass the model roots."""
    if isinstance(model_dir, CheckpointDir):
        return model_dir
    return CheckpointDir.confined(model_dir, [model_dir])


def fd_path(fd: int) -> str:
    """A path that opens the very file `fd` refers to (for readers that need a path)."""
    return f"/proc/self/fd/{fd}"


def _kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a directory"),
    ):
        if test(mode):
            return kind
    return f"mode {oct(mode)}"
