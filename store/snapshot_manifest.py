"""The snapshot manifest: the one schema of what a disk snapshot of a runtime is.

A worker writes it (worker/pager) and torpord records and reads it (scheduler/), so it lives
here, next to the chunk store, with no torch and no engine import. It records everything a
new worker needs to rebuild the runtime without the source checkpoint: the arena layouts
(the engine's `Layout.to_json()` documents), the engine options, the model's small files
(config and tokenizer), the addresses the arenas had, the environment the bytes were made
in, and the chunks of the weights region in offset order. Chunk boundaries follow tensor
boundaries, so snapshots that share tensors share chunks.

The manifest itself is stored as one more chunk; its hash is the id a worker loads it by.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from torpor.errors import DataLoss, FailedPrecondition, InvalidArgument
from torpor.store.chunks import ChunkRef

FORMAT_VERSION = 1


@dataclass(frozen=True)
class Environment:
    """Where snapshot bytes were made; a snapshot restores only into a compatible one.
    (The worker measures the current one: `torpor.worker.pager.manifest.environment_here`.)"""

    format: int
    torpor: str
    torch: str  # major.minor
    cuda: str | None  # major version of the CUDA runtime torch was built with
    backend: str  # cpu | cuda
    gpu: str | None  # device name, for CUDA

    def fingerprint(self) -> str:
        parts = [f"torpor-snapshot/{self.format}", f"torch{self.torch}", self.backend]
        if self.backend == "cuda":
            parts += [f"cuda{self.cuda}", str(self.gpu)]
        return " ".join(parts)

    def problems_restoring_into(self, here: Environment) -> list[str]:
        """Why bytes made in `self` cannot be restored `here` (empty when they can)."""
        checks = [
            ("snapshot format", self.format, here.format),
            ("torch version", self.torch, here.torch),
            ("backend", self.backend, here.backend),
        ]
        if self.backend == "cuda" and here.backend == "cuda":
            checks += [("CUDA version", self.cuda, here.cuda), ("GPU", self.gpu, here.gpu)]
        return [f"{what}: snapshot {a}, here {b}" for what, a, b in checks if a != b]


@dataclass(frozen=True)
class Piece:
    """A chunk of the weights region: bytes [offset, offset + ref.size)."""

    offset: int
    ref: ChunkRef


@dataclass(frozen=True)
class SnapshotManifest:
    """A runtime's snapshot, enough to rebuild it in a new worker."""

    environment: Environment
    dtype: str
    max_batch: int
    max_seq_len: int
    weights: Mapping[str, Any]
    """The weights region's layout (the engine's `Layout.to_json()`)."""
    kv: Mapping[str, Any]
    """The KV region's layout (never saved: only its shape is)."""
    addresses: Mapping[str, int]
    files: Mapping[str, ChunkRef]
    pieces: tuple[Piece, ...]
    model: Mapping[str, Any] = field(default_factory=dict)  # a summary of config.json

    @property
    def fingerprint(self) -> str:
        return self.environment.fingerprint()

    @property
    def weight_bytes(self) -> int:
        return sum(p.ref.size for p in self.pieces)

    @property
    def largest_piece(self) -> int:
        """The size of its largest weight chunk: what one staging buffer must hold."""
        return max((p.ref.size for p in self.pieces), default=0)

    @property
    def chunks(self) -> list[ChunkRef]:
        """Every chunk the snapshot references (files first, then weights in order)."""
        return [*self.files.values(), *(p.ref for p in self.pieces)]

    def check_restorable(self, here: Environment, layout: Mapping[str, Any]) -> None:
        """Raise FailedPrecondition (SNAPSHOT_INCOMPATIBLE) unless this snapshot's bytes fit
        this environment and the weight layout (`Layout.to_json()`) the engine would build
        here."""
        problems = self.environment.problems_restoring_into(here)
        if dict(layout) != dict(self.weights):
            problems.append("the engine's weight layout differs from the snapshot's")
        if problems:
            raise FailedPrecondition(
                "snapshot cannot be restored here: " + "; ".join(problems),
                reason="SNAPSHOT_INCOMPATIBLE",
                metadata={"snapshot": self.fingerprint, "here": here.fingerprint()},
            )

    def to_json(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint,
            "environment": asdict(self.environment),
            "dtype": self.dtype,
            "max_batch": self.max_batch,
            "max_seq_len": self.max_seq_len,
            "weights": dict(self.weights),
            "kv": dict(self.kv),
            "addresses": dict(self.addresses),
            "files": {name: [r.hash, r.size] for name, r in self.files.items()},
            "pieces": [[p.offset, p.ref.hash, p.ref.size] for p in self.pieces],
            "model": dict(self.model),
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> SnapshotManifest:
        """Parse a manifest document; DataLoss (MANIFEST_INVALID) if it is not one."""
        try:
            return cls(
                environment=Environment(**raw["environment"]),
                dtype=str(raw["dtype"]),
                max_batch=int(raw["max_batch"]),
                max_seq_len=int(raw["max_seq_len"]),
                weights=dict(raw["weights"]),
                kv=dict(raw["kv"]),
                addresses={k: int(v) for k, v in raw["addresses"].items()},
                files={k: ChunkRef(h, int(n)) for k, (h, n) in raw["files"].items()},
                pieces=tuple(Piece(int(o), ChunkRef(h, int(n))) for o, h, n in raw["pieces"]),
                model=dict(raw.get("model", {})),
            )
        except (KeyError, TypeError, ValueError, AttributeError, InvalidArgument) as exc:
            raise DataLoss(f"not a snapshot manifest: {exc!r}", reason="MANIFEST_INVALID") from exc

    def dumps(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True)

    @classmethod
    def loads(cls, text: str) -> SnapshotManifest:
        try:
            raw = json.loads(text)
        except ValueError as exc:
            raise DataLoss(f"not a snapshot manifest: {exc}", reason="MANIFEST_INVALID") from exc
        return cls.from_json(raw)
