"""Every client command of `torpor` as a user runs it (a subprocess) against the fake torpord:
what it prints, its `--json` shape, and the request it sent."""

from __future__ import annotations

import json
import os
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.cli.conftest import Cli
from tests.cli.fake_daemon import WORDS, FakeTorpord, MiB
from torpor.v1 import admin_pb2, common_pb2

GPU_KEYS = {"index", "name", "total_bytes", "used_bytes", "free_bytes"}
RUNTIME_KEYS = {
    "model", "state", "tier", "gpu", "gpu_bytes", "host_bytes", "disk_bytes", "last_used",
    "leases", "pinned", "keep_alive_until", "restore_estimate_s", "worker_pid", "host_copy",
    "exchange_with",
}  # fmt: skip


def by_model(runtimes: list[dict]) -> dict[str, dict]:
    return {r["model"]: r for r in runtimes}


def test_ps_json_has_exactly_the_documented_shape(cli: Cli) -> None:
    doc = cli.json("ps", "--json")
    assert set(doc) == {"gpus", "runtimes"}
    assert [set(g) for g in doc["gpus"]] == [GPU_KEYS, GPU_KEYS]
    assert all(set(r) == RUNTIME_KEYS for r in doc["runtimes"])
    assert doc["gpus"][0] == {
        "index": 0, "name": "cpu", "total_bytes": 256 * MiB, "used_bytes": 96 * MiB,
        "free_bytes": 160 * MiB,
    }  # fmt: skip
    a, b, c = (by_model(doc["runtimes"])[m] for m in ("demo-a", "demo-b", "demo-c"))
    assert (a["state"], a["tier"], a["gpu"], a["leases"], a["worker_pid"]) == (
        "resident", "gpu", 0, 1, 4242,
    )  # fmt: skip
    assert a["restore_estimate_s"] == 0.0 and a["pinned"] is False
    now = datetime.now(UTC)
    assert (
        datetime.fromisoformat(a["last_used"]) < now < datetime.fromisoformat(a["keep_alive_until"])
    )
    assert (b["state"], b["tier"], b["pinned"], b["restore_estimate_s"]) == (
        "suspended_host", "host", True, 0.0123,
    )  # fmt: skip
    assert b["keep_alive_until"] is None
    assert (c["state"], c["gpu"], c["last_used"], c["worker_pid"]) == ("snapshot", None, None, 0)


def test_ps_json_is_the_same_as_a_global_option(cli: Cli) -> None:
    assert cli.json("--json", "ps") == cli.json("ps", "--json")


def test_ps_filters_by_model(cli: Cli, daemon: FakeTorpord) -> None:
    doc = cli.json("ps", "--model", "demo-b", "--all", "--json")
    assert [r["model"] for r in doc["runtimes"]] == ["demo-b"]
    request = daemon.requests("ListResidency")[-1]
    assert (request.model, request.include_cold) == ("demo-b", True)


def test_ps_prints_one_table_per_gpu_and_one_row_per_runtime(cli: Cli) -> None:
    out = cli.ok("ps")
    assert "GPU 0 · cpu · 256.0 MiB total, 96.0 MiB used, 160.0 MiB free" in out
    assert "GPU 1 · cpu · 256.0 MiB total, 6.0 MiB used, 250.0 MiB free" in out
    assert "No GPU" in out
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("demo-")}
    assert set(rows) == {"demo-a", "demo-b", "demo-c"}
    for text in ("resident", "96.0 MiB", "in 4 min", "4242"):
        assert text in rows["demo-a"]
    # 42 s before the fake started; a loaded host may take a few seconds to get here
    assert re.search(r"  4\d s ago  ", rows["demo-a"]), rows["demo-a"]
    assert "suspended_host" in rows["demo-b"] and "12 ms" in rows["demo-b"]
    assert "840 ms" in rows["demo-c"]
    assert out.index("GPU 1") < out.index("demo-b") < out.index("No GPU") < out.index("demo-c")
    assert out.endswith("\nhost RAM: 180.0 MiB used of 1.0 GiB, 844.0 MiB free\n")  # no disk sent


def test_models_lists_and_gets(cli: Cli, daemon: FakeTorpord) -> None:
    docs = cli.json("models", "--json")["models"]
    assert [m["name"] for m in docs] == ["demo-a", "demo-b", "demo-c", "huge"]
    a = docs[0]
    assert (a["dtype"], a["state"], a["footprint_bytes"], a["keep_alive_s"]) == (
        "float32", "resident", 96 * MiB, 300,
    )  # fmt: skip
    assert a["snapshot_id"] == "snap-demo-a" and a["registered_at"].endswith("+00:00")
    assert cli.json("models", "demo-b", "--json")["models"][0]["pinned"] is True
    assert daemon.requests("GetModel")[-1].name == "demo-b"
    out = cli.ok("models")
    assert "demo-c" in out and "suspended_host" in out and "/var/lib/torpor/models/huge" in out


