"""Measure the snapshot store on this machine: chunk write and verified read rates, and the
catalog's cost per chunk (docs/STORE.md quotes the figures).

    .venv/bin/python bench/store_rate.py [--dir /path/on/nvme] [--mib 1024]

Writes a snapshot of `--mib` MiB in 64 MiB chunks (each durably: write, fsync, rename,
fsync of the directory, catalog row), reads it back verified, then writes 500 tiny chunks
to isolate the per-chunk catalog cost. Reads come from the page cache unless the data set
is larger than memory, so the read figure is the verification-bound ceiling.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from torpor.log import configure
from torpor.store.catalog import Catalog
from torpor.store.records import ModelRegistration
from torpor.store.schema import DType
from torpor.store.snapshots import SnapshotStore
from torpor.store.store_config import CatalogConfig, SnapshotStoreConfig

CHUNK = 64 * 1024**2


def open_store(work: Path) -> SnapshotStore:
    (work / "models" / "m").mkdir(parents=True)
    catalog = Catalog.open(CatalogConfig.in_state_dir(work, model_roots=(work / "models",)))
    catalog.register_model(
        ModelRegistration("bench", str(work / "models" / "m"), DType.BFLOAT16, 1, 16)
    )
    config = SnapshotStoreConfig(root=work / "chunks", capacity_bytes=1 << 50)
    return SnapshotStore.open(catalog, config)


def bench_bulk(store: SnapshotStore, mib: int) -> None:
    pieces = [os.urandom(CHUNK) for _ in range(max(1, mib * 1024**2 // CHUNK))]
    total = len(pieces) * CHUNK
    start = time.perf_counter()
    with store.begin("bench", "fp", reserve_bytes=total) as w:
        for piece in pieces:
            w.add_chunk(piece)
        info = w.commit({})
    wrote = time.perf_counter() - start
    buf = memoryview(bytearray(CHUNK))
    start = time.perf_counter()
    with store.reading(info.id) as contents:
        for ref in contents.chunks:
            store.read_chunk_into(info.id, ref, buf)
    read = time.perf_counter() - start
    print(f"write {total / 2**20:.0f} MiB in 64 MiB chunks: {total / wrote / 1e9:.2f} GB/s")
    print(f"verified read (page cache): {total / read / 1e9:.2f} GB/s")


def bench_catalog(store: SnapshotStore, count: int = 500) -> None:
    start = time.perf_counter()
    with store.begin("bench", "fp", reserve_bytes=count * 16) as w:
        for i in range(count):
            w.add_chunk(i.to_bytes(16, "little"))
        w.commit({})
    per = (time.perf_counter() - start) / count
    print(f"per-chunk overhead (16-byte chunks, file + catalog): {per * 1e3:.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: tmp)")
    parser.add_argument("--mib", type=int, default=1024)
    args = parser.parse_args()
    configure(json=True, level="warning")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        store = open_store(Path(tmp))
        print(f"{os.cpu_count()} CPUs, store in {tmp}")
        bench_bulk(store, args.mib)
        bench_catalog(store)
        store.catalog.close()


if __name__ == "__main__":
    main()
