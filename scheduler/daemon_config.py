"""torpord's configuration: one TOML file, then environment, then command-line overrides.

Precedence, later wins: built-in defaults < the TOML file < `TORPOR_<SECTION>_<KEY>`
environment variables < command-line overrides. Defaults that follow other keys (the socket
under `runtime_dir`; the catalog, snapshots and model root under `state_dir`) are derived
after merging, so `--state-dir` moves them all unless they are set explicitly.

Every key is a field of a frozen section dataclass with a docstring and a `Rule`; a bad value
raises InvalidArgument naming the dotted key, the value, the rule and where it came from.
Unknown keys are errors that name close matches. docs/CONFIG.md is the reference and
deploy/torpord.toml lists every key with its default; a test keeps both in step with this file.
"""

from __future__ import annotations

import difflib
import json
import os
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from torpor.errors import FailedPrecondition, InvalidArgument, NotFound
from torpor.paths import default_runtime_dir, default_state_dir
from torpor.scheduler.config_rules import (
    GiB,
    MiB,
    Rule,
    TiB,
    _derived,
    _half_host_memory,
    _invalid,
    _key,
    is_loopback,
)
from torpor.store.store_config import CatalogConfig, SnapshotStoreConfig

DEFAULT_CONFIG_PATH = Path("/etc/torpor/torpord.toml")
"""Read when torpord gets no --config and the file exists."""
ENV_PREFIX = "TORPOR_"
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes on Linux, one of them the NUL


class _Section:
    """Parses and bounds every field after construction; subclasses add cross-field rules."""

    __slots__ = ()
    NAME: ClassVar[str]

    def __post_init__(self) -> None:
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            try:
                parsed = f.metadata["rule"].parse(value)
            except ValueError as exc:
                raise _invalid(f"{self.NAME}.{f.name}", value, str(exc)) from None
            object.__setattr__(self, f.name, parsed)
        self._check()

    def _check(self) -> None:
        """Rules that involve several fields of the section."""