@pytest.mark.parametrize(
    ("given", "dtype"),
    [
        ("bf16", common_pb2.DTYPE_BFLOAT16), ("bfloat16", common_pb2.DTYPE_BFLOAT16),
        ("fp16", common_pb2.DTYPE_FLOAT16), ("float16", common_pb2.DTYPE_FLOAT16),
        ("fp32", common_pb2.DTYPE_FLOAT32), ("float32", common_pb2.DTYPE_FLOAT32),
        ("FP8", common_pb2.DTYPE_FP8), ("auto", common_pb2.DTYPE_UNSPECIFIED),
    ],
)  # fmt: skip
def test_register_sends_the_spec(cli: Cli, daemon: FakeTorpord, given: str, dtype: int) -> None:
    doc = cli.json(
        "register", "new-model", "rel/dir", "--dtype", given, "--max-batch", "2",
        "--max-seq-len", "256", "--priority", "-3", "--pin", "--keep-alive", "30", "--json",
    )  # fmt: skip
    spec = daemon.requests("RegisterModel")[-1].spec
    assert spec.source == str(Path(os.getcwd(), "rel/dir"))  # made absolute for the daemon
    assert (spec.dtype, spec.max_batch, spec.max_seq_len, spec.priority) == (dtype, 2, 256, -3)
    assert spec.pinned and spec.keep_alive_s == 30
    assert (doc["name"], doc["state"], doc["pinned"]) == ("new-model", "cold", True)
    assert "new-model" in cli.ok("models")


def test_register_sends_a_chat_template_file(cli: Cli, daemon: FakeTorpord, tmp_path: Path) -> None:
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m.content }}\n{% endfor %}")
    cli.ok("register", "chatty", "/models/chatty", "--chat-template", str(template))
    assert daemon.requests("RegisterModel")[-1].chat_template == template.read_text()
    cli.ok("register", "plain", "/models/plain")
    assert daemon.requests("RegisterModel")[-1].chat_template == ""


def test_register_refuses_an_unreadable_chat_template(cli: Cli, tmp_path: Path) -> None:
    err = cli.fails(2, "register", "m2", "/models/m2", "--chat-template", str(tmp_path / "nope"))
    assert "--chat-template" in err


def test_register_says_what_it_did(cli: Cli) -> None:
    assert cli.ok("register", "m1", "/models/m1").startswith("registered m1: cold")


def test_unregister_forgets_the_model(cli: Cli, daemon: FakeTorpord) -> None:
    assert cli.ok("unregister", "demo-c", "--delete-snapshots") == "unregistered demo-c\n"
    assert cli.json("unregister", "demo-b", "--json") == {
        "model": "demo-b", "unregistered": True, "snapshots_deleted": False,
    }  # fmt: skip
    assert [r.delete_snapshots for r in daemon.requests("UnregisterModel")] == [True, False]
    assert "demo-c" not in [m["name"] for m in cli.json("models", "--json")["models"]]


def test_pin_and_unpin(cli: Cli, daemon: FakeTorpord) -> None:
    assert cli.json("pin", "demo-a", "--json")["pinned"] is True
    assert cli.ok("unpin", "demo-a").startswith("unpinned demo-a")
    assert [r.pinned for r in daemon.requests("SetPinned")] == [True, False]


def test_explain_renders_the_plan(cli: Cli) -> None:
    doc = cli.json("explain", "demo-c", "--priority", "7", "--json")
    assert doc == {
        "model": "demo-c", "admit": True, "reason": "fits on gpu 0 after evicting 1 runtime",
        "reason_code": "EVICT", "gpu": 0, "estimate_s": 0.84, "source_tier": "disk",
        "required_bytes": 96 * MiB,
        "victims": [{"model": "demo-a", "runtime_id": "rt-a0", "gpu": 0, "to_tier": "host",
                     "bytes_freed": 90 * MiB, "score": 0.25, "exchange": False}],
    }  # fmt: skip
    out = cli.ok("explain", "demo-c")
    assert out.startswith("demo-c: admit: fits on gpu 0 after evicting 1 runtime (EVICT)")
    victim = next(line for line in out.splitlines() if line.startswith("demo-a"))
    assert victim.split() == ["demo-a", "rt-a0", "0", "host", "90.0", "MiB", "0.25"]
    assert "840 ms" in out and "disk" in out


