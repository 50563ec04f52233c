"""Disk (or unlocked host memory) to device, pipelined: chunk files → a ring of (pinned)
staging buffers → the arena.

Several reader threads each fill a staging buffer with one chunk (O_DIRECT
where the filesystem allows, so the page cache neither slows nor pollutes the restore),
verify its hash, and hand it to the copier. The copier (the calling thread) issues the
host-to-device copy on its own CUDA stream and returns the buffer to the ring once the copy
is done, so reads, hash checks and copies overlap. A chunk that fails its hash never reaches
the destination: the stream stops and raises `DataLoss`, and the caller must treat the
destination as garbage (the runtime falls back to another source).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import itertools
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from torpor.errors import DataLoss, InvalidArgument, Unavailable
from torpor.store.chunks import ChunkStore, verify
from torpor.worker.pager.backend import round_up
from torpor.worker.pager.host import HostBuffer, HostPinner
from torpor.worker.pager.manifest import Piece

_ALIGN = 4096  # O_DIRECT wants the buffer, length and offset aligned to the block size


@dataclass(frozen=True)
class StreamStats:
    """What a restore from disk moved, and how fast."""

    bytes: int
    seconds: float
    direct_io: bool

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


_staging_lock = threading.Lock()
_staging_bytes = 0


def staging_bytes() -> int:
    """Host bytes of the staging rings alive in this process now (pinned on CUDA): read-only
    observability for Worker.Status, which the ledger test (tests/ledger) compares with
    torpord's host budget."""
    return _staging_bytes


def _count_staging(delta: int) -> None:
    global _staging_bytes
    with _staging_lock:
        _staging_bytes += delta


