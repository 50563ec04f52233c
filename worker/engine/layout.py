"""Where the engine's large state lives: named tensors at fixed offsets in one region.

The engine never allocates its weights or KV cache itself. It describes what it needs as a
`Layout` (names, shapes, dtypes, offsets in one flat byte region) and asks a `Placement` for
memory. The default placement is one ordinary device buffer per region; the pager's
placement backs a region with an arena whose virtual addresses survive suspend and resume.
This is the one seam between model code and the pager.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from torpor.errors import InvalidArgument

# Offsets are aligned so every view is aligned for any dtype and for vectorized kernels.
DEFAULT_ALIGNMENT = 256

_DTYPE_NAMES = {
    torch.float32: "float32",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
    torch.float8_e4m3fn: "float8_e4m3fn",
    torch.uint8: "uint8",
    torch.int64: "int64",
}
_DTYPES_BY_NAME = {v: k for k, v in _DTYPE_NAMES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES[dtype]


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _DTYPES_BY_NAME[name]
    except KeyError:
        raise InvalidArgument(f"unknown tensor dtype {name!r}", reason="BAD_DTYPE") from None


@dataclass(frozen=True)
class TensorSpec:
    """A tensor the engine needs: its name, shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * self.dtype.itemsize


@dataclass(frozen=True)
class LayoutEntry:
    """A tensor placed at `offset` bytes from the start of its region."""

    spec: TensorSpec
    offset: int

    @property
    def end(self) -> int:
        return self.offset + self.spec.nbytes


@dataclass(frozen=True)
class Layout:
    """Named tensors packed into one flat region of `nbytes` bytes."""

    region: str
    entries: tuple[LayoutEntry, ...]
    nbytes: int
    alignment: int = DEFAULT_ALIGNMENT

    @classmethod
    def plan(
        cls, region: str, specs: Iterable[TensorSpec], alignment: int = DEFAULT_ALIGNMENT
    ) -> Layout:
        entries: list[LayoutEntry] = []
        offset = 0
        seen: set[str] = set()
        for spec in specs:
            if spec.name in seen:
                raise ValueError(f"duplicate tensor {spec.name!r} in region {region!r}")
            seen.add(spec.name)
            entries.append(LayoutEntry(spec, offset))
            offset = _align(offset + spec.nbytes, alignment)
        return cls(region, tuple(entries), max(offset, alignment), alignment)

    def views(self, base: torch.Tensor) -> dict[str, torch.Tensor]:
        """Tensors for every entry, as views into `base` (a flat uint8 tensor of nbytes)."""
        if base.dtype != torch.uint8 or base.dim() != 1 or base.numel() < self.nbytes:
            raise ValueError(
                f"region {self.region!r} needs a flat uint8 buffer of {self.nbytes} bytes, "
                f"got {base.dtype} {tuple(base.shape)}"
            )
        return {
            e.spec.name: base[e.offset : e.end].view(e.spec.dtype).view(e.spec.shape)
            for e in self.entries
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "region": self.region,
            "nbytes": self.nbytes,
            "alignment": self.alignment,
            "tensors": [
                {
                    "name": e.spec.name,
                    "offset": e.offset,
                    "shape": list(e.spec.shape),
                    "dtype": dtype_name(e.spec.dtype),
                }
                for e in self.entries
            ],
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Layout:
        entries = tuple(
            LayoutEntry(
                TensorSpec(t["name"], tuple(t["shape"]), dtype_from_name(t["dtype"])),
                int(t["offset"]),
            )
            for t in raw["tensors"]
        )
        return cls(str(raw["region"]), entries, int(raw["nbytes"]), int(raw["alignment"]))


class Placement(Protocol):
    """Provides the memory of a region. Implemented by the default device placement and by
    the pager (arenas with stable virtual addresses)."""

    def place(self, layout: Layout) -> dict[str, torch.Tensor]:
        """Memory for every tensor of `layout`, as views at the layout's offsets."""
        ...


class DevicePlacement:
    """One ordinary torch buffer per region on a device (no paging)."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.buffers: dict[str, torch.Tensor] = {}

    def place(self, layout: Layout) -> dict[str, torch.Tensor]:
        buffer = torch.empty(layout.nbytes, dtype=torch.uint8, device=self.device)
        self.buffers[layout.region] = buffer
        return layout.views(buffer)


def _align(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment
