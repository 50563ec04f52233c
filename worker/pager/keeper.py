"""The keeper: one long-lived process per GPU that holds the page-locked host copies of
deep-suspended runtimes and copies them back into their arenas.

Why a second process: the driver's process checkpoint (deep suspend) costs about 25 ms per
page-locked GB of the checkpointed process, each way (measured on an H200: a 72 GB locked
copy made the restore 1.8 to 2.3 s slower). A worker therefore unlocks its copy before the
checkpoint, and without help brings it back through staging buffers at the host's memory
bandwidth (26 to 33 GB/s). The keeper is never checkpointed, so it can keep the same pages
locked: the worker's copy lives in a memfd that both map, and on a deep resume the worker
maps its arena, exports the arena's physical handles as descriptors (CUDA VMM, POSIX file
descriptor handles) and the keeper imports them, maps them into its own address space and
copies at DMA speed (64 GiB: 0.30 s restore + 1.27 s at 55 GB/s, against 2.5 s staged).

It costs one CUDA context per GPU (543 MB on an H200), shared by every runtime on the GPU.

    python -m torpor.worker.pager.keeper --socket PATH --device cuda:0

It prints `ready` once it listens. Each connection is one worker; the copies it holds are
freed when the connection ends, so a worker that dies leaks nothing here. The requests
(`torpor.fdwire` messages) are:

- `hold {name, nbytes}` + the memfd: map it and lock it (seconds: about 5 GB/s);
- `fill {name, nbytes, sizes}` + one descriptor per arena handle: copy the first `nbytes`
  of the copy into the handles, mapped back to back;
- `drop {name}`: unlock and unmap it;
- `hello`: the keeper's pid and device.

Each answer is `{"ok": true, ...}`, or `{"ok": false, "code", "reason", "error"}` with a
torpor error code.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from torpor import log
from torpor.errors import InvalidArgument, NotFound, TorporError
from torpor.fdwire import Receiver, send
from torpor.worker.pager import backend_for
from torpor.worker.pager.arena import Arena
from torpor.worker.pager.backend import Allocation, MemoryBackend
from torpor.worker.pager.host import HostBuffer, HostPinner

_log = log.get_logger("pager.keeper")


class Keeper:
    """The keeper's server: one thread per connection."""

    def __init__(self, path: Path, device: str) -> None:
        self.path = path
        self.device = device
        self.backend: MemoryBackend = backend_for(device)
        self._pinner = self.backend if isinstance(self.backend, HostPinner) else None
        self._server: socket.socket | None = None
        self._held_bytes = 0
        self._lock = threading.Lock()

    def listen(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.unlink(missing_ok=True)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(self.path))
        os.chmod(self.path, 0o600)  # the same user only: it maps and writes GPU memory
        server.listen(64)
        self._server = server

    def serve(self) -> None:
        """Accept connections until `stop`."""
        assert self._server is not None
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:  # closed by stop()
                return
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            with contextlib.suppress(OSError):
                self._server.shutdown(socket.SHUT_RDWR)
            self._server.close()
            self._server = None
        self.path.unlink(missing_ok=True)

    # -- one worker ---------------------------------------------------------------------------

    def _session(self, conn: socket.socket) -> None:
        held: dict[str, HostBuffer] = {}
        receiver = Receiver(conn)
        try:
            while True:
                try:
                    message, fds = receiver.recv()
                except EOFError:
                    return
                try:
                    reply = {"ok": True} | self._handle(message, fds, held)
                except TorporError as exc:
                    reply = _error(exc)
                except Exception as exc:  # a bug: answer it, keep serving
                    _log.exception("keeper_request_failed", op=message.get("op"))
                    reply = {"ok": False, "code": "INTERNAL", "reason": "INTERNAL"}
                    reply["error"] = repr(exc)
                finally:
                    for fd in fds:  # those a handler did not take
                        with contextlib.suppress(OSError):
                            os.close(fd)
                send(conn, reply)
        except (OSError, TorporError) as exc:
            _log.warning("keeper_connection_lost", error=str(exc))
        finally:
            receiver.close()
            for buffer in held.values():
                self._release(buffer)
            conn.close()

    def _handle(
        self, message: dict[str, Any], fds: list[int], held: dict[str, HostBuffer]
    ) -> dict[str, Any]:
        op = message.get("op")
        if op == "hello":
            return {"pid": os.getpid(), "device": self.device, "held_bytes": self._held_bytes}
        name = message.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidArgument(f"{op} needs a name", reason="BAD_MESSAGE")
        if op == "hold":
            return self._hold(name, _size(message, "nbytes"), _take(fds, 1), held)
        if op == "fill":
            return self._fill(held, name, message, fds)
        if op == "drop":
            buffer = held.pop(name, None)
            if buffer is not None:
                self._release(buffer)
            return {"dropped": buffer is not None}
        raise InvalidArgument(f"unknown keeper request {op!r}", reason="BAD_MESSAGE")

    def _hold(
        self, name: str, nbytes: int, fds: list[int], held: dict[str, HostBuffer]
    ) -> dict[str, Any]:
        start = time.perf_counter()
        old = held.pop(name, None)
        if old is not None:
            self._release(old)
        buffer = HostBuffer(nbytes, pinner=self._pinner, fd=fds.pop())
        held[name] = buffer
        with self._lock:
            self._held_bytes += nbytes
        seconds = time.perf_counter() - start
        _log.info("keeper_holds", name=name, nbytes=nbytes, seconds=round(seconds, 3))
        return {"seconds": seconds, "pinned": buffer.pinned}

    def _fill(
        self, held: dict[str, HostBuffer], name: str, message: dict[str, Any], fds: list[int]
    ) -> dict[str, Any]:
        buffer = held.get(name)
        if buffer is None:
            raise NotFound(f"the keeper holds no copy named {name!r}", reason="NOT_HELD")
        nbytes = _size(message, "nbytes")
        sizes = message.get("sizes")
        if (
            not isinstance(sizes, list)
            or not sizes
            or not all(isinstance(n, int) and n > 0 for n in sizes)
            or len(sizes) != len(fds)
            or sum(sizes) < nbytes
            or nbytes > buffer.nbytes
        ):
            raise InvalidArgument(
                f"fill needs one positive size per descriptor ({len(fds)}) covering "
                f"{nbytes} bytes of a {buffer.nbytes}-byte copy",
                reason="BAD_MESSAGE",
            )
        start = time.perf_counter()
        arena = Arena(f"keeper-{name}", sum(sizes), self.backend, handle_bytes=sizes[0])
        try:
            allocations: list[Allocation] = []
            try:
                while fds:
                    allocations.append(self.backend.adopt(fds.pop(0), sizes[len(allocations)]))
            except BaseException:  # those adopted so far are in no arena yet
                for allocation in allocations:
                    with contextlib.suppress(TorporError):
                        self.backend.release(allocation)
                raise
            arena.adopt(allocations)  # which releases them all if it fails
            mapped = time.perf_counter()
            buffer.copy_to(arena, nbytes)
            copied = time.perf_counter()
        finally:
            arena.close()
        seconds = time.perf_counter() - start
        return {
            "bytes": nbytes,
            "seconds": seconds,
            "map_s": mapped - start,
            "copy_s": copied - mapped,
            "gbps": nbytes / (copied - mapped) / 1e9 if copied > mapped else 0.0,
        }

    def _release(self, buffer: HostBuffer) -> None:
        with self._lock:
            self._held_bytes -= buffer.nbytes
        buffer.close()