def test_explain_a_model_that_never_fits(cli: Cli) -> None:
    doc = cli.json("explain", "huge", "--json")
    assert (doc["admit"], doc["gpu"], doc["reason_code"], doc["victims"]) == (
        False, None, "NEVER_FITS", [],
    )  # fmt: skip
    assert cli.ok("explain", "huge").startswith("huge: not admitted: needs 8.0 GiB")


def test_status(cli: Cli) -> None:
    doc = cli.json("status", "--json")
    assert doc["health"] == "serving" and doc["backend"] == "cpu"
    assert (doc["version"], doc["hostname"], doc["models"], doc["workers"]) == (
        "0.1.0", "fakehost", 4, 2,
    )  # fmt: skip
    assert doc["uptime_s"] == 180.0 and [g["index"] for g in doc["gpus"]] == [0, 1]
    out = cli.ok("status")
    assert out.startswith("torpord 0.1.0 on fakehost: serving, cpu backend, up 3 min")


def test_status_of_a_daemon_that_is_not_serving_exits_8(cli: Cli, daemon: FakeTorpord) -> None:
    from grpc_health.v1 import health_pb2

    daemon.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    proc = cli("status", "--json")
    assert proc.returncode == 8
    assert json.loads(proc.stdout)["health"] == "not_serving"
    assert proc.stderr == "torpor: error: torpord is up but not_serving\n"


def test_snapshots_ls_rm_gc(cli: Cli, daemon: FakeTorpord) -> None:
    docs = cli.json("snapshots", "ls", "--model", "demo-c", "--json")["snapshots"]
    assert [(s["snapshot_id"], s["state"], s["bytes"], s["chunks"]) for s in docs] == [
        ("snap-demo-c", "complete", 88 * MiB, 3)
    ]
    assert docs[0]["last_used"] is None
    assert "snap-demo-a" in cli.ok("snapshots", "ls")
    assert cli.json("snapshots", "rm", "snap-demo-c", "--json") == {
        "snapshot_id": "snap-demo-c", "bytes_freed": 80 * MiB,
    }  # fmt: skip
    assert cli.ok("snapshots", "rm", "snap-demo-a") == "deleted snap-demo-a, 80.0 MiB freed\n"
    assert cli.json("snapshots", "gc", "--dry-run", "--json") == {
        "dry_run": True, "snapshots_deleted": 1, "chunks_deleted": 7, "bytes_freed": 12 * MiB,
    }  # fmt: skip
    assert daemon.requests("CollectGarbage")[-1].dry_run is True
    assert cli.ok("snapshots", "gc").startswith("deleted 1 snapshots and 7 chunks, 12.0 MiB")


def test_prefetch(cli: Cli, daemon: FakeTorpord) -> None:
    doc = cli.json("prefetch", "demo-c", "--to", "host", "--json")
    assert doc == {"model": "demo-c", "state": "suspended_host", "tier": "host"}
    assert cli.ok("prefetch", "demo-c", "--no-wait") == "demo-c: resident, weights in gpu\n"
    first, second = daemon.requests("Prefetch")
    assert (first.tier, first.wait) == (common_pb2.TIER_HOST, True)
    assert (second.tier, second.wait) == (common_pb2.TIER_GPU, False)


def test_evict_json(cli: Cli, daemon: FakeTorpord) -> None:
    doc = cli.json("evict", "demo-a", "--to", "disk", "--drain-timeout", "5", "--json")
    assert doc == {
        "model": "demo-a",
        "runtimes": [{"runtime_id": "rt-a0", "state": "suspended_host",
                      "gpu_bytes_freed": 90 * MiB, "aborted_requests": 0, "elapsed_s": 0.08}],
    }  # fmt: skip
    request = daemon.requests("Evict")[-1]
    assert (request.to_tier, request.mode) == (common_pb2.TIER_DISK, admin_pb2.EVICT_MODE_DRAIN)
    assert request.drain_timeout.seconds == 5


def test_evict_abort_prints_one_line_per_runtime(cli: Cli, daemon: FakeTorpord) -> None:
    out = cli.ok("evict", "demo-a", "--to", "drop", "--abort", "--runtime", "rt-a0")
    assert out == (
        "evicted demo-a (rt-a0): now suspended_host, 90.0 MiB of GPU memory freed in 80 ms, "
        "2 requests aborted\n"
    )
    request = daemon.requests("Evict")[-1]
    assert (request.mode, request.runtime_id) == (admin_pb2.EVICT_MODE_ABORT, "rt-a0")


