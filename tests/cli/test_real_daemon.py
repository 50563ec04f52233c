"""The `torpor` CLI as a user runs it, against a real torpord (issue 6).

One torpord (a subprocess, CPU backend) serves this whole module, with the three small demo
models of tests/daemon on one simulated device that holds two of them, so that loading the
third evicts one. Every command runs as a subprocess of the real CLI. A test that needs
some residency arranges it first (`only_on_gpu`), so the tests hold in any order.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.cli.conftest import TORPOR, Cli, Running, client_env, start
from tests.daemon import conftest as daemon_conftest
from tests.daemon.conftest import MAX_SEQ_LEN, MODELS, Torpord, footprint_bytes, start_torpord
from tests.helpers import assert_eventually
from torpor import __version__

model_root = daemon_conftest.model_root  # the session's three demo checkpoints, shared

SPEC = ("--dtype", "float32", "--max-batch", "4", "--max-seq-len", str(MAX_SEQ_LEN))
"""How the module's daemon has its models registered (as tests/daemon registers them)."""
PROMPT = "The cat sat on the"  # alpha answers it with a dozen distinct tokens, greedily
GREEDY = ("--max-tokens", "12", "--temperature", "0")
NOT_FOUND = "torpor: error: no model 'nope' is registered"

RUNTIME_FIELDS = {
    "model", "state", "tier", "gpu", "gpu_bytes", "host_bytes", "disk_bytes", "last_used",
    "leases", "pinned", "keep_alive_until", "restore_estimate_s", "worker_pid", "host_copy",
    "exchange_with",
}  # fmt: skip
GPU_FIELDS = {"index", "name", "total_bytes", "used_bytes", "free_bytes"}
TIERS = {"gpu", "host", "deep", "disk", "source"}


@dataclass
class Real:
    """The module's torpord, the CLI pointed at its socket, and where it serves TCP."""

    daemon: Torpord
    cli: Cli
    root: Path
    memory: int
    port: int


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def real(model_root: Path) -> Iterator[Real]:
    memory = int(2.5 * footprint_bytes(model_root))  # two of the three models fit
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="torpor-") as tmp:  # short: socket paths
        state = Path(tmp) / "s"
        daemon = start_torpord(
            state,
            model_root,
            memory,
            TORPOR_DAEMON_RUNTIME_DIR=str(Path(tmp) / "run"),  # its workers, no one else's
            TORPOR_DAEMON_LISTEN=f"127.0.0.1:{port}",
            TORPOR_DAEMON_TCP_AUTH="false",  # tokens and TLS: tests/security/test_tcp_auth.py
        )
        try:
            cli = Cli(daemon.socket)
            for name in MODELS:
                cli.ok("register", name, str(model_root / name), *SPEC)
            yield Real(daemon, cli, model_root, memory, port)
        finally:
            assert daemon.stop() == 0


@pytest.fixture
def cli(real: Real) -> Cli:
    return real.cli


def runtimes(cli: Cli) -> dict[str, dict[str, Any]]:
    """`torpor ps --all --json`'s runtimes by model."""
    return {r["model"]: r for r in cli.json("ps", "--all", "--json")["runtimes"]}


def only_on_gpu(cli: Cli, *models: str) -> None:
    """Make exactly `models` (at most two) resident: the others go down to host RAM."""
    rts = runtimes(cli)
    for name, r in rts.items():
        if name not in models and r["state"] == "resident":
            cli.ok("evict", name, "--to", "host")
    for name in models:
        if rts[name]["state"] != "resident":
            out = cli.ok("prefetch", name, "--to", "gpu")
            assert out == f"{name}: resident, weights in gpu\n", out


def kinds_after(cli: Cli, last: int, model: str) -> list[str]:
    """The kinds of `model`'s events after id `last`."""
    out = cli.ok("events", "--after-id", str(last), "--model", model, "--json")
    return [json.loads(line)["kind"] for line in out.splitlines()]


def last_event_id(cli: Cli) -> int:
    lines = cli.ok("events", "--json").splitlines()
    return json.loads(lines[-1])["id"] if lines else 0


# -- status, ps, models -----------------------------------------------------------------