def _size(message: dict[str, Any], key: str) -> int:
    value = message.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise InvalidArgument(f"{key} must be a positive int, got {value!r}", reason="BAD_MESSAGE")
    return value


def _take(fds: list[int], count: int) -> list[int]:
    """Exactly `count` descriptors, taken from `fds` (InvalidArgument otherwise)."""
    if len(fds) != count:
        raise InvalidArgument(
            f"expected {count} descriptor(s), got {len(fds)}", reason="BAD_MESSAGE"
        )
    taken = fds[:]
    fds.clear()
    return taken


def _error(exc: TorporError) -> dict[str, Any]:
    return {"ok": False, "code": exc.code.value, "reason": exc.reason, "error": exc.message}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="torpor-keeper", description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True, type=Path, help="Unix socket to serve on")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    log.configure(json=True, level=args.log_level, stream=sys.stderr)
    try:
        keeper = Keeper(args.socket, args.device)
        keeper.listen()
    except TorporError as exc:
        _log.error("keeper_failed", error=str(exc), reason=exc.reason)
        return 1
    signal.signal(signal.SIGTERM, lambda *_: keeper.stop())
    _log.info("keeper_ready", socket=str(args.socket), device=args.device, pid=os.getpid())
    print("ready", flush=True)
    keeper.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
