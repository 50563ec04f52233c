"""Prometheus metrics: typed updates, label checks, own registries, the loopback /metrics server."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from torpor.errors import FailedPrecondition, Internal, InvalidArgument
from torpor.scheduler.inventory import GpuInfo
from torpor.scheduler.metrics import DURATION_BUCKETS, RUNTIME_STATES, Metrics


def samples(text: str | bytes) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of an exposition, by name and labels."""
    if isinstance(text, bytes):
        text = text.decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return samples(metrics.render()).get((name, frozenset(labels.items())))


def test_every_update_shows_with_its_labels() -> None:
    m = Metrics()
    m.set_gpus([GpuInfo(0, "cpu", "", 256, 100, 156)])
    m.set_tier_bytes(0, "host", 4096)
    m.set_runtime_states({"resident": 2, "suspended_host": 1})
    m.observe_suspend("deep", 0.8)
    m.observe_resume("host", 1.3)
    m.observe_load("cold", 42.0)
    m.set_queue_depth("llama", 3)
    m.observe_queue_wait("llama", 0.002)
    m.hit("resident")
    m.hit("resident")
    m.eviction("pressure", "host")
    m.set_leases(5)
    m.request_done("llama", prompt_tokens=7, generated_tokens=11)
    m.request_done("llama", "DEADLINE_EXCEEDED")
    m.worker_crash("llama")
    running = [2]
    m.count_keepers(lambda: running[0])

    assert value(m, "torpor_gpu_memory_total_bytes", gpu="0") == 256
    assert value(m, "torpor_gpu_memory_used_bytes", gpu="0") == 100
    assert value(m, "torpor_runtime_bytes", gpu="0", tier="host") == 4096
    assert value(m, "torpor_runtimes", state="resident") == 2
    assert value(m, "torpor_runtimes", state="failed") == 0  # every state, also at zero
    assert value(m, "torpor_suspend_duration_seconds_count", tier="deep") == 1
    assert value(m, "torpor_resume_duration_seconds_bucket", tier="host", le="1.0") == 0
    assert value(m, "torpor_resume_duration_seconds_bucket", tier="host", le="2.5") == 1
    assert value(m, "torpor_load_duration_seconds_sum", tier="cold") == 42.0
    assert value(m, "torpor_queue_depth", model="llama") == 3
    assert value(m, "torpor_queue_wait_seconds_bucket", model="llama", le="0.005") == 1
    assert value(m, "torpor_hits_total", tier="resident") == 2
    assert value(m, "torpor_hits_total", tier="cold") == 0  # known label sets start at zero
    assert value(m, "torpor_evictions_total", reason="pressure", tier="host") == 1
    assert value(m, "torpor_leases") == 5
    assert value(m, "torpor_requests_total", model="llama", code="OK") == 1
    assert value(m, "torpor_requests_total", model="llama", code="DEADLINE_EXCEEDED") == 1
    assert value(m, "torpor_prompt_tokens_total", model="llama") == 7
    assert value(m, "torpor_generated_tokens_total", model="llama") == 11
    assert value(m, "torpor_worker_crashes_total", model="llama") == 1
    assert value(m, "torpor_keepers") == 2
    running[0] = 1  # read at each scrape
    assert value(m, "torpor_keepers") == 1


def test_states_missing_from_an_update_go_back_to_zero() -> None:
    m = Metrics()
    m.set_runtime_states({"loading": 1})
    m.set_runtime_states({"resident": 1})
    assert value(m, "torpor_runtimes", state="loading") == 0
    states = {
        dict(labels)["state"] for name, labels in samples(m.render()) if name == "torpor_runtimes"
    }
    assert states == set(RUNTIME_STATES)


def test_duration_buckets_span_10ms_to_120s() -> None:
    assert DURATION_BUCKETS[0] == 0.01 and DURATION_BUCKETS[-1] == 120
    assert list(DURATION_BUCKETS) == sorted(DURATION_BUCKETS)


@pytest.mark.parametrize(
    ("call", "label"),
    [
        (lambda m: m.hit("warm"), "tier"),
        (lambda m: m.observe_resume("gpu", 1.0), "tier"),
        (lambda m: m.observe_load("host", 1.0), "tier"),
        (lambda m: m.eviction("because", "host"), "reason"),
        (lambda m: m.eviction("pressure", "gpu"), "tier"),
        (lambda m: m.set_tier_bytes(0, "deep", 1), "tier"),
        (lambda m: m.set_runtime_states({"RESIDENT": 1}), "state"),
    ],
)
def test_unknown_label_values_are_bugs(call, label: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(Internal, match=f"metric label {label}=") as info:
        call(Metrics())
    assert info.value.reason == "BAD_METRIC_LABEL"


def test_each_metrics_has_its_own_registry() -> None:
    a, b = Metrics(), Metrics()  # a shared registry would refuse the second set of names
    a.hit("host")
    assert value(a, "torpor_hits_total", tier="host") == 1
    assert value(b, "torpor_hits_total", tier="host") == 0


def test_names_carry_prefix_and_unit() -> None:
    # Counts of things.
    unitless = {"torpor_runtimes", "torpor_queue_depth", "torpor_leases", "torpor_keepers"}
    families = list(text_string_to_metric_families(Metrics().render().decode()))
    assert len(families) > 10
    for family in families:
        assert family.name.startswith("torpor_")
        if family.type == "histogram":
            assert family.name.endswith("_seconds"), family.name
        elif family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples)
        else:
            assert family.name.endswith(("_bytes", "_created")) or family.name in unitless


def test_forget_model_drops_its_series() -> None:
    m = Metrics()
    for model in ("a", "b"):
        m.set_queue_depth(model, 1)
        m.observe_queue_wait(model, 0.1)
        m.request_done(model, "OK", generated_tokens=1)
        m.request_done(model, "UNAVAILABLE")
    m.worker_crash("a")
    m.forget_model("a")
    m.forget_model("never-seen")
    text = m.render().decode()
    assert 'model="a"' not in text
    assert value(m, "torpor_requests_total", model="b", code="UNAVAILABLE") == 1


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        return response.read().decode()


def test_serve_exposes_metrics_over_http_until_closed() -> None:
    m = Metrics()
    m.observe_resume("host", 0.5)
    m.set_queue_depth("llama", 2)
    server = m.serve(0)
    try:
        assert server.port > 0 and server.url == f"http://127.0.0.1:{server.port}/metrics"
        got = samples(fetch(server.url))
        assert got[("torpor_resume_duration_seconds_count", frozenset({("tier", "host")}))] == 1
        assert got[("torpor_queue_depth", frozenset({("model", "llama")}))] == 2
        m.set_queue_depth("llama", 0)  # served live, not a snapshot
        assert 'torpor_queue_depth{model="llama"} 0.0' in fetch(server.url)
    finally:
        server.close()
    server.close()  # idempotent
    with pytest.raises(urllib.error.URLError):
        fetch(server.url)


def test_serve_refuses_non_loopback_hosts() -> None:
    for host in ("0.0.0.0", "192.168.1.10", "example.com"):
        with pytest.raises(InvalidArgument, match="not a loopback address"):
            Metrics().serve(0, host)


def test_serve_on_a_busy_port_says_which_key_to_change() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(FailedPrecondition, match=r"daemon\.metrics_port") as info:
            Metrics().serve(port)
    assert info.value.metadata["value"] == str(port)


def test_serve_as_a_context_manager() -> None:
    with Metrics().serve(0, "localhost") as server:
        assert "torpor_leases 0.0" in fetch(server.url)
