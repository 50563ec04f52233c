"""Keeping a lease alive from the client: renew it before it expires, release it at the end.

The renewer is a daemon thread that waits on an event (not a sleep loop), so stopping it is
immediate. A lease it cannot renew (expired, revoked, daemon gone) is reported through
`on_lost`, which ends the hold.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime

from torpor.errors import TorporError
from torpor.scheduler.client.connection import Connection
from torpor.v1 import scheduler_pb2

MIN_RENEW_INTERVAL_S = 0.05
RELEASE_TIMEOUT_S = 10.0


class LeaseKeeper:
    """Renews lease `lease_id` when half of its remaining lifetime has passed, until stopped."""

    def __init__(
        self,
        conn: Connection,
        lease_id: str,
        expires_at: datetime,
        on_lost: Callable[[TorporError], None],
    ) -> None:
        self.lease_id = lease_id
        self.expires_at = expires_at
        self.error: TorporError | None = None
        self.renewals = 0
        self._conn = conn
        self._on_lost = on_lost
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-renew", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _interval(self) -> float:
        remaining = (self.expires_at - datetime.now(UTC)).total_seconds()
        return max(remaining / 2, MIN_RENEW_INTERVAL_S)

    def _run(self) -> None:
        while not self._stop.wait(self._interval()):
            request = scheduler_pb2.RenewRequest(lease_id=self.lease_id)
            try:
                reply = self._conn.unary(self._conn.scheduler.Renew, request)
            except TorporError as err:
                if not self._stop.is_set():
                    self.error = err
                    self._on_lost(err)
                return
            self.expires_at = reply.expires_at.ToDatetime(tzinfo=UTC)
            self.renewals += 1


def release(conn: Connection, lease_id: str) -> TorporError | None:
    """Give the lease back; the error when that failed (it may have expired already)."""
    request = scheduler_pb2.ReleaseRequest(lease_id=lease_id)
    try:
        conn.unary(conn.scheduler.Release, request, timeout=RELEASE_TIMEOUT_S)
    except TorporError as err:
        return err
    return None
