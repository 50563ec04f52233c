"""TCP needs authentication (issue 12): a real torpord (CPU backend) serving
`daemon.listen` on loopback with TLS and a tokens file made by `torpor token new`.

A client token may call the Scheduler service and health but gets PERMISSION_DENIED on Admin;
a missing or wrong token gets UNAUTHENTICATED on every service; a refused call changes
nothing (checked over the Unix socket, which needs no token); plaintext to the TLS port
fails; loopback TCP without tokens is refused at start unless `daemon.tcp_auth = false`; with
`daemon.tls_client_ca` a client must also present a certificate. The CLI reaches it with
`--address`, `--tls-ca` and a token. Certificates are made here with the openssl CLI.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.cli.conftest import TORPOR, client_env
from tests.daemon import conftest as daemon_conftest
from tests.daemon.conftest import MAX_SEQ_LEN, Torpord, footprint_bytes, start_torpord
from torpor import errors
from torpor.rpc_status import from_rpc_error
from torpor.scheduler import auth
from torpor.v1 import admin_pb2, admin_pb2_grpc, common_pb2, scheduler_pb2, scheduler_pb2_grpc

model_root = daemon_conftest.model_root  # the session's demo checkpoints, shared


# -- certificates and tokens ------------------------------------------------------------


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(d: Path, name: str) -> None:
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-keyout",
            f"{name}.key", "-out", f"{name}.pem", "-subj", f"/CN={name}", cwd=d)  # fmt: skip


def make_leaf(d: Path, name: str, ca: str, san: str) -> None:
    """A key and certificate for `name`, signed by `ca`, with subjectAltName `san`."""
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
            "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)  # fmt: skip
    (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext",
            "-out", f"{name}.pem", cwd=d)  # fmt: skip


@dataclass
class Pki:
    dir: Path
    admin: str  # tokens, as `torpor token new` printed them
    client: str
    tokens: Path

    def pem(self, name: str) -> bytes:
        return (self.dir / f"{name}.pem").read_bytes()

    def key(self, name: str) -> bytes:
        return (self.dir / f"{name}.key").read_bytes()


def token_new(scope: str, name: str, tokens: Path) -> str:
    proc = subprocess.run(
        [*TORPOR, "token", "new", "--scope", scope, "--name", name, "--append", str(tokens),
         "--json"], capture_output=True, text=True, timeout=60, env=client_env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["line"].startswith(f"{scope} sha256:") and doc["token"] not in doc["line"]
    return str(doc["token"])


@pytest.fixture(scope="module")
def pki() -> Iterator[Pki]:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl CLI to make certificates")
    with tempfile.TemporaryDirectory(prefix="torpor-pki-") as tmp:
        d = Path(tmp)
        make_ca(d, "ca")
        make_ca(d, "rogue")  # a CA nobody trusts
        make_leaf(d, "server", "ca", "IP:127.0.0.1,DNS:localhost")
        make_leaf(d, "client", "ca", "DNS:client")
        make_leaf(d, "stranger", "rogue", "DNS:stranger")
        tokens = d / "tokens"
        admin, client = token_new("admin", "ops", tokens), token_new("client", "app", tokens)
        text = tokens.read_text()
        assert admin not in text and client not in text  # the file holds no usable secret
        yield Pki(d, admin, client, tokens)


# -- the daemon -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Tcp:
    daemon: Torpord  # its channel is the Unix socket, which needs no token
    address: str


def tls_env(pki: Pki, port: int) -> dict[str, str]:
    return {
        "TORPOR_DAEMON_LISTEN": f"127.0.0.1:{port}",
        "TORPOR_DAEMON_TOKENS_FILE": str(pki.tokens),
        "TORPOR_DAEMON_TLS_CERT": str(pki.dir / "server.pem"),
        "TORPOR_DAEMON_TLS_KEY": str(pki.dir / "server.key"),
    }


@pytest.fixture(scope="module")
def tcp(pki: Pki, model_root: Path) -> Iterator[Tcp]:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="torpor-") as tmp:  # short: socket paths
        memory = int(2.5 * footprint_bytes(model_root))
        daemon = start_torpord(Path(tmp) / "s", model_root, memory, **tls_env(pki, port))
        try:
            daemon.register("alpha", model_root / "alpha")
            yield Tcp(daemon, f"127.0.0.1:{port}")
        finally:
            assert daemon.stop() == 0


def tls_channel(pki: Pki, address: str, token: str | None, **creds: bytes) -> grpc.Channel:
    """A TLS channel trusting the test CA; with `token`, every call carries
    `authorization: Bearer <token>` (gRPC's own access-token credentials)."""
    channel_creds = grpc.ssl_channel_credentials(root_certificates=pki.pem("ca"), **creds)
    if token is not None:
        channel_creds = grpc.composite_channel_credentials(
            channel_creds, grpc.access_token_call_credentials(token)
        )
    return grpc.secure_channel(address, channel_creds)


def rpc_error(method, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        result = method(request, timeout=30)
        if hasattr(result, "__next__"):
            list(result)
    return caught.value


def generate_request(model: str) -> scheduler_pb2.GenerateRequest:
    return scheduler_pb2.GenerateRequest(
        model=model,
        prompt_token_ids=common_pb2.TokenIds(ids=[1, 2, 3]),
        sampling=common_pb2.SamplingParams(max_tokens=4, temperature=0, ignore_eos=True),
    )


def every_service(channel: grpc.Channel, model_root: Path) -> list[tuple[str, object, object]]:
    """One call of each kind on each service: (name, method, request)."""
    sched = scheduler_pb2_grpc.SchedulerStub(channel)
    admin = admin_pb2_grpc.AdminStub(channel)
    spec = common_pb2.ModelSpec(
        name="intruder", source=str(model_root / "beta"), dtype=common_pb2.DTYPE_FLOAT32,
        max_batch=4, max_seq_len=MAX_SEQ_LEN,
    )  # fmt: skip
    return [
        ("ListModels", sched.ListModels, scheduler_pb2.ListModelsRequest()),
        ("RegisterModel", sched.RegisterModel, scheduler_pb2.RegisterModelRequest(spec=spec)),
        ("Generate", sched.Generate, generate_request("alpha")),
        ("ListResidency", admin.ListResidency, admin_pb2.ListResidencyRequest()),
        ("Evict", admin.Evict, admin_pb2.EvictRequest(model="alpha")),
        ("Health", health_pb2_grpc.HealthStub(channel).Check, health_pb2.HealthCheckRequest()),
    ]


def snapshot_of(daemon: Torpord) -> tuple[list[str], list[tuple[str, int, int]]]:
    """Models and runtimes (model, state, tier), read over the Unix socket."""
    models = daemon.scheduler.ListModels(scheduler_pb2.ListModelsRequest(), timeout=30)
    residency = daemon.residency()
    return (
        sorted(m.spec.name for m in models.models),
        sorted((r.model, r.state, r.tier) for r in residency.runtimes),
    )


# -- scopes -----------------------------------------------------------------------------


def test_a_client_token_calls_the_scheduler_but_not_admin(
    tcp: Tcp, pki: Pki, model_root: Path
) -> None:
    with tls_channel(pki, tcp.address, pki.client) as channel:
        sched = scheduler_pb2_grpc.SchedulerStub(channel)
        names = [m.spec.name for m in sched.ListModels(scheduler_pb2.ListModelsRequest()).models]
        assert names == ["alpha"]
        chunks = list(sched.Generate(generate_request("alpha"), timeout=120))
        assert sum(len(c.token_ids) for c in chunks) == 4
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        before = snapshot_of(tcp.daemon)
        assert before[1][0][:2] == ("alpha", common_pb2.RUNTIME_STATE_RESIDENT)
        admin = admin_pb2_grpc.AdminStub(channel)
        for method, request in [
            (admin.ListResidency, admin_pb2.ListResidencyRequest()),
            (admin.Evict, admin_pb2.EvictRequest(model="alpha")),
        ]:
            exc = rpc_error(method, request)
            assert exc.code() == grpc.StatusCode.PERMISSION_DENIED
            err = from_rpc_error(exc)
            assert isinstance(err, errors.PermissionDenied)
            assert err.reason == "SCOPE_ADMIN_REQUIRED" and err.metadata["scope"] == "client"
        assert snapshot_of(tcp.daemon) == before  # the Evict did not evict


def test_an_admin_token_calls_admin(tcp: Tcp, pki: Pki) -> None:
    with tls_channel(pki, tcp.address, pki.admin) as channel:
        reply = admin_pb2_grpc.AdminStub(channel).ListResidency(
            admin_pb2.ListResidencyRequest(include_cold=True), timeout=30
        )
        assert [r.model for r in reply.runtimes] == ["alpha"]


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (None, "TOKEN_MISSING"),
        ("torpor_not-a-token-anyone-made", "TOKEN_UNKNOWN"),
        ("", "TOKEN_MISSING"),
    ],
    ids=["missing", "wrong", "empty"],
)
def test_a_missing_or_wrong_token_is_unauthenticated_everywhere_and_changes_nothing(
    tcp: Tcp, pki: Pki, model_root: Path, token: str | None, reason: str
) -> None:
    before = snapshot_of(tcp.daemon)
    with tls_channel(pki, tcp.address, token) as channel:
        for name, method, request in every_service(channel, model_root):
            exc = rpc_error(method, request)
            assert exc.code() == grpc.StatusCode.UNAUTHENTICATED, name
            err = from_rpc_error(exc)
            assert isinstance(err, errors.Unauthenticated) and err.reason == reason, name
    assert snapshot_of(tcp.daemon) == before  # "intruder" not registered, alpha not evicted


