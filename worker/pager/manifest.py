"""What a disk snapshot of a runtime is: a manifest plus content-addressed chunks.

The manifest records everything a new worker needs to rebuild the runtime without the
source checkpoint: the arena layouts (tensor names, offsets, shapes, dtypes), the engine
options, the model's small files (config and tokenizer), the addresses the arenas had, the
environment the bytes were made in, and the chunks of the weights region in offset order.
Chunk boundaries follow tensor boundaries, so snapshots that share tensors share chunks.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import device as Device

import torpor
from torpor.checkpoint_files import SMALL_FILES
from torpor.errors import FailedPrecondition
from torpor.store.chunks import ChunkRef
from torpor.worker.engine.layout import Layout

FORMAT_VERSION = 1
MODEL_FILES = SMALL_FILES


@dataclass(frozen=True)
class Environment:
    """Where snapshot bytes were made; a snapshot restores only into a compatible one."""

    format: int
    torpor: str
    torch: str  # major.minor
    cuda: str | None  # major version of the CUDA runtime torch was built with
    backend: str  # cpu | cuda
    gpu: str | None  # device name, for CUDA

    @classmethod
    def current(cls, device: Device) -> Environment:
        cuda = torch.version.cuda.split(".")[0] if torch.version.cuda else None
        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
        minor = ".".join(torch.__version__.split("+")[0].split(".")[:2])
        return cls(FORMAT_VERSION, torpor.__version__, minor, cuda, device.type, gpu)

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
    weights: Layout
    kv: Layout
    addresses: Mapping[str, int]
    files: Mapping[str, ChunkRef]
    pieces: tuple[Piece, ...]
    model: Mapping[str, Any] = field(default_factory=dict)  # a summary of config.json

    @property
    def weight_bytes(self) -> int:
        return sum(p.ref.size for p in self.pieces)

    @property
    def chunks(self) -> list[ChunkRef]:
        """Every chunk the snapshot references (files first, then weights in order)."""
        return [*self.files.values(), *(p.ref for p in self.pieces)]

    def check_restorable(self, here: Environment, layout: Layout) -> None:
        """Raise FailedPrecondition (SNAPSHOT_INCOMPATIBLE) unless this snapshot's bytes fit
        this environment and the weight layout the engine would build here."""
        problems = self.environment.problems_restoring_into(here)
        if layout.to_json() != self.weights.to_json():
            problems.append("the engine's weight layout differs from the snapshot's")
        if problems:
            raise FailedPrecondition(
                "snapshot cannot be restored here: " + "; ".join(problems),
                reason="SNAPSHOT_INCOMPATIBLE",
                metadata={"snapshot": self.environment.fingerprint(), "here": here.fingerprint()},
            )

    def to_json(self) -> dict[str, Any]:
        return {
            # Readers without torch (torpord) take the fingerprint and the chunk list from here.
            "fingerprint": self.environment.fingerprint(),
            "environment": self.environment.__dict__,
            "dtype": self.dtype,
            "max_batch": self.max_batch,
            "max_seq_len": self.max_seq_len,
            "weights": self.weights.to_json(),
            "kv": self.kv.to_json(),
            "addresses": dict(self.addresses),
            "files": {name: [r.hash, r.size] for name, r in self.files.items()},
            "pieces": [[p.offset, p.ref.hash, p.ref.size] for p in self.pieces],
            "model": dict(self.model),
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> SnapshotManifest:
        return cls(
            environment=Environment(**raw["environment"]),
            dtype=str(raw["dtype"]),
            max_batch=int(raw["max_batch"]),
            max_seq_len=int(raw["max_seq_len"]),
            weights=Layout.from_json(raw["weights"]),
            kv=Layout.from_json(raw["kv"]),
            addresses={k: int(v) for k, v in raw["addresses"].items()},
            files={k: ChunkRef(h, int(n)) for k, (h, n) in raw["files"].items()},
            pieces=tuple(Piece(int(o), ChunkRef(h, int(n))) for o, h, n in raw["pieces"]),
            model=dict(raw.get("model", {})),
        )

    def dumps(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True)

    @classmethod
    def loads(cls, text: str) -> SnapshotManifest:
        return cls.from_json(json.loads(text))