@dataclass(frozen=True, slots=True, kw_only=True)
class DaemonSection(_Section):
    """[daemon]: where torpord keeps its files, how it is reached, how it logs and stops."""

    NAME: ClassVar[str] = "daemon"
    state_dir: Path = field(
        metadata=_derived(
            "$STATE_DIRECTORY, else /var/lib/torpor (root) or ~/.local/state/torpor", kind="path"
        )
    )
    """Persistent state: the SQLite catalog, snapshots and demo models by default."""
    runtime_dir: Path = field(
        metadata=_derived(
            "$RUNTIME_DIRECTORY, else /run/torpor (root) or $XDG_RUNTIME_DIR/torpor", kind="path"
        )
    )
    """Volatile files: the daemon socket and the workers' private sockets."""
    socket: Path = field(metadata=_derived("<runtime_dir>/torpord.sock", kind="path"))
    """Unix socket that serves the Scheduler and Admin services (at most 107 bytes)."""
    socket_mode: int = _key(0o660, kind="mode", lo=0, hi=0o777)
    """Permission bits of the socket: 0660 lets the socket's group (the operators) in."""
    listen: str = _key("", kind="hostport")
    """Also serve on TCP at HOST:PORT; "" serves no TCP. Every TCP call needs a bearer token
    from tokens_file (unless tcp_auth is off on loopback), and an address that is not
    loopback also needs tls_cert and tls_key."""
    tcp_auth: bool = _key(True, kind="bool")
    """Check bearer tokens on TCP. false is INSECURE: anyone who can reach a loopback listen
    (any local user or container sharing the host network) may call every RPC, Admin
    included; it is refused for an address that is not loopback."""
    tokens_file: Path | None = _key("", kind="optpath")  # noqa: RUF009 (a frozen Rule)
    """Hashed bearer tokens for TCP, one `SCOPE sha256:HEX [NAME]` per line (scope admin or
    client); `torpor token new` prints a token and its line. Read once at start."""
    tls_cert: Path | None = _key("", kind="optpath")  # noqa: RUF009 (a frozen Rule)
    """PEM certificate chain that TCP serves with TLS; "" serves plaintext (loopback only)."""
    tls_key: Path | None = _key("", kind="optpath")  # noqa: RUF009 (a frozen Rule)
    """PEM private key of tls_cert (readable by torpord only)."""
    tls_client_ca: Path | None = _key("", kind="optpath")  # noqa: RUF009 (a frozen Rule)
    """PEM CA bundle: when set, TCP clients must also present a certificate it signed
    (mutual TLS), besides their token."""
    http_listen: str = _key("127.0.0.1:8080", kind="hostport")
    """The OpenAI-compatible HTTP API at HOST:PORT (`/v1/models`, `/v1/completions`,
    `/v1/chat/completions`); "" serves none. An address that is not loopback needs
    api_keys_file, unless http_insecure says otherwise."""
    api_keys_file: Path | None = _key("", kind="optpath")  # noqa: RUF009 (a frozen Rule)
    """Hashed API keys of the HTTP API, one `SCOPE sha256:HEX [NAME]` per line, as
    tokens_file (`torpor token new client` prints one). When set, every HTTP request needs
    `Authorization: Bearer <key>`. Read once at start."""
    http_insecure: bool = _key(False, kind="bool")
    """Serve the HTTP API on an address that is not loopback without API keys: INSECURE,
    anyone who reaches the port may generate on every model."""
    http_timeout_s: float = _key(600.0, kind="float", lo=1, hi=86400)
    """The most seconds an HTTP request may take, queueing and restore included; past it the
    request fails with 504 (DEADLINE_EXCEEDED)."""
    metrics_port: int = _key(9464, kind="int", lo=0, hi=65535)
    """Prometheus /metrics on 127.0.0.1 at this port; 0 disables the endpoint."""
    log_level: str = _key("info", kind="choice", choices=("debug", "info", "warning", "error"))
    """Lowest level of the events that are logged."""
    log_format: str = _key("auto", kind="choice", choices=("auto", "json", "console"))
    """JSON lines, or console lines; auto is JSON unless stderr is a terminal."""
    drain_timeout_s: float = _key(30.0, kind="float", lo=0, hi=3600)
    """On SIGTERM: seconds to let in-flight requests finish before workers are stopped."""
    model_roots: tuple[Path, ...] = field(
        metadata=_derived("[<state_dir>/models]", kind="path", many=True)
    )
    """Directories under which a model's source checkpoint must lie; [] accepts none."""

    @property
    def log_json(self) -> bool | None:
        """`json=` for torpor.log.configure: None lets it decide by the terminal."""
        return {"auto": None, "json": True, "console": False}[self.log_format]

    def _check(self) -> None:
        if len(os.fsencode(self.socket)) > _SUN_PATH_MAX:
            raise _invalid("daemon.socket", str(self.socket), "a path of at most 107 bytes")
        self._check_tcp()
        self._check_http()

    def _check_http(self) -> None:
        """The HTTP API off loopback only with keys, or with http_insecure said out loud."""
        remote = bool(self.http_listen) and not is_loopback(self.http_listen)
        if remote and self.api_keys_file is None and not self.http_insecure:
            rule = (
                f"a keys file when daemon.http_listen ({self.http_listen}) is not "
                "loopback (or daemon.http_insecure = true, which serves it to anyone)"
            )
            raise _invalid("daemon.api_keys_file", "", rule)

    def _check_tcp(self) -> None:
        """TCP has no file mode to guard it, so it is served only with what authenticates a
        caller (issue 12): tokens always, unless tcp_auth is off on loopback; TLS off it."""
        if (self.tls_cert is None) != (self.tls_key is None):
            given, missing = ("tls_cert", "tls_key")
            if self.tls_cert is None:
                given, missing = missing, given
            raise _invalid(f"daemon.{missing}", "", f"set together with daemon.{given}")
        if self.tls_client_ca is not None and self.tls_cert is None:
            rule = "set only with daemon.tls_cert and daemon.tls_key"
            raise _invalid("daemon.tls_client_ca", str(self.tls_client_ca), rule)
        if not self.listen:
            return
        remote = f"when daemon.listen ({self.listen}) is not loopback"
        if not is_loopback(self.listen):
            if not self.tcp_auth:
                raise _invalid("daemon.tcp_auth", False, f"true {remote}")
            if self.tls_cert is None:
                rule = f"a PEM certificate, with daemon.tls_key, {remote}"
                raise _invalid("daemon.tls_cert", "", rule)
        if self.tcp_auth and self.tokens_file is None:
            rule = (
                f"a tokens file when daemon.listen is set ({self.listen}); on loopback, "
                "daemon.tcp_auth = false serves TCP without tokens (insecure)"
            )
            raise _invalid("daemon.tokens_file", "", rule)


