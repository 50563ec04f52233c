"""Hangs and wedged models (issue 12): a real torpord on the CPU backend, with corrupt
chunks and workers killed in the middle of their transitions. Every request must end, and
the model must serve correct tokens afterwards."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.daemon.conftest import Torpord, call
from torpor.v1 import admin_pb2, common_pb2

PROMPT = [5, 17, 42, 99, 7]
TRANSITIONAL = (
    common_pb2.RUNTIME_STATE_LOADING,
    common_pb2.RUNTIME_STATE_SUSPENDING,
    common_pb2.RUNTIME_STATE_RESUMING,
)


def tokens(chunks: list[common_pb2.GenerateChunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def generate(torpord: Torpord, model: str, timeout: float = 60) -> list[common_pb2.GenerateChunk]:
    """A greedy generate that fails (DEADLINE_EXCEEDED) instead of hanging the test."""
    from tests.daemon.conftest import scheduler_pb2

    request = scheduler_pb2.GenerateRequest(
        model=model,
        prompt_token_ids=common_pb2.TokenIds(ids=PROMPT),
        sampling=common_pb2.SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
    )
    return call(torpord.scheduler.Generate, request, timeout=timeout)


def evict(torpord: Torpord, model: str, tier: int, timeout: float = 60) -> None:
    call(torpord.admin.Evict, admin_pb2.EvictRequest(model=model, to_tier=tier), timeout=timeout)


def chunk_files(where: Path) -> list[Path]:
    """The chunk files under a state dir's store (or any directory of the store)."""
    if (where / "snapshots").is_dir():
        where = where / "snapshots" / "chunks"
    return [p for p in where.rglob("*") if p.is_file()]


def flip_a_byte(path: Path) -> None:
    """Damage a chunk in place, as a failing disk would (the file keeps its size)."""
    os.chmod(path, 0o600)
    with path.open("r+b") as f:
        f.seek(path.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def events(torpord: Torpord, model: str) -> list[admin_pb2.Event]:
    request = admin_pb2.WatchEventsRequest(model=model, after_id=0, follow=False)
    return call(torpord.admin.WatchEvents, request)


# -- a corrupt chunk -------------------------------------------------------------------------


@pytest.mark.parametrize("dropped", [False, True], ids=["suspended_disk", "snapshot"])
def test_a_corrupt_chunk_falls_back_to_the_checkpoint(torpord: Torpord, dropped: bool) -> None:
    """The restore from a damaged snapshot fails its hash check. The request that waits for
    it is served from the next source (here the checkpoint) with the same tokens, the event
    log says why, and the bad snapshot is never offered again."""
    first = tokens(generate(torpord, "alpha"))
    evict(torpord, "alpha", common_pb2.TIER_DISK)  # SUSPENDED_DISK: the worker stays
    if dropped:
        evict(torpord, "alpha", common_pb2.TIER_DROP)  # SNAPSHOT: a new worker restores it
    weights = max(chunk_files(torpord.state_dir), key=lambda p: p.stat().st_size)
    flip_a_byte(weights)

    again = generate(torpord, "alpha", timeout=30)  # hung forever before the fix

    assert tokens(again) == first
    assert again[-1].usage.restored_from == common_pb2.TIER_DISK  # where the request found it
    rt = torpord.runtime("alpha")
    assert rt.state == common_pb2.RUNTIME_STATE_RESIDENT
    corrupt = [
        e for e in events(torpord, "alpha") if e.kind == admin_pb2.EVENT_KIND_SNAPSHOT_CORRUPT
    ]
    assert len(corrupt) == 1 and corrupt[0].attributes["chunk"] == weights.name
    if not dropped:
        return
    # The next eviction to disk writes a good snapshot (the bad chunk was quarantined, not
    # shared by the new one), and it restores.
    evict(torpord, "alpha", common_pb2.TIER_DISK)
    evict(torpord, "alpha", common_pb2.TIER_DROP)
    assert torpord.runtime("alpha").state == common_pb2.RUNTIME_STATE_SNAPSHOT
    assert tokens(generate(torpord, "alpha")) == first
    assert len(chunk_files(torpord.state_dir / "snapshots" / "quarantine")) == 1
