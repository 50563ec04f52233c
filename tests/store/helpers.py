"""Helpers shared by the store tests and the crash-test writer subprocess."""

from __future__ import annotations

import os
import random
import select
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from torpor.store.records import ModelRegistration
from torpor.store.schema import DType
from torpor.store.snapshots import SnapshotStore

MODEL = "llama-test:1b"
FINGERPRINT = "cpu|test|v1"

StoreFactory = Callable[..., SnapshotStore]
"""`make_store(capacity=..., max_chunk=..., root=...)` of conftest."""


def make_spec(model_root: Path, **overrides: object) -> ModelRegistration:
    """A valid spec of the test model (checkpoint `ckpt` under the root), with overrides."""
    fields: dict[str, object] = {
        "name": MODEL,
        "source_path": str(model_root / "ckpt"),
        "dtype": DType.BFLOAT16,
        "max_batch": 8,
        "max_seq_len": 4096,
    }
    fields.update(overrides)
    return ModelRegistration(**fields)  # type: ignore[arg-type]


class FakeClock:
    """A clock the test moves by hand (the catalog takes it as `clock`)."""

    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float = 1.0) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now


def blob(seed: str, size: int) -> bytes:
    """Deterministic pseudo-random bytes for a seed."""
    return random.Random(seed).randbytes(size)


def crash_snapshot_tensors(trial: int, k: int) -> list[bytes]:
    """The tensors of snapshot `k` of crash trial `trial`.

    Even-numbered tensors are the same in every snapshot (they dedup); odd ones are unique.
    Sizes span tiny to several chunks of the crash test's 256 KiB chunk size.
    """
    tensors = []
    for j in range(6):
        seed = f"shared:{j}" if j % 2 == 0 else f"{trial}:{k}:{j}"
        size = random.Random(f"size:{seed}").randrange(1, 1_500_000)
        tensors.append(blob(seed, size))
    return tensors


@dataclass
class LineReader:
    """Reads lines from a child's stdout, failing at a deadline instead of hanging."""

    proc: subprocess.Popen[bytes]
    deadline_s: float = 60.0
    _buffer: bytes = b""

    def readline(self) -> str | None:
        """The next line, or None at end of file."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + self.deadline_s
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"child printed no line within {self.deadline_s} s")
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                continue
            data = os.read(fd, 65536)
            if not data:
                return None
            self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()


def read_all(store: SnapshotStore, snapshot_id: str) -> list[bytes]:
    """Every chunk of a snapshot, verified, as a restore reads them (under `reading`)."""
    out = []
    with store.reading(snapshot_id) as contents:
        for ref in contents.chunks:
            buf = bytearray(ref.size)
            store.read_chunk_into(snapshot_id, ref, memoryview(buf))
            out.append(bytes(buf))
    return out