def test_an_undecodable_body_without_a_token_is_unauthenticated(tcp: Tcp, pki: Pki) -> None:
    """A caller who is not let in never gets its bytes parsed (no UNKNOWN), nor learns which
    methods exist (no UNIMPLEMENTED)."""
    with tls_channel(pki, tcp.address, None) as channel:
        for method in ("/torpor.v1.Admin/Evict", "/torpor.v1.Admin/NoSuchMethod"):
            raw = channel.unary_unary(method)  # bytes in, bytes out
            exc = rpc_error(raw, b"\xff\xff\xff\xff")
            assert exc.code() == grpc.StatusCode.UNAUTHENTICATED, method


def test_a_token_hash_is_not_a_token(tcp: Tcp, pki: Pki) -> None:
    """The tokens file's digest, presented as a token, is refused: the file is no secret."""
    digest = pki.tokens.read_text().split()[1]
    with tls_channel(pki, tcp.address, digest) as channel:
        exc = rpc_error(admin_pb2_grpc.AdminStub(channel).ListResidency,
                        admin_pb2.ListResidencyRequest())  # fmt: skip
    assert exc.code() == grpc.StatusCode.UNAUTHENTICATED


# -- transport --------------------------------------------------------------------------


def test_plaintext_to_the_tls_port_fails(tcp: Tcp, pki: Pki) -> None:
    before = snapshot_of(tcp.daemon)
    token = [("authorization", f"Bearer {pki.admin}")]
    with grpc.insecure_channel(tcp.address) as channel:
        for method, request in [
            (admin_pb2_grpc.AdminStub(channel).Evict, admin_pb2.EvictRequest(model="alpha")),
            (health_pb2_grpc.HealthStub(channel).Check, health_pb2.HealthCheckRequest()),
        ]:
            exc = rpc_error(functools.partial(method, metadata=token), request)
            assert exc.code() == grpc.StatusCode.UNAVAILABLE
    assert snapshot_of(tcp.daemon) == before


