"""The names torpord gives its enums outside the wire: metric label values, event log
details and log fields. One table each (issue 13); `metrics.py` builds its allowed label
sets from them, and tests/scheduler/test_enum_tables.py sends every member through them.
Protobuf's names are `convert.py`'s, not these.
"""

from __future__ import annotations

from torpor.scheduler.core import Drop, LeaseEnd, Load, Resume, RuntimeState, Suspend, Tier

STATE_LABELS: dict[RuntimeState, str] = {
    RuntimeState.RESIDENT: "resident",
    RuntimeState.SUSPENDED_HOST: "suspended_host",
    RuntimeState.SUSPENDED_DEEP: "suspended_deep",
    RuntimeState.SUSPENDED_DISK: "suspended_disk",
    RuntimeState.SNAPSHOT: "snapshot",
    RuntimeState.COLD: "cold",
    RuntimeState.LOADING: "loading",
    RuntimeState.SUSPENDING: "suspending",
    RuntimeState.RESUMING: "resuming",
    RuntimeState.FAILED: "failed",
}
"""A state in metrics (`torpor_runtimes{state}`) and in `state_changed` events."""

TIER_LABELS: dict[Tier, str] = {
    Tier.GPU: "gpu",
    Tier.HOST: "host",
    Tier.DEEP: "deep",
    Tier.DISK: "disk",
    Tier.DROP: "drop",
    Tier.SOURCE: "source",
}
"""A tier in metrics (suspend, resume, eviction and bytes by tier), events and logs."""

HIT_LABELS: dict[Tier, str] = {
    Tier.GPU: "resident",
    Tier.HOST: "host",
    Tier.DEEP: "deep",
    Tier.DISK: "disk",  # a SNAPSHOT restore counts as disk
    Tier.SOURCE: "cold",
}
"""Where a request found its runtime (`torpor_hits_total{tier}`); DROP is no restore source."""

LOAD_LABELS: dict[Tier, str] = {Tier.SOURCE: "cold", Tier.DISK: "snapshot"}
"""What a new worker loads from (`torpor_load_duration_seconds{tier}`)."""

LEASE_END_EVENTS: dict[LeaseEnd, str] = {
    LeaseEnd.RELEASED: "lease_released",
    LeaseEnd.EXPIRED: "lease_expired",
    LeaseEnd.CLIENT_GONE: "lease_released",
    LeaseEnd.REVOKED: "lease_released",
    LeaseEnd.WORKER_DIED: "lease_released",
}
"""The event log's kind for a lease that ended (its `why` detail tells them apart)."""

ACTION_LABELS: dict[type[Load | Resume | Suspend | Drop], str] = {
    Load: "load",
    Resume: "resume",
    Suspend: "suspend",
    Drop: "drop",
}
"""A transition the executor runs, in its logs and errors."""
