"""A snapshot writer run as a real subprocess by the crash tests, which SIGKILL it.

    python -m tests.store.writer_child URL ROOT TRIAL COUNT [MODE]   (from the repository root)

Writes COUNT snapshots of crash trial TRIAL (contents from tests.store.helpers, so the parent
can check them) and prints one line per step, flushed, so the parent can kill it at a
chosen step:  `ready`, `begun <id>`, `tensor <id> <j>`, `committed <id>`, `done`.
MODE `exit-while-writing` instead begins one snapshot, adds a tensor and exits at once
without aborting (a writer that dies quietly).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from tests.store.helpers import FINGERPRINT, MODEL, crash_snapshot_tensors
from torpor.log import configure
from torpor.store.catalog import Catalog
from torpor.store.snapshots import SnapshotStore
from torpor.store.store_config import CatalogConfig, SnapshotStoreConfig

CHUNK_BYTES = 256 * 1024
CAPACITY = 1 << 30


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main() -> None:
    url, root, trial, count = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    mode = sys.argv[5] if len(sys.argv) > 5 else "write"
    configure(json=True, level="warning", stream=sys.stderr)
    catalog = Catalog.open(CatalogConfig(url=url), upgrade=False)
    config = SnapshotStoreConfig(root=root, capacity_bytes=CAPACITY, max_chunk_bytes=CHUNK_BYTES)
    store = SnapshotStore(catalog, config)  # no scrub: the parent owns recovery
    say("ready")
    if mode == "exit-while-writing":
        writer = store.begin(MODEL, FINGERPRINT, reserve_bytes=0)
        writer.add_tensor(b"x" * 1000)
        say(f"begun {writer.id}")
        os._exit(0)
    for k in range(count):
        tensors = crash_snapshot_tensors(trial, k)
        with store.begin(MODEL, FINGERPRINT, reserve_bytes=sum(map(len, tensors))) as w:
            say(f"begun {w.id}")
            for j, tensor in enumerate(tensors):
                w.add_tensor(tensor)
                say(f"tensor {w.id} {j}")
            w.commit({"trial": trial, "k": k})
        say(f"committed {w.id}")
    say("done")


if __name__ == "__main__":
    main()