@dataclass(frozen=True, slots=True, kw_only=True)
class BackendSection(_Section):
    """[backend]: which devices torpord places runtimes on."""

    NAME: ClassVar[str] = "backend"
    kind: str = _key("auto", kind="choice", choices=("auto", "cuda", "cpu"))
    """cuda: NVIDIA GPUs through NVML; cpu: simulated devices in host memory; auto: cuda
    when NVML reports a GPU, else cpu."""
    cpu_devices: int = _key(1, kind="int", lo=1, hi=64)
    """CPU backend: the number of simulated devices."""
    cpu_device_memory: int = _key(256 * MiB, kind="size", lo=16 * MiB, hi=4 * TiB)
    """CPU backend: the memory of each simulated device, in bytes (real host memory)."""
    gpus: tuple[int, ...] = _key((), kind="int", lo=0, hi=255, many=True)
    """CUDA backend: NVML indices of the GPUs to use; [] uses every GPU."""


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreSection(_Section):
    """[store]: the catalog database and the snapshot chunk store (see docs/STORE.md)."""

    NAME: ClassVar[str] = "store"
    catalog_url: str = field(metadata=_derived("sqlite:///<state_dir>/catalog.db", kind="url"))
    """SQLAlchemy URL of the catalog; postgresql+psycopg://user@host/db to share it."""
    snapshot_dir: Path = field(metadata=_derived("<state_dir>/snapshots", kind="path"))
    """Root of the snapshot chunk store; put it on local NVMe."""
    capacity: int = _key(100 * GiB, kind="size", lo=MiB, hi=1024 * TiB)
    """Disk budget for snapshot chunks (shared chunks counted once), in bytes; least
    recently used snapshots are deleted to stay within it."""
    max_chunk_size: int = _key(64 * MiB, kind="size", lo=MiB, hi=2 * GiB)
    """Largest chunk file, in bytes; bounds the pager's staging buffers."""
    sweep_interval_s: float = _key(300.0, kind="float", lo=0, hi=86400)
    """Seconds between sweeps of temp and orphan chunk files left by failed or killed
    snapshot writes, while torpord runs; 0 sweeps only after a failed write."""
    busy_timeout_s: float = _key(30.0, kind="float", lo=0, hi=3600)
    """SQLite: how long a writer waits for another writer's lock."""
    pool_size: int = _key(5, kind="int", lo=1, hi=64)
    """PostgreSQL: pooled connections."""
    bandwidth_alpha: float = _key(0.2, kind="float", lo=0, hi=1, lo_open=True)
    """Weight of a new sample in the measured-bandwidth mean (1 keeps the last one only)."""
    sql_echo: bool = _key(False, kind="bool")
    """Log every SQL statement (debugging only)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class BudgetsSection(_Section):
    """[budgets]: memory that runtimes may use besides the GPUs' own."""

    NAME: ClassVar[str] = "budgets"
    host_memory: int = _key("auto", kind="size", lo=64 * MiB, hi=1024 * TiB, auto=_half_host_memory)
    """Pinned host RAM for suspended runtimes' copies, in bytes; auto is half of the
    host's physical memory."""
    gpu_reserve: int = _key(512 * MiB, kind="size", lo=0, hi=TiB)
    """Bytes of each NVIDIA GPU never given to runtimes (other processes, fragmentation);
    simulated CPU devices have no reserve."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicySection(_Section):
    """[policy]: the knobs of plan() (queues, eviction, leases)."""

    NAME: ClassVar[str] = "policy"
    queue_bound: int = _key(64, kind="int", lo=1, hi=100_000)
    """Requests that may wait per model; one more is RESOURCE_EXHAUSTED."""
    keep_alive_s: float = _key(0.0, kind="float", lo=0, hi=7 * 86400)
    """Keep-alive for models whose spec has keep_alive_s 0: an idle runtime is not evicted
    within this many seconds of its last use. 0 means none."""
    min_residency_s: float = _key(5.0, kind="float", lo=0, hi=3600)
    """A runtime that became resident less than this many seconds ago is not evicted
    (against thrashing)."""
    starvation_cap: int = _key(8, kind="int", lo=1, hi=10_000)
    """Queued requests served for a resident model, while another model waits for its
    GPU, before the waiting model gets its turn."""
    starvation_wait_s: float = _key(30.0, kind="float", lo=0, hi=3600)
    """A waiting model whose oldest request has waited this long gets its turn even before
    the starvation cap is reached."""
    lease_ttl_s: float = _key(60.0, kind="float", lo=1, hi=3600)
    """Lifetime of a lease whose Acquire asks for none."""
    lease_max_ttl_s: float = _key(3600.0, kind="float", lo=1, hi=3600)
    """Longest lease lifetime a client may ask for; longer asks are clipped to it."""
    rate_half_life_s: float = _key(300.0, kind="float", lo=1, hi=7 * 86400)
    """Half-life of the decayed request rate that estimates a model's reuse."""
    priority_weight: float = _key(1.0, kind="float", lo=0, hi=1_000_000)
    """Eviction score added per unit of model priority (the reuse term is per GiB freed)."""
    max_workers: int = _key(16, kind="int", lo=1, hi=1024)
    """Worker processes (runtimes with a live worker, any tier) alive at once."""
    max_load_failures: int = _key(3, kind="int", lo=1, hi=1000)
    """Consecutive failed loads of a model after which its queued requests get
    UNAVAILABLE."""

    def _check(self) -> None:
        if self.lease_max_ttl_s < self.lease_ttl_s:
            raise _invalid(
                "policy.lease_max_ttl_s",
                self.lease_max_ttl_s,
                f"at least policy.lease_ttl_s ({self.lease_ttl_s})",
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerSection(_Section):
    """[worker]: how torpord starts and drives its worker processes."""

    NAME: ClassVar[str] = "worker"
    start_timeout_s: float = _key(60.0, kind="float", lo=1, hi=3600)
    """Seconds from spawning a worker, or a GPU's keeper, until its socket answers (loading
    not included)."""
    stop_timeout_s: float = _key(10.0, kind="float", lo=0, hi=600)
    """Seconds a worker gets to exit after Shutdown before it is killed."""
    transition_timeout_s: float = _key(300.0, kind="float", lo=1, hi=86400)
    """Seconds a worker may go without answering during a load, restore, suspend or
    snapshot write (a streamed one restarts the clock with every progress report) before
    it counts as hung: it is killed, the transition fails and its waiting requests are
    planned again."""
    handle_size: int = _key(512 * MiB, kind="size", lo=2 * MiB, hi=64 * GiB)
    """Physical handle size of the pager's arenas, in bytes (rounded up to the device's
    granularity); large handles map faster."""
    deep_suspend: bool = _key(True, kind="bool")
    """Allow SUSPENDED_DEEP (driver checkpoint of the CUDA context); CUDA backend only."""
    keeper: bool = _key(True, kind="bool")
    """Run a keeper process per GPU (started with its first worker) that holds deep-suspended
    runtimes' page-locked host copies and fills their arenas back at DMA speed; it costs one
    CUDA context per GPU. Only with deep_suspend on; CUDA backend only."""
    exchange_swap: str = _key("auto", kind="choice", choices=("auto", "on", "off"))
    """Let the policy trade a resident runtime and one coming back from host RAM in place
    when host RAM holds one copy but not both (docs/POLICY.md "Exchange swap"). auto: on
    for the CPU backend; off on CUDA until it has been measured there (docs/PAGER.md)."""
    python: str = _key("auto", kind="exe", auto=lambda: sys.executable)
    """Python interpreter that runs `-m torpor.worker.main`; auto is torpord's own."""


SECTIONS: dict[str, type[_Section]] = {
    cls.NAME: cls
    for cls in (
        DaemonSection, BackendSection, StoreSection, BudgetsSection, PolicySection, WorkerSection
    )
}  # fmt: skip


@dataclass(frozen=True, slots=True, kw_only=True)
class DaemonConfig:
    """The whole, validated configuration of one torpord."""

    daemon: DaemonSection
    backend: BackendSection
    store: StoreSection
    budgets: BudgetsSection
    policy: PolicySection
    worker: WorkerSection

    def catalog_config(self) -> CatalogConfig:
        """The store's catalog config (`daemon.model_roots` bound its model sources)."""
        s = self.store
        return CatalogConfig(
            url=s.catalog_url,
            model_roots=self.daemon.model_roots,
            busy_timeout_s=s.busy_timeout_s,
            pool_size=s.pool_size,
            bandwidth_alpha=s.bandwidth_alpha,
            echo=s.sql_echo,
        )

    def snapshot_store_config(self) -> SnapshotStoreConfig:
        s = self.store
        return SnapshotStoreConfig(
            root=s.snapshot_dir, capacity_bytes=s.capacity, max_chunk_bytes=s.max_chunk_size
        )

    def as_dict(self) -> dict[str, dict[str, object]]:
        """The effective values, JSON-safe (for `torpor status` and logs); passwords masked."""
        out: dict[str, dict[str, object]] = {}
        for name in SECTIONS:
            section = getattr(self, name)
            out[name] = {f.name: _plain(getattr(section, f.name)) for f in fields(section)}
        out["daemon"]["socket_mode"] = f"{self.daemon.socket_mode:04o}"
        out["store"]["catalog_url"] = self.catalog_config().parsed_url().render_as_string()
        return out

    def to_toml(self) -> str:
        """The effective config as a TOML file that load_config reads back."""
        lines: list[str] = []
        for section, values in self.as_dict().items():
            lines += [f"[{section}]"] + [f"{k} = {json.dumps(v)}" for k, v in values.items()]
            lines.append("")
        return "\n".join(lines)


def _plain(value: object) -> object:
    if value is None:
        return ""  # an unset optional path: TOML has no null
    if isinstance(value, tuple):
        return [_plain(item) for item in value]
    return str(value) if isinstance(value, Path) else value


def config_keys() -> list[str]:
    """Every dotted key, in section and field order."""
    return [f"{name}.{f.name}" for name, cls in SECTIONS.items() for f in fields(cls)]  # type: ignore[arg-type]


def env_var(key: str) -> str:
    """The environment variable of a dotted key: policy.min_residency_s is
    TORPOR_POLICY_MIN_RESIDENCY_S."""
    return ENV_PREFIX + key.replace(".", "_").upper()


CLI_OPTIONS: dict[str, str] = {
    "--state-dir": "daemon.state_dir",
    "--socket": "daemon.socket",
    "--listen": "daemon.listen",
    "--metrics-port": "daemon.metrics_port",
    "--http-listen": "daemon.http_listen",
    "--backend": "backend.kind",
    "--cpu-devices": "backend.cpu_devices",
    "--cpu-device-memory": "backend.cpu_device_memory",
}
"""torpord's options that override a key (issue 6), by option."""


def overrides_from_args(args: object) -> dict[str, object]:
    """The overrides of an argparse namespace: each CLI_OPTIONS option not left at None."""
    values = {
        key: getattr(args, opt[2:].replace("-", "_"), None) for opt, key in CLI_OPTIONS.items()
    }
    return {key: value for key, value in values.items() if value is not None}


def default_config_path(env: Mapping[str, str]) -> Path | None:
    """$TORPOR_CONFIG if set, else DEFAULT_CONFIG_PATH when it exists, else None."""
    if env.get("TORPOR_CONFIG"):
        return Path(env["TORPOR_CONFIG"])
    return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.is_file() else None


def load_config(
    path: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> DaemonConfig:
    """Defaults < the TOML file at `path` < `env` (os.environ when None) < `overrides`.

    `overrides` maps dotted keys to values, typed or as text; None values are skipped, so
    an argparse default of None means "not given".
    """
    env = os.environ if env is None else env
    values: dict[str, tuple[object, str]] = {}  # dotted key -> (value, where it came from)
    if path is not None:
        for key, value in _read_toml(Path(path)).items():
            values[key] = (value, str(path))
    for name, text in sorted(env.items()):
        section, _, key = name.removeprefix(ENV_PREFIX).lower().partition("_")
        if name.startswith(ENV_PREFIX) and section in SECTIONS:
            values[_known(f"{section}.{key}", name)] = (text, name)
    for key, value in (overrides or {}).items():
        if value is not None:
            values[_known(key, "the command line")] = (value, "the command line")
    _derive(values, env)
    return _build(values)


def _read_toml(path: Path) -> dict[str, object]:
    try:
        with path.open("rb") as f:
            document = tomllib.load(f)
    except FileNotFoundError:
        raise NotFound(f"config file {path} does not exist", reason="NO_CONFIG") from None
    except OSError as exc:
        raise FailedPrecondition(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise InvalidArgument(f"{path} is not valid TOML: {exc}", reason="INVALID_CONFIG") from None
    flat: dict[str, object] = {}
    for section, table in document.items():
        if not isinstance(table, dict):
            raise _unknown(section, f"{path}, outside any [section]", _suggest(section))
        if section not in SECTIONS:
            raise _unknown(section, str(path), difflib.get_close_matches(section, SECTIONS))
        for key, value in table.items():
            flat[_known(f"{section}.{key}", str(path))] = value
    return flat


def _known(key: str, origin: str) -> str:
    section, _, name = key.partition(".")
    if section in SECTIONS and name in SECTIONS[section].__dataclass_fields__:  # type: ignore[attr-defined]
        return key
    raise _unknown(key, origin, _suggest(key))


def _suggest(key: str) -> list[str]:
    """Keys close to `key`, by dotted key or by name alone (a key in the wrong section)."""
    keys = config_keys()
    by_name = {k.partition(".")[2]: k for k in keys}
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.7)
    name = key.rpartition(".")[2]
    close += [by_name[n] for n in difflib.get_close_matches(name, by_name, n=3)]
    return list(dict.fromkeys(close))[:3]


def _unknown(key: str, origin: str, close: list[str] | None = None) -> InvalidArgument:
    names = [env_var(k) for k in close or []] if origin.startswith(ENV_PREFIX) else close or []
    hint = f"; did you mean {' or '.join(names)}?" if names else "; docs/CONFIG.md lists the keys"
    return InvalidArgument(
        f"unknown config key {key!r} (from {origin}){hint}",
        reason="UNKNOWN_CONFIG_KEY",
        metadata={"field": key, "source": origin, "suggestions": ",".join(close or [])},
    )


def _derive(values: dict[str, tuple[object, str]], env: Mapping[str, str]) -> None:
    """Fill the defaults that follow the environment or other keys."""

    def systemd_dir(variable: str, fallback: str) -> tuple[object, str]:
        first = env.get(variable, "").split(":")[0]  # systemd joins several with ':'
        return (first, f"${variable}") if first else (fallback, "the default")

    values.setdefault(
        "daemon.state_dir", systemd_dir("STATE_DIRECTORY", str(default_state_dir(env)))
    )
    values.setdefault(
        "daemon.runtime_dir", systemd_dir("RUNTIME_DIRECTORY", str(default_runtime_dir(env)))
    )
    state = _parsed("daemon.state_dir", values)
    runtime = _parsed("daemon.runtime_dir", values)
    derived = {
        "daemon.socket": runtime / "torpord.sock",
        "daemon.model_roots": (state / "models",),
        "store.catalog_url": CatalogConfig.in_state_dir(state).url,
        "store.snapshot_dir": state / "snapshots",
    }
    for key, value in derived.items():
        values.setdefault(key, (value, "the default (derived)"))


def _parsed(key: str, values: dict[str, tuple[object, str]]) -> Path:
    value, origin = values[key]
    try:
        return Rule("path").parse(value)  # type: ignore[return-value]
    except ValueError as exc:
        raise _with_origin(_invalid(key, value, str(exc)), origin) from None


def _with_origin(error: InvalidArgument, origin: str) -> InvalidArgument:
    return InvalidArgument(
        f"{error.message} (set by {origin})",
        reason=error.reason,
        metadata={**error.metadata, "source": origin},
    )


def _build(values: dict[str, tuple[object, str]]) -> DaemonConfig:
    sections: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        kwargs = {
            k.partition(".")[2]: v for k, (v, _) in values.items() if k.startswith(name + ".")
        }
        try:
            sections[name] = cls(**kwargs)
        except InvalidArgument as exc:
            origin = values.get(exc.metadata.get("field", ""), (None, "the default"))[1]
            raise _with_origin(exc, origin) from None
    return DaemonConfig(**sections)
