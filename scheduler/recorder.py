"""The store's side of the daemon: snapshots recorded and found again, corrupt ones
forgotten, and transfer bandwidths measured into the catalog (the policy's restore costs)."""

from __future__ import annotations

import asyncio
import dataclasses
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

    async def forget(self, model: str, error: TorporError) -> None:
        """A snapshot that failed to restore is not offered again (marked corrupt when its
        bytes were bad)."""
        snapshot_id = self.latest.pop(model, None)
        if snapshot_id is not None and error.reason in ("CHUNK_CORRUPT", "CHUNK_MISSING"):
            await asyncio.to_thread(self.store.mark_corrupt, snapshot_id, error.message)

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