def test_status(cli: Cli, real: Real) -> None:
    doc = cli.json("status", "--json")
    assert doc["health"] == "serving"
    assert (doc["version"], doc["backend"]) == (__version__, "cpu")
    assert doc["models"] >= 3 and doc["workers"] >= 0
    assert doc["uptime_s"] > 0 and doc["started_at"]
    (gpu,) = doc["gpus"]
    assert set(gpu) == GPU_FIELDS
    assert (gpu["index"], gpu["name"], gpu["total_bytes"]) == (0, "cpu", real.memory)
    text = cli.ok("status")
    assert text.startswith(f"torpord {__version__} on ")
    assert ": serving, cpu backend, up " in text.splitlines()[0]


def test_status_over_tcp(real: Real) -> None:
    proc = subprocess.run(
        [*TORPOR, "--address", f"127.0.0.1:{real.port}", "status", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env=client_env(),
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["health"] == "serving"


def test_ps_json_is_gpus_and_runtimes_with_the_issue_fields(cli: Cli, real: Real) -> None:
    only_on_gpu(cli, "alpha")
    doc = cli.json("ps", "--json")
    assert set(doc) == {"gpus", "runtimes"}
    (gpu,) = doc["gpus"]
    assert set(gpu) == GPU_FIELDS
    assert gpu["total_bytes"] == real.memory
    assert gpu["used_bytes"] + gpu["free_bytes"] == gpu["total_bytes"]
    assert gpu["used_bytes"] == sum(r["gpu_bytes"] for r in doc["runtimes"])
    assert doc["runtimes"], doc
    for r in doc["runtimes"]:
        assert set(r) == RUNTIME_FIELDS, r
        assert r["state"] != "cold"  # cold runtimes only with --all
    alpha = next(r for r in doc["runtimes"] if r["model"] == "alpha")
    assert (alpha["state"], alpha["tier"], alpha["gpu"]) == ("resident", "gpu", 0)
    assert alpha["gpu_bytes"] > 0 and alpha["worker_pid"] > 0
    assert alpha["leases"] == 0 and alpha["pinned"] is False
    assert alpha["restore_estimate_s"] == 0.0 and alpha["last_used"] is not None
    everything = cli.json("ps", "--all", "--json")["runtimes"]
    assert {r["model"] for r in everything} >= set(MODELS)
    assert all(set(r) == RUNTIME_FIELDS and r["tier"] in TIERS | {None} for r in everything)
    assert [r["model"] for r in cli.json("ps", "--model", "alpha", "--json")["runtimes"]] == [
        "alpha"
    ]


def test_ps_text_has_a_table_per_gpu(cli: Cli) -> None:
    only_on_gpu(cli, "alpha")
    text = cli.ok("ps")
    lines = text.splitlines()
    assert lines[0].startswith("GPU 0 · cpu · ")
    header = lines[1].split()
    for column in ("MODEL", "STATE", "TIER", "GPU", "LEASES", "PINNED", "RESTORE", "PID"):
        assert column in header
    row = next(line.split() for line in lines if line.startswith("alpha "))
    assert row[1:4] == ["resident", "gpu", "0"]
    assert "host RAM: " in text and "disk: " in text


def test_models(cli: Cli, real: Real) -> None:
    docs = {m["name"]: m for m in cli.json("models", "--json")["models"]}
    assert set(docs) >= set(MODELS)
    alpha = docs["alpha"]
    assert alpha["source"] == str((real.root / "alpha").resolve())
    assert (alpha["dtype"], alpha["max_batch"], alpha["max_seq_len"]) == ("float32", 4, 256)
    assert (alpha["priority"], alpha["pinned"], alpha["keep_alive_s"]) == (0, False, 0)
    assert alpha["footprint_bytes"] > 0 and alpha["registered_at"]
    assert alpha["state"] in {"resident", "suspended_host", "suspended_deep", "suspended_disk",
                              "snapshot", "cold"}  # fmt: skip
    assert cli.json("models", "alpha", "--json") == {"models": [alpha]}
    text = cli.ok("models").splitlines()
    assert text[0].split()[:3] == ["NAME", "STATE", "DTYPE"]
    assert {line.split()[0] for line in text[1:]} >= set(MODELS)


# -- register, unregister ---------------------------------------------------------------


def test_register_then_unregister(cli: Cli, real: Real) -> None:
    source = real.root / "alpha"  # the same checkpoint under a second name
    out = cli.ok(
        "register", "delta", str(source), "--dtype", "bf16", "--max-batch", "2",
        "--max-seq-len", "128", "--priority", "5", "--pin", "--keep-alive", "30",
    )  # fmt: skip
    try:
        assert out.startswith("registered delta: cold, bfloat16, ")
        assert out.rstrip().endswith(", pinned")
        (doc,) = cli.json("models", "delta", "--json")["models"]
        assert doc == {
            "name": "delta", "source": str(source.resolve()), "dtype": "bfloat16",
            "max_batch": 2, "max_seq_len": 128, "priority": 5, "pinned": True,
            "keep_alive_s": 30, "state": "cold", "footprint_bytes": doc["footprint_bytes"],
            "snapshot_id": None, "has_chat_template": True,  # the demo's tokenizer_config.json
            "load_format": "checkpoint", "registered_at": doc["registered_at"],
        }  # fmt: skip
        assert doc["footprint_bytes"] > 0 and doc["registered_at"]
    finally:
        gone = cli.json("unregister", "delta", "--json")
    assert gone == {"model": "delta", "unregistered": True, "snapshots_deleted": False}
    assert "delta" not in {m["name"] for m in cli.json("models", "--json")["models"]}
    assert cli.fails(3, "unregister", "delta") == "torpor: error: no model 'delta' is registered"
    # --json registers the same way and prints the model
    doc = cli.json("register", "epsilon", str(real.root / "beta"), *SPEC, "--json")
    try:
        assert (doc["name"], doc["dtype"], doc["state"]) == ("epsilon", "float32", "cold")
    finally:
        assert cli.ok("unregister", "epsilon") == "unregistered epsilon\n"


@pytest.mark.parametrize(
    ("name", "source", "code", "message"),
    [
        ("../x", "alpha", 2, "invalid model name '../x': contains a path separator"),
        ("a b", "alpha", 2, "invalid model name 'a b': contains a character outside"),
        ("ok", "OUTSIDE", 2, "is not under any model root"),
        ("ok", "missing", 2, "does not exist"),
        ("alpha", "alpha", 4, "model 'alpha' is already registered"),
    ],
    ids=["path-separator", "bad-character", "outside-the-roots", "missing", "duplicate"],
)
def test_register_errors(
    cli: Cli, real: Real, tmp_path: Path, name: str, source: str, code: int, message: str
) -> None:
    path = tmp_path if source == "OUTSIDE" else real.root / source
    line = cli.fails(code, "register", name, str(path), *SPEC)
    assert message in line
    assert "ok" not in {m["name"] for m in cli.json("models", "--json")["models"]}


def test_register_rejects_an_unknown_dtype(cli: Cli, real: Real) -> None:
    line = cli.fails(2, "register", "ok", str(real.root / "alpha"), "--dtype", "int4")
    assert "--dtype must be one of" in line


def test_register_without_max_seq_len_takes_the_checkpoints(cli: Cli, real: Real) -> None:
    try:
        doc = cli.json("register", "zeta", str(real.root / "alpha"), "--dtype", "fp32", "--json")
        assert doc["max_seq_len"] == 4096  # max_position_embeddings, capped at 4096
    finally:
        cli("unregister", "zeta")


def test_register_without_dtype_keeps_the_checkpoints(cli: Cli, real: Real) -> None:
    try:
        doc = cli.json(
            "register", "eta", str(real.root / "alpha"), "--max-seq-len", "256", "--json"
        )
        assert doc["dtype"] == "float32"
    finally:
        cli("unregister", "eta")


def test_register_refuses_fp8_on_the_cpu_backend(cli: Cli, real: Real) -> None:
    proc = cli("register", "theta", str(real.root / "alpha"), "--dtype", "fp8", *SPEC[2:])
    if proc.returncode == 0:
        cli.ok("unregister", "theta")
    assert proc.returncode == 2 and "fp8 needs a CUDA GPU" in proc.stderr


# -- generate ---------------------------------------------------------------------------


def test_generate_json_is_what_torpor_run_gives(cli: Cli, real: Real) -> None:
    doc = cli.json("generate", "alpha", PROMPT, *GREEDY, "--json")
    solo = subprocess.run(
        [*TORPOR, "run", str(real.root / "alpha"), PROMPT, *GREEDY, "--dtype", "float32",
         "--device", "cpu", "--json"],
        capture_output=True, text=True, timeout=120, env=client_env(),
    )  # fmt: skip
    assert solo.returncode == 0, solo.stderr
    alone = json.loads(solo.stdout)
    assert len(doc["token_ids"]) == 12 and len(set(doc["token_ids"])) > 1
    assert doc["token_ids"] == alone["token_ids"]
    assert doc["text"] == alone["text"]
    assert doc["logprobs"] == pytest.approx(alone["logprobs"], abs=1e-4)
    assert set(doc) == {
        "model", "token_ids", "text", "logprobs", "finish_reason", "restored_from",
        "prompt_tokens", "completion_tokens", "gpu", "runtime_id", "timings",
    }  # fmt: skip
    assert (doc["model"], doc["finish_reason"], doc["gpu"]) == ("alpha", "length", 0)
    assert (doc["prompt_tokens"], doc["completion_tokens"]) == (len(alone["prompt_ids"]), 12)
    assert doc["restored_from"] in TIERS and doc["runtime_id"].startswith("alpha")
    timings = doc["timings"]
    assert set(timings) == {"queued_s", "restore_s", "first_token_s", "total_s"}
    assert all(isinstance(v, float) and v >= 0 for v in timings.values()), timings
    assert timings["first_token_s"] <= timings["total_s"]


def test_generate_streams_text_and_summarises_on_stderr(cli: Cli) -> None:
    doc = cli.json("generate", "alpha", PROMPT, *GREEDY, "--json")
    # bytes: the text may hold a '\r', which text mode would rewrite
    proc = subprocess.run(
        cli.argv("generate", "alpha", PROMPT, *GREEDY), capture_output=True, timeout=60,
        env=client_env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode() == doc["text"] + "\n"
    (summary,) = proc.stderr.decode().splitlines()
    assert re.fullmatch(
        r"\[12 tokens, length; (resident|restored from \w+ in .+|cold load in .+), "
        r"first token .+, total .+\]",
        summary,
    ), summary


def test_generate_samples_with_a_seed_like_torpor_run(cli: Cli, real: Real) -> None:
    args = ("--max-tokens", "6", "--temperature", "0.8", "--top-p", "0.9", "--seed", "7")
    first = cli.json("generate", "alpha", PROMPT, *args, "--json")["token_ids"]
    assert cli.json("generate", "alpha", PROMPT, *args, "--json")["token_ids"] == first
    solo = subprocess.run(
        [*TORPOR, "run", str(real.root / "alpha"), PROMPT, *args, "--dtype", "float32",
         "--device", "cpu", "--json"],
        capture_output=True, text=True, timeout=120, env=client_env(),
    )  # fmt: skip
    assert json.loads(solo.stdout)["token_ids"] == first
    top1 = cli.json("generate", "alpha", PROMPT, "--max-tokens", "6", "--top-k", "1", "--json")
    greedy = cli.json("generate", "alpha", PROMPT, "--max-tokens", "6", "--temperature", "0",
                      "--json")  # fmt: skip
    assert top1["token_ids"] == greedy["token_ids"]


def test_generate_timings_count_from_the_requests_arrival(cli: Cli) -> None:
    only_on_gpu(cli, "beta")
    cli.ok("evict", "beta", "--to", "drop")  # the next request starts a worker
    t = cli.json("generate", "beta", PROMPT, "--max-tokens", "2", "--json")["timings"]
    assert t["restore_s"] > 0.2
    assert t["first_token_s"] >= t["queued_s"] + t["restore_s"]
    assert t["total_s"] >= t["first_token_s"]


def test_a_hit_reports_no_restore_time(cli: Cli) -> None:
    only_on_gpu(cli, "alpha")
    cli.ok("evict", "alpha", "--to", "host")
    cli.ok("prefetch", "alpha", "--to", "gpu")  # restored for the prefetch, not the request
    doc = cli.json("generate", "alpha", PROMPT, "--max-tokens", "1", "--json")
    assert doc["restored_from"] == "gpu"
    assert doc["timings"]["restore_s"] == 0


# -- acquire ----------------------------------------------------------------------------


def test_acquire_holds_a_lease_until_interrupted(cli: Cli, running: list[Running]) -> None:
    r = start(running, cli.argv("acquire", "beta", "--ttl", "1"))  # renewed twice a second
    line = r.wait_for_line("is ready on gpu 0: lease ", timeout=60)
    lease = re.search(r"lease (\S+) \(expires", line).group(1)  # type: ignore[union-attr]
    r.wait_for_line("Ctrl-C releases it")
    held_from = time.monotonic()
    while time.monotonic() < held_from + 2.5:  # past its first expiry: the renewals keep it
        beta = runtimes(cli)["beta"]
        assert (beta["state"], beta["leases"]) == ("resident", 1), beta
    code, err = r.stop(signal.SIGINT)
    assert (code, err) == (0, f"released lease {lease}\n")
    assert_eventually(lambda: runtimes(cli)["beta"]["leases"], lambda n: n == 0)


def test_acquire_json_then_an_abort_eviction_revokes_the_lease(
    cli: Cli, running: list[Running]
) -> None:
    r = start(running, cli.argv("acquire", "gamma", "--json"))
    ready = json.loads(r.wait_for_line('"lease_id"', timeout=60))
    assert set(ready) == {"model", "lease_id", "expires_at", "gpu", "worker_endpoint",
                          "runtime_id"}  # fmt: skip
    assert (ready["model"], ready["gpu"]) == ("gamma", 0)
    assert ready["runtime_id"].startswith("gamma") and ready["worker_endpoint"]
    assert runtimes(cli)["gamma"]["leases"] == 1
    doc = cli.json("evict", "gamma", "--to", "host", "--abort", "--json")
    assert [d["state"] for d in doc["runtimes"]] == ["suspended_host"]
    assert r.proc.wait(timeout=30) == 9  # ABORTED
    assert r.proc.stderr is not None
    (line,) = r.proc.stderr.read().splitlines()
    assert line.startswith("torpor: error: ") and "evicted" in line
    gamma = runtimes(cli)["gamma"]
    assert (gamma["state"], gamma["leases"]) == ("suspended_host", 0)


def test_a_drain_eviction_waits_for_the_lease_then_times_out(
    cli: Cli, running: list[Running]
) -> None:
    r = start(running, cli.argv("acquire", "alpha"))
    r.wait_for_line("Ctrl-C releases it", timeout=60)
    line = cli.fails(7, "evict", "alpha", "--to", "host", "--drain-timeout", "0.5")
    assert "leases or requests at the drain timeout" in line
    alpha = runtimes(cli)["alpha"]
    assert (alpha["state"], alpha["leases"]) == ("resident", 1)
    assert r.stop(signal.SIGINT)[0] == 0


# -- evict ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tier", "state"),
    [("host", "suspended_host"), ("deep", "suspended_deep"), ("disk", "suspended_disk")],
)
def test_evict_moves_a_resident_model_down(cli: Cli, tier: str, state: str) -> None:
    only_on_gpu(cli, "gamma")
    held = runtimes(cli)["gamma"]["gpu_bytes"]
    doc = cli.json("evict", "gamma", "--to", tier, "--json")
    assert doc["model"] == "gamma"
    (done,) = doc["runtimes"]
    assert set(done) == {"runtime_id", "state", "gpu_bytes_freed", "aborted_requests",
                         "elapsed_s"}  # fmt: skip
    assert done["runtime_id"].startswith("gamma") and done["state"] == state
    assert done["gpu_bytes_freed"] == held > 0
    assert done["aborted_requests"] == 0 and done["elapsed_s"] >= 0
    gamma = runtimes(cli)["gamma"]
    assert (gamma["state"], gamma["tier"], gamma["gpu_bytes"]) == (state, tier, 0)
    assert gamma["worker_pid"] > 0  # the worker lives on, holding the weights below
    held = gamma["disk_bytes"] if tier == "disk" else gamma["host_bytes"]
    assert held > 0
    again = cli.json("generate", "gamma", PROMPT, "--max-tokens", "2", "--json")
    assert again["restored_from"] == tier


def test_evict_drop_stops_the_worker_and_the_next_request_restores(cli: Cli) -> None:
    only_on_gpu(cli, "beta")
    before = cli.json("generate", "beta", PROMPT, *GREEDY, "--json")
    assert before["restored_from"] == "gpu"
    out = cli.ok("evict", "beta", "--to", "drop")
    assert re.fullmatch(r"evicted beta \(beta#\d+\): now (snapshot|cold), .+\n", out), out
    beta = runtimes(cli)["beta"]
    assert beta["state"] in ("snapshot", "cold") and beta["worker_pid"] == 0
    assert (beta["gpu"], beta["gpu_bytes"], beta["host_bytes"]) == (None, 0, 0)
    after = cli.json("generate", "beta", PROMPT, *GREEDY, "--json")
    assert after["restored_from"] in ("disk", "source") and after["timings"]["restore_s"] > 0
    assert after["token_ids"] == before["token_ids"]


LONG = "long"
"""beta's checkpoint registered with room for 2000 tokens: a generation that takes seconds
however fast the machine, so an eviction reliably lands in the middle of it."""


@pytest.fixture(scope="module")
def long_model(real: Real) -> Iterator[str]:
    spec = ("--dtype", "float32", "--max-batch", "1", "--max-seq-len", "2048")
    real.cli.ok("register", LONG, str(real.root / "beta"), *spec)
    try:
        yield LONG
    finally:
        real.cli.ok("unregister", LONG)


def generating(cli: Cli, running: list[Running], model: str) -> Running:
    """A long greedy `torpor generate` of `model` (resident first), once its request runs."""
    only_on_gpu(cli, model)
    r = start(
        running, cli.argv("generate", model, PROMPT, "--max-tokens", "2000", "--temperature", "0")
    )
    # The daemon's live state, not the audit trail: that is written behind the calls, so an
    # earlier lease's event could still arrive after any id read now.
    assert_eventually(lambda: runtimes(cli)[model], lambda rt: rt["leases"] >= 1)
    assert r.proc.poll() is None, "the generation ended before the eviction"
    return r


def test_evict_abort_ends_a_running_generate(
    cli: Cli, running: list[Running], long_model: str
) -> None:
    r = generating(cli, running, long_model)  # 2000 tokens take seconds, never an EOS
    doc = cli.json("evict", long_model, "--to", "host", "--abort", "--json")
    assert [d["state"] for d in doc["runtimes"]] == ["suspended_host"]
    assert r.proc.wait(timeout=30) == 9  # ABORTED
    assert r.proc.stderr is not None
    (line,) = r.proc.stderr.read().splitlines()
    assert line.startswith("torpor: error: ") and "aborted" in line
    text = r.output()  # what was generated before the abort, its line ended
    assert text.endswith("\n") and len(text) > 1


def test_evict_abort_counts_the_requests_it_aborted(
    cli: Cli, running: list[Running], long_model: str
) -> None:
    generating(cli, running, long_model)
    (done,) = cli.json("evict", long_model, "--to", "host", "--abort", "--json")["runtimes"]
    assert done["aborted_requests"] == 1


def test_evict_a_suspended_model_further_down(cli: Cli) -> None:
    only_on_gpu(cli, "gamma")
    cli.ok("evict", "gamma", "--to", "host")
    proc = cli("evict", "gamma", "--to", "disk", "--json")
    try:
        assert proc.returncode == 0, proc.stderr
        (done,) = json.loads(proc.stdout)["runtimes"]
        assert done["state"] == "suspended_disk"
    finally:
        cli.ok("prefetch", "gamma", "--to", "gpu")  # a FAILED runtime recovers by loading


# -- pin, unpin, prefetch, explain ------------------------------------------------------


def test_a_pinned_model_is_not_evicted(cli: Cli, running: list[Running]) -> None:
    only_on_gpu(cli, "alpha")
    pinned = cli.json("pin", "alpha", "--json")
    assert (pinned["name"], pinned["state"], pinned["dtype"]) == ("alpha", "resident", "float32")
    try:
        assert runtimes(cli)["alpha"]["pinned"] is True
        # beta fits beside alpha; then gamma and beta again each need the other's room
        for other, gone in (("beta", None), ("gamma", "beta"), ("beta", "gamma")):
            cli.ok("generate", other, PROMPT, "--max-tokens", "1")
            rts = runtimes(cli)
            assert (rts["alpha"]["state"], rts[other]["state"]) == ("resident", "resident")
            assert gone is None or rts[gone]["state"] != "resident", rts
        assert "pinned" in cli.fails(5, "evict", "alpha", "--to", "host")
        # With beta leased, only the pin keeps alpha: gamma is not admitted...
        r = start(running, cli.argv("acquire", "beta"))
        r.wait_for_line("Ctrl-C releases it", timeout=60)
        plan = cli.json("explain", "gamma", "--json")
        assert (plan["admit"], plan["victims"]) == (False, []), plan
    finally:
        assert cli.ok("unpin", "alpha").startswith("unpinned alpha: resident, float32, ")
    # ...and once unpinned, alpha is the victim a gamma load takes
    assert runtimes(cli)["alpha"]["pinned"] is False
    assert [v["model"] for v in cli.json("explain", "gamma", "--json")["victims"]] == ["alpha"]
    assert r.stop(signal.SIGINT)[0] == 0


def test_pin_json_and_models_show_the_pin(cli: Cli) -> None:
    try:
        assert cli.json("pin", "beta", "--json")["pinned"] is True
        assert cli.json("models", "beta", "--json")["models"][0]["pinned"] is True
    finally:
        cli.ok("unpin", "beta")


def test_prefetch_to_host_then_gpu(cli: Cli) -> None:
    only_on_gpu(cli, "gamma")
    cli.ok("evict", "gamma", "--to", "disk")
    doc = cli.json("prefetch", "gamma", "--to", "host", "--json")
    assert doc == {"model": "gamma", "state": "suspended_host", "tier": "host"}
    gamma = runtimes(cli)["gamma"]
    assert (gamma["state"], gamma["gpu_bytes"]) == ("suspended_host", 0)
    assert gamma["host_bytes"] > 0
    assert cli.ok("prefetch", "gamma", "--to", "gpu") == "gamma: resident, weights in gpu\n"
    assert runtimes(cli)["gamma"]["state"] == "resident"


def test_prefetch_reports_where_the_weights_are(cli: Cli) -> None:
    only_on_gpu(cli, "alpha")
    doc = cli.json("prefetch", "alpha", "--to", "host", "--json")
    assert (doc["state"], doc["tier"]) == ("resident", "gpu")


def test_explain_says_what_an_acquire_would_do(cli: Cli) -> None:
    only_on_gpu(cli, "alpha", "beta")
    before = runtimes(cli)
    doc = cli.json("explain", "gamma", "--json")
    assert set(doc) == {"model", "admit", "reason", "reason_code", "gpu", "victims",
                        "estimate_s", "source_tier", "required_bytes"}  # fmt: skip
    assert (doc["model"], doc["admit"], doc["reason_code"], doc["gpu"]) == (
        "gamma", True, "EVICT", 0,
    )  # fmt: skip
    (victim,) = doc["victims"]
    assert victim["model"] in ("alpha", "beta") and victim["to_tier"] == "host"
    assert victim["bytes_freed"] > 0 and victim["gpu"] == 0
    assert doc["source_tier"] in TIERS - {"gpu"}
    assert doc["required_bytes"] > 0 and doc["estimate_s"] > 0
    assert runtimes(cli) == before  # explained, not done
    text = cli.ok("explain", "gamma")
    assert text.startswith("gamma: admit: ") and "(EVICT)" in text.splitlines()[0]
    resident = cli.json("explain", "alpha", "--json")
    assert (resident["reason_code"], resident["victims"]) == ("RESIDENT", [])
    assert resident["source_tier"] == "gpu"


# -- events -----------------------------------------------------------------------------


def test_events_replays_the_log(cli: Cli) -> None:
    events = [json.loads(line) for line in cli.ok("events", "--json").splitlines()]
    ids = [e["id"] for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    registered = [e["model"] for e in events if e["kind"] == "model_registered"]
    assert registered[:3] == list(MODELS)
    assert {e["kind"] for e in events} >= {"model_registered", "state_changed", "lease_granted"}
    for e in events[:3]:
        assert set(e) == {"id", "time", "kind", "model", "runtime_id", "gpu", "detail",
                          "attributes"}  # fmt: skip
    only = [json.loads(line) for line in cli.ok(
        "events", "--kind", "model_registered", "--model", "beta", "--json"
    ).splitlines()]  # fmt: skip
    assert [(e["kind"], e["model"]) for e in only] == [("model_registered", "beta")]
    recent = cli.ok("events", "--since", "1h", "--json").splitlines()
    assert [json.loads(line)["id"] for line in recent][: len(ids)] == ids
    lines = cli.ok("events").splitlines()
    assert len(lines) >= len(events)
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d  #1  model_registered  alpha  -  ", lines[0])


def test_events_follow_sees_a_new_event(cli: Cli, running: list[Running]) -> None:
    last = last_event_id(cli)
    r = start(running, cli.argv("events", "--follow", "--json", "--after-id", str(last - 1)))
    assert json.loads(r.wait_for_line('"id"'))["id"] == last  # replayed: it is connected
    cli.ok("pin", "beta")
    cli.ok("unpin", "beta")
    live = json.loads(r.wait_for_line('"pinned_changed"'))
    assert live["id"] > last and live["model"] == "beta"
    assert live["attributes"] == {"pinned": "True"}
    code, err = r.stop(signal.SIGINT)
    assert (code, err) == (0, "")


def test_a_disk_eviction_logs_snapshot_created(cli: Cli) -> None:
    only_on_gpu(cli, "alpha")
    last = last_event_id(cli)
    cli.ok("evict", "alpha", "--to", "disk")
    # The audit trail is written behind the calls: its events arrive shortly after.
    assert_eventually(lambda: kinds_after(cli, last, "alpha"), lambda k: "snapshot_created" in k)


def test_lease_events_name_the_model(cli: Cli) -> None:
    last = last_event_id(cli)
    cli.ok("generate", "alpha", PROMPT, "--max-tokens", "1")  # a lease granted, then released
    assert_eventually(
        lambda: kinds_after(cli, last, "alpha"),
        lambda k: "lease_granted" in k and "lease_released" in k,
    )


# -- snapshots --------------------------------------------------------------------------


def test_snapshots_ls_rm_gc(cli: Cli) -> None:
    only_on_gpu(cli, "beta")
    cli.ok("evict", "beta", "--to", "disk")  # a disk eviction writes a snapshot
    snap_id = cli.json("models", "beta", "--json")["models"][0]["snapshot_id"]
    assert snap_id
    listed = cli.json("snapshots", "ls", "--model", "beta", "--json")["snapshots"]
    (snap,) = [s for s in listed if s["snapshot_id"] == snap_id]
    assert (snap["model"], snap["state"]) == ("beta", "complete")
    assert snap["bytes"] > 0 and snap["created_at"] and snap["fingerprint"]
    text = cli.ok("snapshots", "ls").splitlines()
    assert text[0].split()[:3] == ["ID", "MODEL", "STATE"]
    assert any(line.split()[:3] == [snap_id, "beta", "complete"] for line in text)
    # suspended to disk, the snapshot is the only copy of beta's weights
    assert "only copy" in cli.fails(5, "snapshots", "rm", snap_id)
    cli.ok("prefetch", "beta", "--to", "gpu")
    doc = cli.json("snapshots", "rm", snap_id, "--json")
    assert doc["snapshot_id"] == snap_id and doc["bytes_freed"] > 0
    assert snap_id not in {
        s["snapshot_id"] for s in cli.json("snapshots", "ls", "--json")["snapshots"]
    }
    assert "does not exist" in cli.fails(3, "snapshots", "rm", snap_id)
    assert "not a snapshot id" in cli.fails(2, "snapshots", "rm", "not-an-id")
    keys = {"dry_run", "snapshots_deleted", "chunks_deleted", "bytes_freed"}
    dry = cli.json("snapshots", "gc", "--dry-run", "--json")
    assert set(dry) == keys and dry["dry_run"] is True
    done = cli.json("snapshots", "gc", "--json")
    assert set(done) == keys and done["dry_run"] is False


def test_snapshots_ls_reports_chunks_and_manifest(cli: Cli) -> None:
    only_on_gpu(cli, "alpha")
    cli.ok("evict", "alpha", "--to", "disk")
    snap = cli.json("snapshots", "ls", "--model", "alpha", "--json")["snapshots"][0]
    assert snap["chunks"] > 0 and snap["manifest_hash"] and snap["unique_bytes"] > 0


# -- errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["generate", "nope", "hi"],
        ["generate", "nope", "hi", "--json"],
        ["acquire", "nope"],
        ["evict", "nope", "--to", "host"],
        ["pin", "nope"],
        ["unpin", "nope"],
        ["prefetch", "nope", "--to", "host"],
        ["explain", "nope", "--json"],
        ["models", "nope"],
        ["unregister", "nope"],
    ],
    ids=lambda args: "-".join(a.strip("-") for a in args),
)
def test_an_unknown_model_is_one_line_and_exit_3(cli: Cli, args: list[str]) -> None:
    assert cli.fails(3, *args) == NOT_FOUND


@pytest.mark.parametrize(
    "args", [["status"], ["ps", "--json"], ["generate", "alpha", "hi"], ["events", "--follow"]]
)
def test_daemon_down_says_it_is_not_running(tmp_path: Path, args: list[str]) -> None:
    nobody = tmp_path / "torpord.sock"
    line = Cli(nobody).fails(8, *args)
    assert line == (
        f"torpor: error: torpord is not running (no socket at {nobody}); start it with "
        "`torpord` (or `make run` in a torpor checkout), or point --socket, $TORPOR_SOCKET "
        "or --address at a running one"
    )


def test_daemon_down_behind_a_stale_socket(tmp_path: Path) -> None:
    stale = tmp_path / "torpord.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))  # a socket file nobody listens on (a torpord that died)
        line = Cli(stale).fails(8, "ps")
    assert line.startswith(f"torpor: error: torpord is not running (nothing answers on {stale})")