class StagingRing:
    """A fixed set of host buffers for the disk path, pinned when the target is a GPU."""

    @classmethod
    def within(cls, limit: int, count: int, piece: int, pinner: HostPinner | None) -> StagingRing:
        """A ring of up to `count` buffers, each the size of the largest piece it stages
        (`piece`), no more of them than `limit` bytes hold (0: no limit). torpord sends the
        limit (WorkerLoadRequest.staging_bytes) and counts it in its host budget; a limit
        smaller than one piece is INVALID_ARGUMENT (STAGING_TOO_SMALL)."""
        nbytes = round_up(max(piece, _ALIGN), _ALIGN)
        if limit > 0:
            count = min(count, limit // nbytes)
            if count < 1:
                raise InvalidArgument(
                    f"staging limit {limit} B is smaller than one {nbytes} B piece",
                    reason="STAGING_TOO_SMALL",
                    metadata={"staging_bytes": limit, "piece_bytes": nbytes},
                )
        return cls(count, nbytes, pinner)

    def __init__(self, count: int, nbytes: int, pinner: HostPinner | None) -> None:
        self.nbytes = round_up(max(nbytes, _ALIGN), _ALIGN)
        self.buffers: list[HostBuffer] = []
        try:
            for _ in range(count):
                self.buffers.append(HostBuffer(self.nbytes, pinner=pinner))
                _count_staging(self.nbytes)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        buffers, self.buffers = self.buffers, []
        for buf in buffers:
            buf.close()
            _count_staging(-self.nbytes)


def stream_pieces(
    pieces: Sequence[Piece],
    store: ChunkStore,
    dst: torch.Tensor,
    ring: StagingRing,
    *,
    threads: int,
    direct_io: bool,
    progress: Callable[[int], None] | None = None,
) -> StreamStats:
    """Fill `dst` (a flat uint8 tensor) with every piece, verified; raise DataLoss on a bad
    chunk (nothing unverified is ever copied into `dst`)."""
    start = time.perf_counter()
    used_direct = [direct_io]

    def read(piece: Piece, buf: HostBuffer) -> None:
        view = buf.tensor.numpy().data[: round_up(piece.ref.size, _ALIGN)]
        used_direct[0] &= _read_file(store.path(piece.ref.hash), view, direct_io)
        verify(piece.ref, view[: piece.ref.size], path=store.path(piece.ref.hash))

    jobs = [_Job(p.offset, p.ref.size, functools.partial(read, p)) for p in pieces]
    done = _pipeline(jobs, dst, ring, threads, progress)
    return StreamStats(done, time.perf_counter() - start, used_direct[0])


def read_pieces_to_host(
    pieces: Sequence[Piece],
    store: ChunkStore,
    dst: torch.Tensor,
    *,
    threads: int,
    direct_io: bool,
    progress: Callable[[int], None] | None = None,
) -> StreamStats:
    """Fill `dst` (a flat uint8 tensor in host memory) with every piece, each read straight
    into its place and verified there: no staging buffer. O_DIRECT where a piece's place and
    length are block-aligned. DataLoss on a bad chunk: the caller must treat `dst` as
    garbage."""
    start = time.perf_counter()
    view = dst.numpy().data
    base_aligned = dst.data_ptr() % _ALIGN == 0
    used_direct = [direct_io]
    done = [0]
    lock = threading.Lock()

    def read(piece: Piece) -> None:
        size = piece.ref.size
        place = view[piece.offset : piece.offset + size]
        aligned = base_aligned and piece.offset % _ALIGN == 0 and size % _ALIGN == 0
        path = store.path(piece.ref.hash)
        direct = _read_file(path, place, direct_io and aligned)
        verify(piece.ref, place, path=path)
        with lock:
            used_direct[0] &= direct
            done[0] += size
            if progress is not None:
                progress(done[0])

    with ThreadPoolExecutor(threads, thread_name_prefix="read") as pool:
        for future in [pool.submit(read, p) for p in pieces]:
            future.result()  # the first error, in piece order
    return StreamStats(done[0], time.perf_counter() - start, used_direct[0])


class HostStager:
    """Host memory that is not page-locked → pinned staging buffers → the device, with
    several threads copying into the staging buffers while earlier ones are on their way.

    A deep-suspended runtime's host copy is unlocked (the driver's checkpoint would
    otherwise take about 25 ms per GB of it, each way); this brings it back without locking
    it first. Call it as a `Stage`. The copies into staging are `memmove`s, which run
    without the GIL.
    """

    def __init__(self, threads: int, ring: StagingRing) -> None:
        self.threads = threads
        self.ring = ring  # threads + 2 buffers are enough to keep every thread busy

    def __call__(
        self, src: torch.Tensor, dst: torch.Tensor, spans: Sequence[tuple[int, int]]
    ) -> None:
        base = src.data_ptr()
        step = self.ring.nbytes

        def fill(offset: int, n: int, buf: HostBuffer) -> None:
            ctypes.memmove(buf.address, base + offset, n)

        jobs = []
        for offset, size in spans:
            for o in range(offset, offset + size, step):
                n = min(step, offset + size - o)
                jobs.append(_Job(o, n, functools.partial(fill, o, n)))
        _pipeline(jobs, dst, self.ring, self.threads, None)

    def close(self) -> None:
        self.ring.close()


class DeviceDrainer:
    """The device → pinned staging buffers → host memory that is not page-locked: the way
    `HostStager` comes back, for an exchange swap's outgoing side, whose new host pages are
    not locked (locking them as they are taken would run at the driver's pinning speed,
    about 2 GB/s; exchange.py). Each buffer is filled on a side stream and emptied by a
    thread's `memmove` once its copy is done, while the next buffers are being filled."""

    def __init__(self, threads: int, ring: StagingRing) -> None:
        self.threads = threads
        self.ring = ring

    def __call__(
        self, src: torch.Tensor, dst: torch.Tensor, spans: Sequence[tuple[int, int]]
    ) -> None:
        """Copy `spans` of the device tensor `src` to the same offsets of the host `dst`;
        returns when every byte is in `dst`."""
        cuda = src.device.type == "cuda"
        stream = torch.cuda.Stream(src.device) if cuda else None
        if stream is not None:  # after whatever the caller queued on its stream
            stream.wait_stream(torch.cuda.current_stream(src.device))
        base, step = dst.data_ptr(), self.ring.nbytes

        def empty(offset: int, n: int, buf: HostBuffer, done: object) -> HostBuffer:
            if done is not None:
                done.synchronize()  # type: ignore[attr-defined]
            ctypes.memmove(base + offset, buf.address, n)
            return buf

        free: deque[HostBuffer] = deque(self.ring.buffers)
        pending: deque[Future[HostBuffer]] = deque()
        with ThreadPoolExecutor(self.threads, thread_name_prefix="drain") as pool:
            try:
                for offset, size in spans:
                    for o in range(offset, offset + size, step):
                        n = min(step, offset + size - o)
                        if not free:
                            free.append(pending.popleft().result())
                        buf = free.popleft()
                        done = None
                        if stream is not None:
                            with torch.cuda.stream(stream):
                                buf.tensor[:n].copy_(src[o : o + n], non_blocking=True)
                                done = torch.cuda.Event()
                                done.record()
                        else:
                            buf.tensor[:n].copy_(src[o : o + n])
                        pending.append(pool.submit(empty, o, n, buf, done))
                while pending:
                    pending.popleft().result()
            except BaseException:
                for future in pending:
                    future.cancel()
                if stream is not None:
                    stream.synchronize()  # no copy may still write into a ring buffer
                raise

    def close(self) -> None:
        self.ring.close()


@dataclass(frozen=True)
class _Job:
    """`nbytes` for `dst[offset:]`, put into a staging buffer by `fill`."""

    offset: int
    nbytes: int
    fill: Callable[[HostBuffer], None]


def _pipeline(
    jobs: Sequence[_Job],
    dst: torch.Tensor,
    ring: StagingRing,
    threads: int,
    progress: Callable[[int], None] | None,
) -> int:
    """Run `jobs` on `threads` fillers and copy each staged buffer to `dst`, in order.

    Only this thread hands out staging buffers, in job order, and at most one per buffer of
    the ring is in flight; fillers never wait for a buffer, so an in-order consumer can
    never deadlock with fillers that finished out of order.
    """
    copier = _Copier(dst, ring)

    def run(job: _Job, buf: HostBuffer) -> tuple[_Job, HostBuffer]:
        job.fill(buf)
        return job, buf

    done = 0
    inflight: deque[Future[tuple[_Job, HostBuffer]]] = deque()
    todo = iter(jobs)
    with ThreadPoolExecutor(threads, thread_name_prefix="stage") as pool:
        try:
            for job in itertools.islice(todo, len(ring.buffers)):
                inflight.append(pool.submit(run, job, copier.take()))
            while inflight:
                job, buf = inflight.popleft().result()
                copier.copy(job.offset, job.nbytes, buf)
                done += job.nbytes
                if progress is not None:
                    progress(done)
                following = next(todo, None)
                if following is not None:
                    inflight.append(pool.submit(run, following, copier.take()))
            copier.finish()
        except BaseException:
            for future in inflight:
                future.cancel()
            copier.finish()
            raise
    return done


class _Copier:
    """Host-to-device copies on a side stream; hands out the ring's buffers, each one again
    once its copy is done."""

    def __init__(self, dst: torch.Tensor, ring: StagingRing) -> None:
        self.dst = dst
        self.free = deque(ring.buffers)
        self.cuda = dst.device.type == "cuda"
        self.stream = torch.cuda.Stream(dst.device) if self.cuda else None
        if self.stream is not None:  # after what the caller queued on its stream (a map)
            self.stream.wait_stream(torch.cuda.current_stream(dst.device))
        self.copying: deque[tuple[torch.cuda.Event, HostBuffer]] = deque()

    def take(self) -> HostBuffer:
        if not self.free:  # every buffer is being copied from: wait for the oldest copy
            event, buf = self.copying.popleft()
            event.synchronize()
            self.free.append(buf)
        return self.free.popleft()

    def copy(self, offset: int, n: int, buf: HostBuffer) -> None:
        target = self.dst[offset : offset + n]
        if not self.cuda:
            target.copy_(buf.tensor[:n])
            self.free.append(buf)
            return
        assert self.stream is not None
        with torch.cuda.stream(self.stream):
            target.copy_(buf.tensor[:n], non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        self.copying.append((done, buf))

    def finish(self) -> None:
        while self.copying:
            event, buf = self.copying.popleft()
            event.synchronize()
            self.free.append(buf)


def _read_file(path: os.PathLike[str] | str, view: memoryview, direct_io: bool) -> bool:
    """Read a whole chunk file into `view` (aligned, at least the file size rounded up);
    return whether O_DIRECT was used."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECT", 0) if direct_io else 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.EINVAL and direct_io:  # the filesystem refuses O_DIRECT
            return _read_file(path, view, direct_io=False)
        if exc.errno == errno.ENOENT:
            raise DataLoss(f"chunk file {path} is missing", reason="CHUNK_MISSING") from exc
        raise Unavailable(f"cannot open chunk {path}: {exc}", reason="STORE_IO_ERROR") from exc
    try:
        got = 0
        while got < len(view):
            n = os.readv(fd, [view[got:]])
            if n == 0:
                break
            got += n
    except OSError as exc:
        if exc.errno == errno.EINVAL and direct_io:
            os.close(fd)
            fd = -1
            return _read_file(path, view, direct_io=False)
        raise Unavailable(f"cannot read chunk {path}: {exc}", reason="STORE_IO_ERROR") from exc
    finally:
        if fd >= 0:
            os.close(fd)
    return direct_io