def test_generate_streams_text_and_summarizes_on_stderr(cli: Cli, daemon: FakeTorpord) -> None:
    proc = cli("generate", "demo-b", "Once upon", "--max-tokens", "5")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "".join(WORDS[:5]) + "\n"
    assert proc.stderr.startswith("[5 tokens, length; restored from host in 250 ms")
    s = daemon.requests("Generate")[-1].sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.logprobs) == (5, 1.0, 1.0, False)
    assert not s.HasField("seed")


def test_generate_json(cli: Cli, daemon: FakeTorpord) -> None:
    doc = cli.json(
        "generate", "demo-a", "Once upon", "--max-tokens", "3", "--temperature", "0.5",
        "--top-p", "0.9", "--top-k", "40", "--seed", "0", "--stop", "END", "--json",
    )  # fmt: skip
    assert doc["token_ids"] == [100, 101, 102] and doc["text"] == "".join(WORDS[:3])
    assert doc["logprobs"] == pytest.approx([-0.1, -0.2, -0.3])
    assert (doc["finish_reason"], doc["restored_from"], doc["completion_tokens"]) == (
        "length", "gpu", 3,
    )  # fmt: skip
    assert doc["timings"] == {"queued_s": 0.001, "restore_s": 0.25, "first_token_s": 0.26,
                              "total_s": 0.3}  # fmt: skip
    s = daemon.requests("Generate")[-1].sampling
    assert (s.top_k, s.seed, list(s.stop), s.logprobs) == (40, 0, ["END"], True)
    assert s.HasField("seed") and s.top_p == pytest.approx(0.9)


def test_generate_json_with_top_logprobs(cli: Cli, daemon: FakeTorpord) -> None:
    doc = cli.json("generate", "demo-a", "Once upon", "--max-tokens", "2", "--logprobs", "2",
                   "--json")  # fmt: skip
    assert daemon.requests("Generate")[-1].sampling.top_logprobs == 2
    first = doc["token_logprobs"][0]
    assert first["token_id"] == 100 and first["logprob"] == pytest.approx(-0.1)
    assert bytes(first["bytes"]) == WORDS[0].encode()
    assert [(t["token_id"], bytes(t["bytes"])) for t in first["top"]] == [
        (200, b"\xe2"), (201, b"\xe2\xe2"),
    ]  # fmt: skip
    assert len(doc["token_logprobs"]) == 2
    # Without --logprobs the object keeps its shape; without --json nothing is asked.
    assert "token_logprobs" not in cli.json("generate", "demo-a", "Once upon", "--json")
    cli.ok("generate", "demo-a", "Once upon", "--logprobs", "3")
    s = daemon.requests("Generate")[-1].sampling
    assert (s.logprobs, s.top_logprobs) == (False, 0)
    assert cli("generate", "demo-a", "x", "--logprobs", "6").returncode != 0


def test_events_json_lines(cli: Cli, daemon: FakeTorpord) -> None:
    lines = cli.ok("events", "--json").splitlines()
    docs = [json.loads(line) for line in lines]
    assert [(d["id"], d["kind"]) for d in docs] == [
        (1, "model_registered"), (2, "state_changed"), (3, "eviction"),
    ]  # fmt: skip
    assert docs[0]["gpu"] is None and docs[1]["attributes"] == {"from": "COLD", "to": "RESIDENT"}
    request = daemon.requests("WatchEvents")[-1]
    assert request.WhichOneof("start") == "after_id" and request.after_id == 0
    assert not request.follow


def test_events_filters(cli: Cli, daemon: FakeTorpord) -> None:
    out = cli.ok("events", "--model", "demo-b", "--since", "10m", "--kind", "eviction",
                 "--kind", "state_changed", "--gpu", "1")  # fmt: skip
    assert len(out.splitlines()) == 1 and "#3  eviction  demo-b  gpu 1" in out
    request = daemon.requests("WatchEvents")[-1]
    since = request.since.ToDatetime(tzinfo=UTC)
    assert abs(since - (datetime.now(UTC) - timedelta(minutes=10))) < timedelta(minutes=1)
    assert list(request.kinds) == [
        admin_pb2.EVENT_KIND_EVICTION,
        admin_pb2.EVENT_KIND_STATE_CHANGED,
    ]
    assert request.gpu == 1 and request.model == "demo-b"