def test_a_server_certificate_from_an_untrusted_ca_is_refused(tcp: Tcp, pki: Pki) -> None:
    creds = grpc.ssl_channel_credentials(root_certificates=pki.pem("rogue"))
    with grpc.secure_channel(tcp.address, creds) as channel:
        exc = rpc_error(health_pb2_grpc.HealthStub(channel).Check, health_pb2.HealthCheckRequest())
    assert exc.code() == grpc.StatusCode.UNAVAILABLE


def torpord_argv(state: Path) -> list[str]:
    return [sys.executable, "-m", "torpor.scheduler.daemon", "--state-dir", str(state),
            "--socket", str(state / "torpord.sock"), "--metrics-port", "0",
            "--backend", "cpu"]  # fmt: skip


def test_loopback_tcp_without_tokens_is_refused_at_start(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "TORPOR_DAEMON_RUNTIME_DIR": str(tmp_path / "run"),
        "TORPOR_DAEMON_LISTEN": f"127.0.0.1:{free_port()}",
    }
    proc = subprocess.run(torpord_argv(tmp_path / "s"), env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2
    assert "daemon.tokens_file" in proc.stderr and "daemon.tcp_auth = false" in proc.stderr
    assert not (tmp_path / "s" / "torpord.sock").exists()


def test_an_unreadable_tokens_file_stops_the_start(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "TORPOR_DAEMON_RUNTIME_DIR": str(tmp_path / "run"),
        "TORPOR_DAEMON_LISTEN": f"127.0.0.1:{free_port()}",
        "TORPOR_DAEMON_TOKENS_FILE": str(tmp_path / "missing-tokens"),
    }
    proc = subprocess.run(torpord_argv(tmp_path / "s"), env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 1
    assert f"cannot read daemon.tokens_file {tmp_path / 'missing-tokens'}" in proc.stderr


def test_tcp_auth_false_serves_loopback_without_a_token(tmp_path: Path, model_root: Path) -> None:
    """The documented, insecure opt-out: plaintext loopback TCP with no token check."""
    port = free_port()
    daemon = start_torpord(tmp_path / "s", model_root, 64 << 20,
                           TORPOR_DAEMON_LISTEN=f"127.0.0.1:{port}",
                           TORPOR_DAEMON_TCP_AUTH="false")  # fmt: skip
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = admin_pb2_grpc.AdminStub(channel).ListResidency(
                admin_pb2.ListResidencyRequest(), timeout=30
            )
            assert len(reply.gpus) == 1
    finally:
        assert daemon.stop() == 0


def test_mutual_tls_needs_a_client_certificate_and_a_token(
    tmp_path: Path, model_root: Path, pki: Pki
) -> None:
    port = free_port()
    env = {**tls_env(pki, port), "TORPOR_DAEMON_TLS_CLIENT_CA": str(pki.dir / "ca.pem")}
    daemon = start_torpord(tmp_path / "s", model_root, 64 << 20, **env)
    address = f"127.0.0.1:{port}"
    check = (health_pb2_grpc.HealthStub, health_pb2.HealthCheckRequest())
    try:
        with tls_channel(pki, address, pki.client) as channel:  # no client certificate
            assert rpc_error(check[0](channel).Check, check[1]).code() == (
                grpc.StatusCode.UNAVAILABLE
            )
        stranger = {"private_key": pki.key("stranger"), "certificate_chain": pki.pem("stranger")}
        with tls_channel(pki, address, pki.client, **stranger) as channel:
            assert rpc_error(check[0](channel).Check, check[1]).code() == (
                grpc.StatusCode.UNAVAILABLE
            )
        mine = {"private_key": pki.key("client"), "certificate_chain": pki.pem("client")}
        with tls_channel(pki, address, None, **mine) as channel:  # a certificate, no token
            exc = rpc_error(check[0](channel).Check, check[1])
            assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
        with tls_channel(pki, address, pki.client, **mine) as channel:
            status = check[0](channel).Check(check[1], timeout=30).status
            assert status == health_pb2.HealthCheckResponse.SERVING
    finally:
        assert daemon.stop() == 0


# -- the tokens file and the scope table, without a daemon ------------------------------


def test_the_tokens_file_holds_digests_and_names() -> None:
    app = auth.new_token(auth.Scope.CLIENT, "app")
    ops = auth.new_token(auth.Scope.ADMIN)
    text = f"# tokens of gpu1\n\n{app.line}   # the web app\n{ops.line}\n"
    tokens = auth.Tokens(auth.parse_tokens(text, "tokens"))
    assert [e.scope for e in tokens.entries] == [auth.Scope.CLIENT, auth.Scope.ADMIN]
    assert tokens.check(app.token) == tokens.entries[0] and tokens.entries[0].name == "app"
    assert tokens.check(ops.token) == tokens.entries[1]
    assert tokens.check(app.token + "x") is None and tokens.check("") is None


@pytest.mark.parametrize(
    "line",
    ["root sha256:" + "0" * 64, "client " + "0" * 64, "client sha256:abc",
     "client sha256:" + "g" * 64, "client sha256:" + "0" * 64 + " two names", "client"],
)  # fmt: skip
def test_a_bad_tokens_line_is_named_by_file_and_number(line: str) -> None:
    with pytest.raises(errors.FailedPrecondition) as info:
        auth.parse_tokens(f"# first\n{line}\n", "/etc/torpor/tokens")
    assert info.value.message.startswith("/etc/torpor/tokens:2: expected `admin|client sha256:")


@pytest.mark.parametrize(
    ("method", "client_may"),
    [
        ("/torpor.v1.Scheduler/Generate", True),
        ("/grpc.health.v1.Health/Check", True),
        ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", True),
        ("/torpor.v1.Admin/Shutdown", False),
        ("/torpor.v1.Worker/Load", False),  # a service not named stays admin-only
    ],
)
def test_the_scope_table(method: str, client_may: bool) -> None:
    app, ops = auth.new_token(auth.Scope.CLIENT), auth.new_token(auth.Scope.ADMIN)
    tokens = auth.Tokens(auth.parse_tokens(f"{app.line}\n{ops.line}\n", "t"))
    assert auth.authorize(tokens, method, [("authorization", f"Bearer {ops.token}")]) is None
    refusal = auth.authorize(tokens, method, [("authorization", f"bearer {app.token}")])
    assert (refusal is None) == client_may
    if refusal is not None:
        assert isinstance(refusal, errors.PermissionDenied)
    for metadata in ([], [("authorization", "Basic x")], [("authorization", "Bearer ")]):
        missing = auth.authorize(tokens, method, metadata)
        assert isinstance(missing, errors.Unauthenticated) and missing.reason == "TOKEN_MISSING"


# -- the CLI ----------------------------------------------------------------------------


def torpor_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TORPOR, *args], capture_output=True, text=True, timeout=120,
                          env=client_env(**env))  # fmt: skip


