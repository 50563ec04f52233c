"""The store's side of the daemon: snapshots recorded and found again, corrupt ones
forgotten, and transfer bandwidths measured into the catalog (the policy's restore costs)."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import socket
from collections.abc import Callable

from torpor.errors import TorporError
from torpor.log import get_logger
from torpor.scheduler import snapshots as snaps
from torpor.scheduler.core import Costs, Tier
from torpor.store.catalog import Catalog
from torpor.store.records import SnapshotInfo
from torpor.store.schema import BandwidthTier
from torpor.store.snapshots import SnapshotStore

log = get_logger("recorder")

# A deep resume's copy goes through staging buffers (its host copy was unlocked), a path of
# its own: folding it into HOST_TO_GPU would make every host restore look slower.
_BANDWIDTH = {
    Tier.HOST: BandwidthTier.HOST_TO_GPU,
    Tier.DISK: BandwidthTier.DISK_READ,
}
_HASH = re.compile(r"[0-9a-f]{32}")  # a chunk's name (store.chunks.check_hash)
_COST_FIELD = {
    BandwidthTier.HOST_TO_GPU: "host_to_gpu",
    BandwidthTier.DISK_READ: "disk_read",
    BandwidthTier.GPU_TO_HOST: "gpu_to_host",
    BandwidthTier.DISK_WRITE: "disk_write",
}


class Recorder:
    """Blocking store calls, each run in a thread so the event loop never waits on them."""

    def __init__(
        self,
        catalog: Catalog,
        store: SnapshotStore,
        costs: Callable[[], Costs],
        on_costs: Callable[[Costs], None],
    ) -> None:
        self.catalog = catalog
        self.store = store
        self.current_costs = costs
        self.on_costs = on_costs
        self.host = socket.gethostname()
        self.latest: dict[str, str] = {}  # model -> snapshot id
        self.refused: set[str] = set()  # snapshots that failed a restore: never offered again
        self.on_recorded: Callable[[SnapshotInfo], None] | None = None

    def known_snapshots(self) -> dict[str, str]:
        """At start-up (blocking): the newest complete snapshot of every model."""
        for info in self.store.list():
            self.latest.setdefault(info.model, info.id)
        return dict(self.latest)

    def costs(self, base: Costs) -> Costs:
        """`base` with every bandwidth this host has measured before (blocking)."""
        measured = {
            _COST_FIELD[b.tier]: b.bytes_per_s for b in self.catalog.list_bandwidths(self.host)
        }
        return dataclasses.replace(base, **measured)

    async def record(self, model: str, manifest_hash: str) -> None:
        info = await asyncio.to_thread(snaps.record_snapshot, self.store, model, manifest_hash)
        self.latest[model] = info.id
        log.info("snapshot_recorded", model=model, snapshot=info.id, bytes=info.total_bytes)
        if self.on_recorded is not None:
            self.on_recorded(info)

    async def manifest_for(self, model: str) -> str:
        snapshot_id = self.latest.get(model)
        if snapshot_id is None:
            from torpor.errors import FailedPrecondition

            raise FailedPrecondition(f"model {model!r} has no snapshot", reason="NO_SNAPSHOT")
        return await asyncio.to_thread(snaps.manifest_hash_of, self.store, snapshot_id)

    async def forget(self, model: str, error: TorporError) -> bool:
        """A snapshot that failed to restore is not offered again: marked corrupt when its
        bytes were bad, with its bad chunk quarantined (so that the next snapshot of the same
        weights writes a good copy instead of sharing the bad one). True when another
        complete snapshot of the model is left; it becomes the one restores read."""
        snapshot_id = self.latest.pop(model, None)
        if snapshot_id is not None:
            self.refused.add(snapshot_id)
            if error.reason in ("CHUNK_CORRUPT", "CHUNK_MISSING"):
                await self._mark_corrupt(snapshot_id, error)
        try:
            others = await asyncio.to_thread(self.store.list, model)
        except TorporError as err:
            log.error("snapshot_list_failed", model=model, error=str(err))
            return False
        for info in others:
            if info.id not in self.refused:
                self.latest[model] = info.id
                return True
        return False

    async def _mark_corrupt(self, snapshot_id: str, error: TorporError) -> None:
        chunk = error.metadata.get("hash")
        chunk = chunk if chunk and _HASH.fullmatch(chunk) else None
        try:
            await asyncio.to_thread(self.store.mark_corrupt, snapshot_id, error.message, chunk)
        except Exception as exc:  # the restore's report must still go out
            log.error("mark_corrupt_failed", snapshot=snapshot_id, error=repr(exc))

    async def bandwidth(self, tier: Tier, nbytes: int, seconds: float) -> None:
        """Fold a measured restore into the catalog, and the policy's costs."""
        which = _BANDWIDTH.get(tier)
        if which is None or nbytes <= 0 or seconds <= 0:
            return
        measured = await asyncio.to_thread(
            self.catalog.record_bandwidth, self.host, which, nbytes, seconds
        )
        field = _COST_FIELD[which]
        self.on_costs(dataclasses.replace(self.current_costs(), **{field: measured.bytes_per_s}))
