"""Prometheus metrics of torpord, on a registry of its own.

Each `Metrics` owns a `CollectorRegistry`, not prometheus_client's global one, so that tests
and several daemons in one process never share series. The daemon calls the typed methods
(`observe_resume("host", 0.8)`); label values come from small fixed sets, checked, so a typo
is an error rather than a new series. `serve()` exposes /metrics on loopback only: the
endpoint has no authentication.

Names carry the torpor_ prefix and their unit (`_bytes`, `_seconds`, `_total`); label values
are lower case (tier "host", state "suspended_host"), the names of `labels.py`'s tables.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import threading
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)

from torpor.errors import FailedPrecondition, Internal, InvalidArgument
from torpor.scheduler import labels
from torpor.scheduler.core import Tier
from torpor.scheduler.inventory import GpuInfo

DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120)
"""Seconds: a host-tier resume of a small model (10 ms) up to a cold 70B load (120 s)."""
WAIT_BUCKETS = (0.001, 0.005, *DURATION_BUCKETS)
"""Seconds in a queue: most requests for a resident model wait about nothing."""

_T = labels.TIER_LABELS
BYTE_TIERS = (_T[Tier.GPU], _T[Tier.HOST], _T[Tier.DISK])
SUSPEND_TIERS = (_T[Tier.HOST], _T[Tier.DEEP], _T[Tier.DISK])
RESUME_TIERS = SUSPEND_TIERS
LOAD_TIERS = tuple(labels.LOAD_LABELS.values())  # from the checkpoint, or a snapshot
HIT_TIERS = tuple(labels.HIT_LABELS.values())
EVICTION_TIERS = (*SUSPEND_TIERS, _T[Tier.DROP])
EVICTION_REASONS = ("pressure", "host_budget", "disk_budget", "idle", "admin", "drain", "shutdown")
"""pressure: room for another runtime on its GPU; host_budget / disk_budget: paged further
down to keep a budget; idle: keep-alive over; admin: the Evict RPC; drain: Drain(gpu);
shutdown: torpord stopping."""
CATALOG_WRITES = ("bandwidth", "events", "snapshot_touch")
"""Bookkeeping writes that never fail a transition: skipped and counted (issue 12)."""
RUNTIME_STATES = tuple(labels.STATE_LABELS.values())


def _label(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise Internal(
            f"metric label {name}={value!r} is not one of {', '.join(allowed)}",
            reason="BAD_METRIC_LABEL",
            metadata={"label": name, "value": value},
        )
    return value


class Metrics:
    """Every metric torpord exports, with the methods that update them. Thread-safe."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._gpu_total = Gauge(
            "torpor_gpu_memory_total_bytes", "Memory of a GPU.", ["gpu"], registry=r
        )
        self._gpu_used = Gauge(
            "torpor_gpu_memory_used_bytes",
            "Memory in use on a GPU: by any process (NVML), or as accounted (CPU backend).",
            ["gpu"],
            registry=r,
        )
        self._tier_bytes = Gauge(
            "torpor_runtime_bytes",
            "Bytes held by the runtimes placed on a GPU, by the tier that holds them.",
            ["gpu", "tier"],
            registry=r,
        )
        self._runtimes = Gauge("torpor_runtimes", "Runtimes by state.", ["state"], registry=r)
        self._suspend = self._histogram("suspend", "Suspending a runtime to a tier.")
        self._resume = self._histogram("resume", "Resuming a runtime from a tier to its GPU.")
        self._load = self._histogram("load", "Loading a runtime cold or from a snapshot.")
        self._queue_depth = Gauge(
            "torpor_queue_depth", "Requests waiting for a model.", ["model"], registry=r
        )
        self._queue_wait = Histogram(
            "torpor_queue_wait_seconds",
            "Time a request waited in its model's queue.",
            ["model"],
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self._hits = Counter(
            "torpor_hits_total", "Requests by the tier their runtime was in.", ["tier"], registry=r
        )
        self._evictions = Counter(
            "torpor_evictions_total",
            "Runtimes moved down, by reason and target tier.",
            ["reason", "tier"],
            registry=r,
        )
        self._leases = Gauge("torpor_leases", "Leases held.", registry=r)
        self._keepers = Gauge(
            "torpor_keepers", "Keeper processes running (at most one per GPU).", registry=r
        )
        self._requests = Counter(
            "torpor_requests_total",
            "Generate requests finished, by model and status code.",
            ["model", "code"],
            registry=r,
        )
        self._http_requests = Counter(
            "torpor_http_requests_total",
            "Requests to the OpenAI-compatible HTTP API, by endpoint and HTTP status.",
            ["endpoint", "status"],
            registry=r,
        )
        self._http_seconds = Histogram(
            "torpor_http_request_duration_seconds",
            "Time from an HTTP request's arrival to its last byte, by endpoint.",
            ["endpoint"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 600),
            registry=r,
        )
        self._prompt_tokens = self._per_model("torpor_prompt_tokens_total", "Prompt tokens.")
        self._generated = self._per_model("torpor_generated_tokens_total", "Tokens generated.")
        self._crashes = self._per_model(
            "torpor_worker_crashes_total", "Worker processes that died unasked."
        )
        self._catalog_write_failures = Counter(
            "torpor_catalog_write_failures_total",
            "Bookkeeping writes to the catalog that failed and were skipped (a full disk).",
            ["what"],
            registry=r,
        )
        self._snapshot_failures = Counter(
            "torpor_snapshot_failures_total",
            "Snapshot writes that failed with the runtime left as it was, by reason.",
            ["reason"],
            registry=r,
        )
        self._store_swept = Counter(
            "torpor_store_swept_files_total",
            "Temp and orphan chunk files removed by the running sweep.",
            registry=r,
        )
        self._leases.set(0)
        # Every known label set is exported from the start, at zero, so that rate() and
        # absent-series alerts work before the first event.
        for state in RUNTIME_STATES:
            self._runtimes.labels(state=state).set(0)
        for histogram, tiers in (
            (self._suspend, SUSPEND_TIERS),
            (self._resume, RESUME_TIERS),
            (self._load, LOAD_TIERS),
        ):
            for tier in tiers:
                histogram.labels(tier=tier)
        for tier in HIT_TIERS:
            self._hits.labels(tier=tier)
        for reason in EVICTION_REASONS:
            for tier in EVICTION_TIERS:
                self._evictions.labels(reason=reason, tier=tier)
        for what in CATALOG_WRITES:
            self._catalog_write_failures.labels(what=what)

    def _histogram(self, verb: str, doc: str) -> Histogram:
        return Histogram(
            f"torpor_{verb}_duration_seconds",
            f"{doc} Seconds, by tier.",
            ["tier"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )

    def _per_model(self, name: str, doc: str) -> Counter:
        return Counter(name, doc, ["model"], registry=self.registry)

    # Devices and memory.

    def set_gpus(self, gpus: Iterable[GpuInfo]) -> None:
        """Record the inventory's latest numbers."""
        for gpu in gpus:
            self._gpu_total.labels(gpu=str(gpu.index)).set(gpu.total_bytes)
            self._gpu_used.labels(gpu=str(gpu.index)).set(gpu.used_bytes)

    def set_tier_bytes(self, gpu: int, tier: str, nbytes: int) -> None:
        """Bytes that the runtimes placed on `gpu` hold in `tier` (gpu, host or disk)."""
        self._tier_bytes.labels(gpu=str(gpu), tier=_label("tier", tier, BYTE_TIERS)).set(nbytes)

    def set_runtime_states(self, counts: Mapping[str, int]) -> None:
        """Runtimes per state; states missing from `counts` are set to 0."""
        for state in counts:
            _label("state", state, RUNTIME_STATES)
        for state in RUNTIME_STATES:
            self._runtimes.labels(state=state).set(counts.get(state, 0))

    # Transitions.

    def observe_suspend(self, tier: str, seconds: float) -> None:
        self._suspend.labels(tier=_label("tier", tier, SUSPEND_TIERS)).observe(seconds)

    def observe_resume(self, tier: str, seconds: float) -> None:
        self._resume.labels(tier=_label("tier", tier, RESUME_TIERS)).observe(seconds)

    def observe_load(self, tier: str, seconds: float) -> None:
        """`tier`: cold (from the source checkpoint) or snapshot."""
        self._load.labels(tier=_label("tier", tier, LOAD_TIERS)).observe(seconds)

    def eviction(self, reason: str, tier: str) -> None:
        """A runtime was moved down to `tier` (host, deep, disk or drop) for `reason`."""
        reason = _label("reason", reason, EVICTION_REASONS)
        self._evictions.labels(reason=reason, tier=_label("tier", tier, EVICTION_TIERS)).inc()

    # Requests, queues and leases.

    def hit(self, tier: str) -> None:
        """A request found its runtime in `tier` (resident, host, deep, disk or cold)."""
        self._hits.labels(tier=_label("tier", tier, HIT_TIERS)).inc()

    def set_queue_depth(self, model: str, depth: int) -> None:
        self._queue_depth.labels(model=model).set(depth)

    def observe_queue_wait(self, model: str, seconds: float) -> None:
        self._queue_wait.labels(model=model).observe(seconds)

    def set_leases(self, count: int) -> None:
        self._leases.set(count)

    def request_done(
        self, model: str, code: str = "OK", *, prompt_tokens: int = 0, generated_tokens: int = 0
    ) -> None:
        """A Generate finished with `code` (OK, or the error's Code name)."""
        self._requests.labels(model=model, code=code).inc()
        self._prompt_tokens.labels(model=model).inc(prompt_tokens)
        self._generated.labels(model=model).inc(generated_tokens)

    def http_request(self, endpoint: str, status: int, seconds: float) -> None:
        """An HTTP API request answered (`endpoint` is its route, or "other")."""
        self._http_requests.labels(endpoint=endpoint, status=str(status)).inc()
        self._http_seconds.labels(endpoint=endpoint).observe(seconds)

    def count_keepers(self, running: Callable[[], int]) -> None:
        """Read the number of running keepers from `running` at each scrape."""
        self._keepers.set_function(running)

    def worker_crash(self, model: str) -> None:
        self._crashes.labels(model=model).inc()

    def catalog_write_failed(self, what: str) -> None:
        """A bookkeeping write (a bandwidth sample, events) the catalog refused."""
        self._catalog_write_failures.labels(what=_label("what", what, CATALOG_WRITES)).inc()

    def snapshot_failed(self, reason: str) -> None:
        self._snapshot_failures.labels(reason=reason).inc()

    def store_swept(self, files: int) -> None:
        self._store_swept.inc(files)

    def forget_model(self, model: str) -> None:
        """Drop the series of an unregistered model."""
        per_model = (self._queue_depth, self._queue_wait, self._prompt_tokens, self._generated)
        for metric in (*per_model, self._crashes):
            _remove(metric, model)
        samples = next(iter(self._requests.collect())).samples
        for code in {s.labels["code"] for s in samples if s.labels.get("model") == model}:
            _remove(self._requests, model, code)

    # Exposition.

    def render(self) -> bytes:
        """The text exposition format, as served at /metrics."""
        return generate_latest(self.registry)

    def serve(self, port: int, host: str = "127.0.0.1") -> MetricsServer:
        """Serve /metrics at http://host:port/ from a thread; `host` must be loopback.

        Port 0 binds a free port (tests); the daemon does not call this when
        daemon.metrics_port is 0.
        """
        if not _is_loopback(host):
            raise InvalidArgument(
                f"metrics host {host!r} is not a loopback address: the endpoint has no "
                "authentication, so it listens on 127.0.0.1 or ::1 only",
                reason="INVALID_CONFIG",
                metadata={"field": "host", "value": host},
            )
        try:
            server, thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            hint = (
                "it is in use: set daemon.metrics_port to a free port, or 0 to disable metrics"
                if exc.errno == errno.EADDRINUSE
                else exc.strerror
            )
            raise FailedPrecondition(
                f"cannot serve metrics on {host}:{port}: {hint}",
                reason="METRICS_PORT_UNAVAILABLE",
                metadata={"field": "daemon.metrics_port", "value": port},
            ) from exc
        return MetricsServer(server, thread, host)


def _remove(metric: Gauge | Counter | Histogram, *labels: str) -> None:
    with contextlib.suppress(KeyError):  # never observed for this model
        metric.remove(*labels)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class MetricsServer:
    """A running /metrics endpoint; `close()` stops it (idempotent)."""

    def __init__(self, server: WSGIServer, thread: threading.Thread, host: str) -> None:
        self._server = server
        self._thread = thread
        self.host = host
        self.port: int = server.server_address[1]
        """The bound port (the one picked by the OS when serve() was given 0)."""
        self._closed = False

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._server.shutdown()  # returns once serve_forever has left its loop
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