def test_the_cli_over_tcp_with_tls_and_a_token(tcp: Tcp, pki: Pki, tmp_path: Path) -> None:
    ca = str(pki.dir / "ca.pem")
    tcp_args = ("--address", tcp.address, "--tls-ca", ca)
    proc = torpor_cli(*tcp_args, "status", "--json", TORPOR_TOKEN=pki.admin)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["health"] == "serving"
    proc = torpor_cli(*tcp_args, "ps", "--json", TORPOR_TOKEN=pki.admin)
    assert proc.returncode == 0, proc.stderr
    assert [r["model"] for r in json.loads(proc.stdout)["runtimes"]] == ["alpha"]
    token_file = tmp_path / "token"
    token_file.write_text(pki.client + "\n")
    proc = torpor_cli(*tcp_args, "--token-file", str(token_file), "models", "--json")
    assert proc.returncode == 0, proc.stderr
    proc = torpor_cli(*tcp_args, "--token-file", str(token_file), "ps")
    assert proc.returncode == 13, proc.stderr  # PERMISSION_DENIED
    assert "needs an admin token" in proc.stderr
    proc = torpor_cli(*tcp_args, "ps")  # no token at all
    assert proc.returncode == 12, proc.stderr  # UNAUTHENTICATED
    assert "needs a bearer token" in proc.stderr
    proc = torpor_cli("--address", tcp.address, "ps", TORPOR_TOKEN=pki.admin)  # no TLS
    assert proc.returncode == 8 and "--tls-ca" in proc.stderr, proc.stderr


def test_the_cli_sends_no_token_in_plaintext_off_loopback() -> None:
    proc = torpor_cli("--address", "192.0.2.1:7070", "ps", TORPOR_TOKEN="torpor_x")
    assert proc.returncode == 2, proc.stderr
    assert "refusing to send a token in plaintext" in proc.stderr
