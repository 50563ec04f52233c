"""`torpor acquire` holds a lease as a process: it prints READY, renews the lease before it
expires, releases it on Ctrl-C or SIGTERM, and fails when the daemon ends the lease.
Also `torpor events --follow`, the other command that runs until interrupted."""

from __future__ import annotations

import json
import signal

import pytest

from tests.cli.conftest import Cli, Running, start
from tests.cli.fake_daemon import FakeTorpord


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_acquire_holds_the_lease_and_releases_it_on_a_signal(
    cli: Cli, daemon: FakeTorpord, running: list[Running], signum: int
) -> None:
    r = start(running, cli.argv("acquire", "demo-c", "--ttl", "30", "--priority", "4"))
    assert r.wait_for_line("demo-c is ready on gpu 0: lease lease-1")
    r.wait_for_line("Ctrl-C releases it")
    (request,) = daemon.requests("Acquire")
    assert (request.model, request.priority, request.lease_ttl.seconds) == ("demo-c", 4, 30)
    assert daemon.requests("Release") == [] and not daemon.leases["lease-1"].is_set()
    code, err = r.stop(signum)
    assert code == 0, err
    assert [req.lease_id for req in daemon.wait_for("Release")] == ["lease-1"]
    assert daemon.leases["lease-1"].is_set()
    assert err == "released lease lease-1\n"


def test_acquire_json_prints_only_the_ready_line(
    cli: Cli, daemon: FakeTorpord, running: list[Running]
) -> None:
    r = start(running, cli.argv("acquire", "demo-c", "--json"))
    ready = json.loads(r.wait_for_line("lease_id"))
    assert ready == {
        "model": "demo-c", "lease_id": "lease-1", "expires_at": ready["expires_at"], "gpu": 0,
        "worker_endpoint": "unix:///run/torpor/workers/rt-a0.sock", "runtime_id": "rt-a0",
    }  # fmt: skip
    code, _ = r.stop(signal.SIGINT)
    assert code == 0
    assert r.proc.stdout is not None and r.lines.empty()
    daemon.wait_for("Release")


def test_acquire_renews_the_lease_before_it_expires(
    cli: Cli, daemon: FakeTorpord, running: list[Running]
) -> None:
    daemon.lease_ttl_s = 1.0  # so the client renews about every half second
    r = start(running, cli.argv("acquire", "demo-a"))
    r.wait_for_line("is ready")
    renewals = daemon.wait_for("Renew", count=3)
    assert {req.lease_id for req in renewals} == {"lease-1"}
    code, _ = r.stop(signal.SIGINT)
    assert code == 0
    daemon.wait_for("Release")


def test_acquire_fails_when_the_daemon_ends_the_lease(
    cli: Cli, daemon: FakeTorpord, running: list[Running]
) -> None:
    r = start(running, cli.argv("acquire", "demo-a"))
    r.wait_for_line("is ready")
    daemon.leases["lease-1"].set()  # released by someone else, or expired
    assert r.proc.wait(timeout=30) == 3
    assert r.proc.stderr is not None
    assert r.proc.stderr.read() == (
        "torpor: error: lease lease-1 ended: it was released by someone else or expired\n"
    )


def test_acquire_fails_when_the_lease_cannot_be_renewed(
    cli: Cli, daemon: FakeTorpord, running: list[Running]
) -> None:
    daemon.lease_ttl_s, daemon.renewable = 1.0, False
    r = start(running, cli.argv("acquire", "demo-a"))
    assert r.proc.wait(timeout=30) == 3
    assert r.proc.stderr is not None
    assert r.proc.stderr.read() == "torpor: error: lease 'lease-1' expired\n"
    assert [req.lease_id for req in daemon.requests("Renew")] == ["lease-1"]


def test_events_follow_runs_until_interrupted(
    cli: Cli, daemon: FakeTorpord, running: list[Running]
) -> None:
    r = start(running, cli.argv("events", "--follow", "--json"))
    live = json.loads(r.wait_for_line("live: lease granted"))
    assert live["id"] == 4 and live["kind"] == "lease_granted"
    assert [json.loads(line)["id"] for line in r.seen] == [1, 2, 3, 4]
    assert daemon.requests("WatchEvents")[-1].follow is True
    code, err = r.stop(signal.SIGINT)
    assert (code, err) == (0, "")
