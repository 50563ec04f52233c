"""The exchange board: how the two workers of an exchange swap tell each other, chunk by chunk,
what they have freed (docs/PAGER.md, "Exchange swap").

An exchange moves one runtime's weights from the GPU to host RAM (the *outgoing* side) while
another's move from host RAM to the GPU (the *incoming* side), so that host RAM holds one copy,
not two. Each side runs in its own worker process and may only take memory the other has
given back, plus a slack torpord grants:

- the outgoing side takes host bytes for its copy while
  `out_host_taken + n <= in_host_freed + host_slack`;
- the incoming side maps GPU bytes while `in_gpu_taken + n <= out_gpu_freed + gpu_slack`.

The board is a small file (in torpord's runtime directory) that both workers map. Every
counter has one writer and only grows, and is one aligned 64-bit word, so a reader sees an old
or a new value, never a torn one. A side that fails writes its status and reason; the other
sees it at its next wait and stops at a chunk boundary (`ExchangeAborted`).

No torch here: torpord creates the board, the workers use it.
"""

from __future__ import annotations

import ctypes
import enum
import mmap
import os
import time
from collections.abc import Callable
from pathlib import Path

from torpor.errors import Aborted, DeadlineExceeded, InvalidArgument

MAGIC = 0x544F52504F524558  # "TORPOREX"
_FIELDS = (
    "magic",
    "host_slack",
    "gpu_slack",
    "out_host_taken",
    "out_gpu_freed",
    "in_gpu_taken",
    "in_host_freed",
    "out_status",
    "in_status",
    "out_steps",
    "in_steps",
)
SIZE = 8 * len(_FIELDS)
POLL_S = 0.0005


class Side(enum.Enum):
    """Which way a side moves its runtime's weights."""

    OUT = "out"  # GPU -> host
    IN = "in"  # host -> GPU


class Status(enum.IntEnum):
    RUNNING = 0
    DONE = 1
    FAILED = 2


class ExchangeAborted(Aborted):
    """The other side failed: this side stopped at a chunk boundary."""


class Board:
    """A mapped exchange board. `create` makes one (torpord), `open` maps it (a worker)."""

    def __init__(self, path: Path, mem: mmap.mmap) -> None:
        self.path = path
        self._mem = mem
        self._words = (ctypes.c_uint64 * len(_FIELDS)).from_buffer(mem)

    @classmethod
    def create(cls, path: Path, host_slack: int, gpu_slack: int) -> Board:
        """A new board at `path` (which must not exist) with the slack torpord grants."""
        for name, value in (("host_slack", host_slack), ("gpu_slack", gpu_slack)):
            if not isinstance(value, int) or value < 0:
                raise InvalidArgument(
                    f"{name} must be a non-negative number of bytes, got {value!r}",
                    reason="BAD_EXCHANGE",
                )
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, SIZE)
            board = cls(path, mmap.mmap(fd, SIZE))
        finally:
            os.close(fd)
        board._set("host_slack", host_slack)
        board._set("gpu_slack", gpu_slack)
        board._set("magic", MAGIC)
        return board

    @classmethod
    def open(cls, path: Path) -> Board:
        """Map the board torpord made; InvalidArgument BAD_EXCHANGE if it is not one."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError as exc:
            raise InvalidArgument(
                f"no exchange board at {path}: {exc.strerror}", reason="BAD_EXCHANGE"
            ) from exc
        try:
            if os.fstat(fd).st_size != SIZE:
                raise InvalidArgument(f"{path} is not an exchange board", reason="BAD_EXCHANGE")
            board = cls(path, mmap.mmap(fd, SIZE))
        finally:
            os.close(fd)
        if board._get("magic") != MAGIC:
            board.close()
            raise InvalidArgument(f"{path} is not an exchange board", reason="BAD_EXCHANGE")
        return board

    def close(self) -> None:
        del self._words
        self._mem.close()

    # -- the words ----------------------------------------------------------------------------

    def _get(self, name: str) -> int:
        return int(self._words[_FIELDS.index(name)])

    def _set(self, name: str, value: int) -> None:
        self._words[_FIELDS.index(name)] = value

    def add(self, name: str, n: int) -> None:
        """Grow a counter this side owns (`out_*` by the outgoing side, `in_*` by the other)."""
        self._set(name, self._get(name) + n)

    def __getattr__(self, name: str) -> int:
        if name in _FIELDS:
            return self._get(name)
        raise AttributeError(name)

    def status(self, side: Side) -> Status:
        return Status(self._get(f"{side.value}_status"))

    def finish(self, side: Side, status: Status) -> None:
        self._set(f"{side.value}_status", int(status))

    def step_done(self, side: Side) -> None:
        self.add(f"{side.value}_steps", 1)

    # -- waiting for room -----------------------------------------------------------------------

    def room(self, side: Side) -> int:
        """Bytes this side may take now: host bytes (OUT) or GPU bytes (IN)."""
        if side is Side.OUT:
            return self.in_host_freed + self.host_slack - self.out_host_taken
        return self.out_gpu_freed + self.gpu_slack - self.in_gpu_taken

    def wait_room(
        self, side: Side, nbytes: int, deadline: float, stop: Callable[[], bool] | None = None
    ) -> None:
        """Return once `nbytes` may be taken; ExchangeAborted if the other side failed (or
        `stop` says so), DeadlineExceeded past `deadline` (time.monotonic())."""
        peer = Side.IN if side is Side.OUT else Side.OUT
        while self.room(side) < nbytes:
            if self.status(peer) is Status.FAILED or (stop is not None and stop()):
                raise ExchangeAborted(
                    f"the {peer.value} side of the exchange failed; stopped at a chunk boundary",
                    reason="EXCHANGE_PEER_FAILED",
                )
            if self.status(peer) is Status.DONE:
                raise DeadlineExceeded(  # the peer freed all it will: this never fits
                    f"the exchange's {side.value} side needs {nbytes} bytes more than the "
                    f"other side freed and the slack allows ({self.room(side)} free)",
                    reason="EXCHANGE_NO_ROOM",
                )
            if time.monotonic() > deadline:
                raise DeadlineExceeded(
                    f"the exchange's {side.value} side waited too long for {nbytes} bytes "
                    f"({self.room(side)} free)",
                    reason="EXCHANGE_TIMEOUT",
                )
            time.sleep(POLL_S)
