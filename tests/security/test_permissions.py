"""Files are private by default (issue 12): with a umask of 022 and no systemd UMask,
torpord still creates its state directory, store directories and lock directories 0700 and
its files (catalog.db and its -wal/-shm, chunk files, lock files) 0600, so a snapshot of a
0600 checkpoint is not world-readable. Real torpord, real worker, a real snapshot."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon.conftest import Torpord, call, start_torpord
from tests.security.conftest import MAX_SEQ_LEN
from torpor.scheduler.footprint import estimate
from torpor.v1 import admin_pb2, common_pb2


@pytest.fixture
def loose_umask() -> Iterator[None]:
    old = os.umask(0o022)  # torpord inherits it: what a shell or `make run` gives
    yield
    os.umask(old)


@pytest.fixture
def snapshotted(tmp_path: Path, roots: tuple[Path, Path], loose_umask: None) -> Iterator[Torpord]:
    """A torpord (state dir not yet created) that has written a snapshot of a model whose
    files are all 0600."""
    root, _ = roots
    for f in (root / "demo").iterdir():
        f.chmod(0o600)
    need = estimate(root / "demo", "float32", 4, MAX_SEQ_LEN, cuda=False).resident
    d = start_torpord(tmp_path / "state", root, memory=max(16 << 20, 3 * need))
    try:
        d.register("demo", root / "demo", max_seq_len=MAX_SEQ_LEN)
        d.generate("demo", [1, 2, 3], max_tokens=2)
        evict = admin_pb2.EvictRequest(model="demo", to_tier=common_pb2.TIER_DISK)
        call(d.admin.Evict, evict, timeout=120)
        yield d
    finally:
        assert d.stop() == 0


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_state_is_private_whatever_the_umask(snapshotted: Torpord) -> None:
    state = snapshotted.state_dir
    store = state / "snapshots"
    dirs = [state, store, *(p for p in store.rglob("*") if p.is_dir())]
    files = [p for p in [*state.glob("catalog.db*"), *store.rglob("*")] if p.is_file()]
    chunks = [p for p in (store / "chunks").rglob("*") if p.is_file()]
    assert chunks, "the snapshot wrote no chunk files"
    assert any(p.name == "catalog.db" for p in files)
    loose = {str(p): oct(_mode(p)) for p in dirs if _mode(p) != 0o700}
    loose |= {str(p): oct(_mode(p)) for p in files if _mode(p) != 0o600}
    assert loose == {}


def test_api_socket_keeps_its_group_mode(snapshotted: Torpord) -> None:
    """daemon.socket_mode (0660, for the operators' group) is not narrowed by the above."""
    assert _mode(snapshotted.socket) == 0o660
