"""The disk-restore pipeline: ordering, verification, and no deadlock however reads finish."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from torpor.errors import DataLoss
from torpor.store.chunks import ChunkStore
from torpor.worker.pager.manifest import Piece
from torpor.worker.pager.stream import StagingRing, stream_pieces


def pieces_in(store: ChunkStore, sizes: list[int], seed: int) -> tuple[list[Piece], torch.Tensor]:
    rng = random.Random(seed)
    data = torch.tensor([rng.randrange(256) for _ in range(sum(sizes))], dtype=torch.uint8)
    pieces, offset = [], 0
    for size in sizes:
        pieces.append(Piece(offset, store.put(data[offset : offset + size].numpy().data)))
        offset += size
    return pieces, data


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("buffers", "threads"), [(2, 8), (3, 1), (4, 4)])
def test_many_pieces_small_ring(tmp_path: Path, buffers: int, threads: int) -> None:
    store = ChunkStore(tmp_path / "s")
    sizes = [random.Random(i).randrange(1, 20_000) for i in range(150)]
    pieces, data = pieces_in(store, sizes, seed=buffers)
    ring = StagingRing(buffers, max(sizes), None)
    try:
        for _ in range(3):
            seen: list[int] = []
            dst = torch.zeros_like(data)
            stats = stream_pieces(
                pieces, store, dst, ring, threads=threads, direct_io=True, progress=seen.append
            )
            assert torch.equal(dst, data)
            assert stats.bytes == data.numel()
            assert seen[-1] == data.numel() and seen == sorted(seen)
    finally:
        ring.close()


@pytest.mark.timeout(60)
def test_a_bad_chunk_stops_the_stream(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path / "s")
    pieces, data = pieces_in(store, [5000] * 40, seed=1)
    bad = pieces[7]
    path = store.path(bad.ref.hash)
    raw = bytearray(path.read_bytes())
    raw[10] ^= 1
    path.chmod(0o644)
    path.write_bytes(bytes(raw))
    dst = torch.zeros_like(data)
    ring = StagingRing(3, 5000, None)
    try:
        with pytest.raises(DataLoss, match=bad.ref.hash):
            stream_pieces(pieces, store, dst, ring, threads=4, direct_io=True)
        assert not dst[bad.offset : bad.offset + 5000].any()  # never copied
        # The ring is whole again: a good stream right after works.
        path.write_bytes(bytes(raw[:10]) + bytes([raw[10] ^ 1]) + bytes(raw[11:]))
        stream_pieces(pieces, store, dst, ring, threads=4, direct_io=True)
        assert torch.equal(dst, data)
    finally:
        ring.close()


def test_a_missing_chunk_is_data_loss(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path / "s")
    pieces, data = pieces_in(store, [3000] * 5, seed=2)
    store.path(pieces[2].ref.hash).unlink()
    ring = StagingRing(2, 3000, None)
    try:
        with pytest.raises(DataLoss):
            stream_pieces(pieces, store, torch.zeros_like(data), ring, threads=2, direct_io=False)
    finally:
        ring.close()
