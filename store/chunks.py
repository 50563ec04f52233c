"""The content-addressed chunk store: immutable files on local NVMe named by their hash.

This module needs no database, so a worker process can use it directly: the pager writes
chunks with `put` and reads them back with `read_into`, or reads them itself (O_DIRECT into
pinned buffers) and checks them with `verify`. Bytes that fail their hash are never
returned: every read path raises `DataLoss` instead.

Layout under `root` (docs/STORE.md):

    store-id                      identity of this chunk store in a shared catalog
    chunks/ab/cd/<32 hex digits>  one immutable chunk; `ab`, `cd` are its first hex digits
    chunks/ab/cd/.tmp-<hash>-...  a write in progress (or left by a crash: scrub removes it)
    quarantine/<hash>-<time>-...  chunk files that failed verification, kept for inspection

A chunk is written to a temp file in its final directory, fsynced, renamed into place and
the directory fsynced, so a chunk file is either absent or complete after any crash.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import xxhash

from torpor.errors import DataLoss, InvalidArgument, ResourceExhausted, Unavailable
from torpor.log import get_logger
from torpor.store import private

Buffer = bytes | bytearray | memoryview
"""Anything with the buffer protocol that the store accepts (contiguous)."""

HASH_NAME = "xxh3-128"
"""The chunk hash (docs/STORE.md gives the measured rates that chose it)."""

_HASH_HEX = re.compile(r"[0-9a-f]{32}")
_TEMP_PREFIX = ".tmp-"
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# Linux writes at most this much per write(2) call; larger buffers are written in pieces.
_MAX_WRITE = 0x7FFFF000

log = get_logger("store.chunks")


@dataclass(frozen=True, slots=True)
class ChunkRef:
    """A chunk's identity: its xxh3-128 hash (32 lowercase hex digits) and size in bytes."""

    hash: str
    size: int

    def __post_init__(self) -> None:
        check_hash(self.hash)
        if self.size < 0:
            raise InvalidArgument(f"chunk size must not be negative, got {self.size}")


@dataclass(frozen=True, slots=True)
class ChunkScan:
    """What a walk of the chunk directory found (for scrub and garbage collection)."""

    chunks: tuple[ChunkRef, ...]
    """Well-named chunk files, with their size on disk."""
    temps: tuple[Path, ...]
    """Temp files: writes in progress, or left behind by a crash."""
    strays: tuple[Path, ...]
    """Files that are neither (never written by torpor); reported, not deleted."""


def check_hash(digest: str) -> str:
    """Return `digest` if it is a well-formed chunk hash, else raise InvalidArgument.

    Hashes reach paths, so nothing but 32 lowercase hex digits is accepted.
    """
    if not isinstance(digest, str) or _HASH_HEX.fullmatch(digest) is None:
        raise InvalidArgument(
            f"not a chunk hash: {digest!r}; expected 32 lowercase hex digits ({HASH_NAME})",
            reason="INVALID_CHUNK_HASH",
        )
    return digest


def hash_bytes(buf: Buffer) -> str:
    """The chunk hash of `buf`: xxh3-128 as 32 lowercase hex digits."""
    return xxhash.xxh3_128_hexdigest(buf)


def verify(ref: ChunkRef, buf: Buffer, *, path: Path | None = None) -> None:
    """Raise DataLoss (reason CHUNK_CORRUPT) unless `buf` holds exactly the chunk `ref`.

    For readers that fetch chunk bytes themselves (O_DIRECT into pinned memory); pass only
    the `ref.size` bytes of the chunk, not a padded buffer.
    """
    size = memoryview(buf).nbytes
    if size != ref.size:
        raise _corrupt(ref, path, f"size {size} != expected {ref.size}")
    actual = hash_bytes(buf)
    if actual != ref.hash:
        raise _corrupt(ref, path, f"hash mismatch (read {actual})")


def _corrupt(ref: ChunkRef, path: Path | None, problem: str) -> DataLoss:
    return DataLoss(
        f"chunk {ref.hash} is corrupt: {problem}" + (f" at {path}" if path else ""),
        reason="CHUNK_CORRUPT",
        metadata={"hash": ref.hash, "path": path or "", "problem": problem},
    )


class ChunkStore:
    """Immutable, hash-named chunk files under one directory; safe against crashes.

    Thread- and process-safe for concurrent `put`s (the rename is atomic and identical
    content lands on an identical name). Deleting chunks is the business of the snapshot
    store, which coordinates it with writers.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.chunk_dir = self.root / "chunks"
        private.make_dirs(self.chunk_dir)  # 0700 whatever the umask: chunks are weights
        self.store_id = _load_or_create_store_id(self.root)

    def path(self, digest: str) -> Path:
        """Where the chunk named `digest` lives: chunks/ab/cd/<digest>."""
        check_hash(digest)
        return self.chunk_dir / digest[:2] / digest[2:4] / digest

    def has(self, ref: ChunkRef) -> bool:
        """Whether a file of the right size exists for `ref` (contents are not read)."""
        try:
            return self.path(ref.hash).stat().st_size == ref.size
        except FileNotFoundError:
            return False

    def put(self, data: Buffer) -> ChunkRef:
        """Store `data` as a chunk and return its ref; writes nothing if it is already stored.

        Crash-safe: temp file in the final directory, write, fsync, rename, fsync of the
        directory. A full disk raises ResourceExhausted (reason STORE_FULL) and leaves no
        file behind; other I/O errors raise Unavailable (reason STORE_IO_ERROR).
        """
        view = memoryview(data).cast("B")
        ref = ChunkRef(hash_bytes(view), view.nbytes)
        if self.has(ref):
            return ref  # dedup: an existing chunk is never rewritten
        final = self.path(ref.hash)
        try:
            _make_dirs_durable(final.parent, self.chunk_dir)
            tmp = final.parent / f"{_TEMP_PREFIX}{ref.hash}-{os.getpid()}-{secrets.token_hex(4)}"
            _write_durable(tmp, view)
            os.rename(tmp, final)  # atomic; a racing identical put renames identical bytes
            _fsync_dir(final.parent)
        except OSError as exc:
            raise _io_error(exc, ref, final) from exc
        log.debug("chunk_written", hash=ref.hash, size=ref.size)
        return ref

    def read(self, ref: ChunkRef) -> bytes:
        """The verified bytes of chunk `ref`; DataLoss (CHUNK_CORRUPT) if missing or corrupt."""
        path = self.path(ref.hash)
        try:
            with open(path, "rb", buffering=0) as f:
                data = f.readall()
        except FileNotFoundError:
            raise _corrupt(ref, path, "file missing") from None
        verify(ref, data, path=path)
        return data

    def read_into(self, ref: ChunkRef, buf: memoryview) -> None:
        """Read chunk `ref` into `buf` (writable, exactly `ref.size` bytes) and verify it.

        On DataLoss the contents of `buf` are undefined and must not be used.
        """
        view = memoryview(buf).cast("B")
        if view.readonly or view.nbytes != ref.size:
            raise InvalidArgument(
                f"read_into needs a writable buffer of {ref.size} bytes, got "
                f"{view.nbytes} bytes (readonly={view.readonly})",
                reason="BAD_BUFFER",
            )
        path = self.path(ref.hash)
        try:
            with open(path, "rb", buffering=0) as f:
                done = 0
                while done < ref.size:
                    n = f.readinto(view[done:])
                    if not n:
                        raise _corrupt(ref, path, f"file ends at {done} of {ref.size} bytes")
                    done += n
                if f.read(1):
                    raise _corrupt(ref, path, f"file is longer than {ref.size} bytes")
        except FileNotFoundError:
            raise _corrupt(ref, path, "file missing") from None
        verify(ref, view, path=path)

    def quarantine(self, ref: ChunkRef) -> Path | None:
        """Move a chunk file that fails verification to quarantine/, for the operator.

        Then the next write of the same content stores a good copy instead of deduping
        against the bad one. Returns the new path, or None if the file was absent or
        verified good after all (a transient read error).
        """
        try:
            self.read(ref)
            return None
        except DataLoss:
            pass
        source = self.path(ref.hash)
        target_dir = self.root / "quarantine"
        private.make_dir(target_dir)
        target = target_dir / f"{ref.hash}-{int(time.time())}-{secrets.token_hex(4)}"
        try:
            os.rename(source, target)
        except FileNotFoundError:
            return None
        log.error("chunk_quarantined", hash=ref.hash, size=ref.size, path=str(target))
        return target

    def delete(self, digest: str) -> bool:
        """Remove a chunk file; False if it was not there. Only the snapshot store calls this."""
        try:
            self.path(digest).unlink()
        except FileNotFoundError:
            return False
        return True

    def scan(self) -> ChunkScan:
        """Walk chunks/ and classify every file (for scrub and garbage collection)."""
        chunks: list[ChunkRef] = []
        temps: list[Path] = []
        strays: list[Path] = []
        for dirpath, _dirs, files in os.walk(self.chunk_dir):
            for name in files:
                path = Path(dirpath) / name
                if name.startswith(_TEMP_PREFIX):
                    temps.append(path)
                elif _HASH_HEX.fullmatch(name) and path == self.path(name):
                    chunks.append(ChunkRef(name, _size_or_zero(path)))
                else:
                    strays.append(path)
        return ChunkScan(tuple(chunks), tuple(temps), tuple(strays))


def _size_or_zero(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _io_error(exc: OSError, ref: ChunkRef, path: Path) -> Exception:
    meta = {"hash": ref.hash, "size": ref.size, "path": path, "errno": exc.errno}
    if exc.errno in _FULL_ERRNOS:
        return ResourceExhausted(
            f"chunk store is full: writing chunk {ref.hash} ({ref.size} bytes) to {path}: {exc}",
            reason="STORE_FULL",
            metadata=meta,
        )
    return Unavailable(
        f"chunk store I/O error writing {ref.hash} to {path}: {exc}",
        reason="STORE_IO_ERROR",
        metadata=meta,
    )


def _write_durable(path: Path, view: memoryview) -> None:
    """Write `view` to a new file at `path` and fsync it; remove the file on any failure."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, private.PRIVATE_FILE)
    try:
        done = 0
        while done < view.nbytes:
            done += os.write(fd, view[done : done + _MAX_WRITE])
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)


def _make_dirs_durable(directory: Path, top: Path) -> None:
    """Create `directory` (below `top`) and fsync each parent whose entries changed."""
    if directory.is_dir():
        return
    missing: list[Path] = []
    d = directory
    while d != top and not d.is_dir():
        missing.append(d)
        d = d.parent
    for d in reversed(missing):
        if private.make_dir(d):
            _fsync_dir(d.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _load_or_create_store_id(root: Path) -> str:
    """This store's identity, created once; it scopes the store's rows in a shared catalog.

    Chunk files are local to a host, so a catalog shared by several hosts must know whose
    disk holds which chunks. The id lives with the files, so a renamed host keeps its store.
    """
    path = root / "store-id"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    tmp = root / f"{_TEMP_PREFIX}store-id-{os.getpid()}-{secrets.token_hex(4)}"
    _write_durable(tmp, memoryview(f"{uuid.uuid4().hex}\n".encode()))
    try:
        os.link(tmp, path)  # fails if a concurrent opener won: then use theirs
        _fsync_dir(root)
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return path.read_text().strip()
