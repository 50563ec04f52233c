"""torpord's config: layers, derived defaults, every rule, unknown keys, the dump, the docs."""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from torpor.errors import InvalidArgument, NotFound
from torpor.scheduler import daemon_config as cfg
from torpor.scheduler.daemon_config import (
    SECTIONS,
    DaemonConfig,
    PolicySection,
    config_keys,
    env_var,
    load_config,
    overrides_from_args,
)

REPO = Path(__file__).resolve().parents[2]
MiB, GiB = 1024**2, 1024**3


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "torpord.toml"
    path.write_text(text)
    return path


def error(
    path: Path | None = None,
    env: dict[str, str] | None = None,
    overrides: dict[str, object] | None = None,
) -> InvalidArgument:
    """The InvalidArgument that load_config raises for these layers."""
    with pytest.raises(InvalidArgument) as info:
        load_config(path, env or {}, overrides or {})
    return info.value


def test_defaults_without_file_or_environment() -> None:
    c = load_config(None, {}, {})
    assert c.daemon.state_dir == Path("/var/lib/torpor")
    assert c.daemon.socket == Path("/run/torpor/torpord.sock")
    assert c.daemon.socket_mode == 0o660
    assert c.daemon.model_roots == (Path("/var/lib/torpor/models"),)
    assert c.store.catalog_url == "sqlite:////var/lib/torpor/catalog.db"
    assert c.store.snapshot_dir == Path("/var/lib/torpor/snapshots")
    assert c.backend.kind == "auto" and c.backend.cpu_device_memory == 256 * MiB
    assert c.budgets.host_memory == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    assert c.worker.python == str(Path(sys.executable).absolute())
    assert c.daemon.log_json is None


def test_systemd_directories_are_the_defaults() -> None:
    env = {"STATE_DIRECTORY": "/srv/state:/srv/other", "RUNTIME_DIRECTORY": "/run/t"}
    c = load_config(None, env, {})
    assert c.daemon.state_dir == Path("/srv/state")
    assert c.daemon.socket == Path("/run/t/torpord.sock")
    assert c.store.snapshot_dir == Path("/srv/state/snapshots")


def test_layers_file_then_environment_then_command_line(tmp_path: Path) -> None:
    path = write(tmp_path, "[policy]\nqueue_bound = 5\nmin_residency_s = 1.5\nstarvation_cap = 3\n")
    env = {"TORPOR_POLICY_MIN_RESIDENCY_S": "2.5", "TORPOR_POLICY_STARVATION_CAP": "4"}
    c = load_config(path, env, {"policy.starvation_cap": 6, "policy.queue_bound": None})
    assert (c.policy.queue_bound, c.policy.min_residency_s, c.policy.starvation_cap) == (5, 2.5, 6)


def test_state_dir_moves_what_follows_it_unless_set(tmp_path: Path) -> None:
    path = write(tmp_path, f'[store]\nsnapshot_dir = "{tmp_path / "nvme"}"\n')
    c = load_config(path, {}, {"daemon.state_dir": tmp_path / "state"})
    assert c.store.catalog_url == f"sqlite:///{tmp_path}/state/catalog.db"
    assert c.daemon.model_roots == (tmp_path / "state" / "models",)
    assert c.store.snapshot_dir == tmp_path / "nvme"


def test_values_as_text_from_the_environment() -> None:
    env = {
        "TORPOR_BACKEND_CPU_DEVICE_MEMORY": "1GiB",
        "TORPOR_BACKEND_GPUS": "2, 0",
        "TORPOR_DAEMON_SOCKET_MODE": "0600",
        "TORPOR_DAEMON_MODEL_ROOTS": "/models,/data/models",
        "TORPOR_DAEMON_LOG_FORMAT": "JSON",
        "TORPOR_WORKER_DEEP_SUSPEND": "off",
        "TORPOR_DAEMON_LISTEN": "[::1]:50051",
        "TORPOR_DAEMON_TOKENS_FILE": "~/tokens",
        "TORPOR_TOKEN": "torpor_x",  # the CLI's variable: no section, ignored
        "TORPOR_BUDGETS_HOST_MEMORY": "4GiB",
        "TORPOR_SOCKET": "/not/config",  # the CLI's variable: no section, ignored
        "TORPOR_CONFIG": "/not/config/either",
    }
    c = load_config(None, env, {})
    assert c.backend.cpu_device_memory == GiB and c.backend.gpus == (2, 0)
    assert c.daemon.socket_mode == 0o600 and c.daemon.log_json is True
    assert c.daemon.model_roots == (Path("/models"), Path("/data/models"))
    assert c.worker.deep_suspend is False and c.daemon.listen == "[::1]:50051"
    assert c.daemon.tokens_file == Path.home() / "tokens"
    assert c.budgets.host_memory == 4 * GiB


def test_toml_types(tmp_path: Path) -> None:
    text = "[daemon]\nsocket_mode = 0o640\nmodel_roots = []\n[backend]\ngpus = [1]\n"
    c = load_config(write(tmp_path, text), {}, {})
    assert c.daemon.socket_mode == 0o640 and c.daemon.model_roots == () and c.backend.gpus == (1,)


@pytest.mark.parametrize(
    ("key", "value", "rule"),
    [
        ("policy.min_residency_s", -1, "a number in 0..3600"),
        ("policy.min_residency_s", "nan", "a number in 0..3600"),
        ("policy.queue_bound", 0, "an integer in 1..100000"),
        ("policy.queue_bound", 6.4, "an integer in 1..100000"),
        ("policy.queue_bound", True, "an integer in 1..100000"),
        ("backend.cpu_device_memory", "12 parsecs", "a size in 16MiB..4TiB"),
        ("backend.cpu_device_memory", "1MiB", "a size in 16MiB..4TiB"),
        ("backend.kind", "rocm", "one of auto, cuda, cpu"),
        ("backend.gpus", "0,0", "a list of distinct items"),
        ("backend.gpus", [-1], "a list of distinct items, each an integer in 0..255"),
        ("daemon.socket_mode", 660, "a permission mode"),
        ("daemon.listen", "nohost", "HOST:PORT"),
        ("daemon.listen", "host:99999", "HOST:PORT"),
        ("daemon.log_level", "loud", "one of debug, info, warning, error"),
        ("store.catalog_url", "mysql://db", "a sqlite:/// or postgresql+psycopg:// URL"),
        ("store.bandwidth_alpha", 0, "a number in (0, 1]"),
        ("worker.deep_suspend", "maybe", "true or false"),
        ("worker.python", "/no/such/python", "the path of an executable file"),
        ("daemon.state_dir", "", "a path"),
    ],
)
def test_a_bad_value_names_key_value_rule_and_source(key: str, value: object, rule: str) -> None:
    exc = error(overrides={key: value})
    assert exc.reason == "INVALID_CONFIG"
    assert exc.message.startswith(f"{key} = {value!r} is invalid: it must be {rule}")
    assert exc.message.endswith("(set by the command line)")
    assert exc.metadata["field"] == key and exc.metadata["value"] == str(value)


def test_the_source_is_the_file_or_the_variable(tmp_path: Path) -> None:
    exc = error(write(tmp_path, "[policy]\nqueue_bound = -3\n"))
    assert f"(set by {tmp_path / 'torpord.toml'})" in exc.message
    exc = error(env={"TORPOR_BACKEND_CPU_DEVICES": "0"})
    assert exc.metadata["source"] == "TORPOR_BACKEND_CPU_DEVICES"


def test_cross_field_rules(tmp_path: Path) -> None:
    exc = error(overrides={"policy.lease_ttl_s": 120, "policy.lease_max_ttl_s": 60})
    assert exc.metadata["field"] == "policy.lease_max_ttl_s"
    assert "at least policy.lease_ttl_s (120.0)" in exc.message
    exc = error(overrides={"daemon.socket": f"/{'s' * 120}.sock"})
    assert exc.metadata["field"] == "daemon.socket" and "107 bytes" in exc.message


@pytest.mark.parametrize(
    ("text", "unknown", "suggestion"),
    [
        ("[policy]\nmin_residency = 3\n", "policy.min_residency", "policy.min_residency_s"),
        ("[daemon]\nkeep_alive_s = 3\n", "daemon.keep_alive_s", "policy.keep_alive_s"),
        ("[polcy]\nqueue_bound = 3\n", "polcy", "policy"),
        ('state_dir = "/x"\n', "state_dir", "daemon.state_dir"),
        ("[policy.queue]\nbound = 3\n", "policy.queue", "policy.queue_bound"),
    ],
)
def test_unknown_keys_in_the_file(tmp_path: Path, text: str, unknown: str, suggestion: str) -> None:
    exc = error(write(tmp_path, text))
    assert exc.reason == "UNKNOWN_CONFIG_KEY" and exc.metadata["field"] == unknown
    assert suggestion in exc.metadata["suggestions"].split(",")
    assert f"did you mean {suggestion}" in exc.message


def test_unknown_keys_from_environment_and_command_line() -> None:
    exc = error(env={"TORPOR_POLICY_QUEUEBOUND": "3"})
    assert "TORPOR_POLICY_QUEUEBOUND" in exc.message
    assert "did you mean TORPOR_POLICY_QUEUE_BOUND?" in exc.message
    exc = error(overrides={"backend.cpu_device_mem": "1GiB"})
    assert exc.metadata["suggestions"].split(",")[0] == "backend.cpu_device_memory"
    assert "docs/CONFIG.md" in error(overrides={"nothing.like_it_at_all": 1}).message


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="does not exist"):
        load_config(tmp_path / "missing.toml", {}, {})
    exc = error(write(tmp_path, "[policy\n"))
    assert "is not valid TOML" in exc.message and "line 1" in exc.message


def test_sections_validate_when_built_directly() -> None:
    assert PolicySection(queue_bound=4).queue_bound == 4
    with pytest.raises(InvalidArgument, match=r"policy.queue_bound = 0 is invalid"):
        PolicySection(queue_bound=0)


def test_store_configs_are_built_from_it(tmp_path: Path) -> None:
    c = load_config(
        None, {}, {"daemon.state_dir": tmp_path, "store.capacity": "2GiB", "store.pool_size": 7}
    )
    catalog = c.catalog_config()
    assert catalog.model_roots == (tmp_path / "models",) and catalog.pool_size == 7
    assert catalog.url == f"sqlite:///{tmp_path}/catalog.db"
    snapshots = c.snapshot_store_config()
    assert snapshots.root == tmp_path / "snapshots" and snapshots.capacity_bytes == 2 * GiB


def test_dump_round_trips_and_masks_passwords(tmp_path: Path) -> None:
    c = load_config(None, {}, {"daemon.state_dir": tmp_path, "backend.gpus": [0, 1]})
    as_dict = c.as_dict()
    json.dumps(as_dict)  # JSON-safe
    assert as_dict["daemon"]["socket_mode"] == "0660"
    assert set(as_dict) == set(SECTIONS)
    assert load_config(write(tmp_path, c.to_toml()), {}, {}) == c

    url = "postgresql+psycopg://torpor:s3cret@db.example:5432/torpor"
    shared = load_config(None, {}, {"store.catalog_url": url})
    assert shared.store.catalog_url == url
    assert "s3cret" not in json.dumps(shared.as_dict()) and "s3cret" not in shared.to_toml()


def test_command_line_options_map_onto_keys() -> None:
    parser = argparse.ArgumentParser()
    for option in cfg.CLI_OPTIONS:
        parser.add_argument(option)
    args = parser.parse_args(["--cpu-device-memory", "512MiB", "--backend", "cpu"])
    overrides = overrides_from_args(args)
    assert overrides == {"backend.cpu_device_memory": "512MiB", "backend.kind": "cpu"}
    c = load_config(None, {}, overrides)
    assert c.backend.cpu_device_memory == 512 * MiB and c.backend.kind == "cpu"
    assert set(cfg.CLI_OPTIONS.values()) <= set(config_keys())


def test_default_config_path(tmp_path: Path) -> None:
    assert cfg.default_config_path({"TORPOR_CONFIG": str(tmp_path)}) == tmp_path


# Documentation cannot drift from the dataclasses.


def test_every_field_has_a_docstring() -> None:
    tree = ast.parse((REPO / "scheduler" / "daemon_config.py").read_text())
    documented = set()
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name.endswith("Section"):
            for a, b in zip(node.body, node.body[1:], strict=False):
                if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr):
                    documented.add((node.name, a.target.id))  # type: ignore[union-attr]
    expected = {(cls.__name__, f.name) for cls in SECTIONS.values() for f in fields(cls)}  # type: ignore[arg-type]
    assert expected - documented == set()


def test_config_md_documents_every_key_and_variable() -> None:
    text = (REPO / "docs" / "CONFIG.md").read_text()
    missing = [k for k in config_keys() if f"`{k}`" not in text or f"`{env_var(k)}`" not in text]
    assert missing == []


def deploy_settings() -> dict[str, list[str]]:
    """deploy/torpord.toml's commented settings (`#key = value`), by section."""
    settings: dict[str, list[str]] = {}
    section = ""
    for line in (REPO / "deploy" / "torpord.toml").read_text().splitlines():
        if m := re.fullmatch(r"\[(\w+)\]", line):
            section = m.group(1)
        elif m := re.fullmatch(r"#(\w+) = .*", line):
            settings.setdefault(section, []).append(m.group(1))
    return settings


def test_deploy_file_lists_every_key_in_its_section() -> None:
    listed = [f"{s}.{k}" for s, keys in deploy_settings().items() for k in keys]
    assert listed == config_keys()


def test_deploy_file_changes_nothing_and_shows_the_defaults(tmp_path: Path) -> None:
    text = (REPO / "deploy" / "torpord.toml").read_text()
    assert load_config(write(tmp_path, text), {}, {}) == load_config(None, {}, {})
    uncommented = re.sub(r"(?m)^#(\w+ = )", r"\1", text)
    assert uncommented != text
    explicit = load_config(write(tmp_path, uncommented), {}, {})
    assert explicit == load_config(None, {}, {})
    assert isinstance(explicit, DaemonConfig)


def test_policy_section_feeds_the_policy_core() -> None:
    """[policy] has exactly the policy core's knobs, so the daemon can pass them over; the
    other knobs of the core come from [worker]: deep_suspend, exchange_swap, and the exchange
    swap's slack, one arena handle (handle_size)."""
    world = pytest.importorskip("torpor.scheduler.core.world")
    cfg = load_config(
        None,
        {},
        {"policy.starvation_cap": 3, "worker.deep_suspend": False, "worker.handle_size": "256MiB"},
    )
    policy = cfg.policy
    core = world.PolicyConfig(
        **{f.name: getattr(policy, f.name) for f in fields(policy)},
        deep_suspend=cfg.worker.deep_suspend,
        exchange_swap=cfg.worker.exchange_swap != "off",
        exchange_slack_bytes=cfg.worker.handle_size,
    )
    assert core.starvation_cap == 3 and core.deep_suspend is False
    assert core.exchange_slack_bytes == 256 * 1024**2
    assert [f.name for f in fields(core)] == [f.name for f in fields(policy)] + [
        "deep_suspend",
        "exchange_swap",
        "exchange_slack_bytes",
    ]


# TCP authentication (issue 12): what torpord refuses to start with. Tests bind loopback only,
# so an address that is not loopback is checked here, by validation, never bound.

TLS = {"daemon.tls_cert": "/etc/torpor/tls.pem", "daemon.tls_key": "/etc/torpor/tls.key"}
TOKENS = {"daemon.tokens_file": "/etc/torpor/tokens"}


@pytest.mark.parametrize("listen", ["0.0.0.0:7070", "[::]:7070", "10.1.2.3:7070", "gpu1:7070"])
def test_a_listen_off_loopback_needs_tls_and_tokens(listen: str) -> None:
    exc = error(overrides={"daemon.listen": listen, **TOKENS})
    assert exc.metadata["field"] == "daemon.tls_cert"
    assert "with daemon.tls_key" in exc.message and "is not loopback" in exc.message
    exc = error(overrides={"daemon.listen": listen, **TLS})
    assert exc.metadata["field"] == "daemon.tokens_file"
    exc = error(overrides={"daemon.listen": listen, **TLS, **TOKENS, "daemon.tcp_auth": False})
    assert exc.metadata["field"] == "daemon.tcp_auth" and "is not loopback" in exc.message
    c = load_config(None, {}, {"daemon.listen": listen, **TLS, **TOKENS})
    assert c.daemon.tls_cert == Path("/etc/torpor/tls.pem") and c.daemon.tcp_auth is True


@pytest.mark.parametrize("listen", ["127.0.0.1:7070", "127.8.9.10:7070", "[::1]:7070",
                                    "localhost:7070"])  # fmt: skip
def test_a_loopback_listen_needs_tokens_unless_tcp_auth_is_off(listen: str) -> None:
    exc = error(overrides={"daemon.listen": listen})
    assert exc.metadata["field"] == "daemon.tokens_file"
    assert "daemon.tcp_auth = false" in exc.message and "insecure" in exc.message
    assert load_config(None, {}, {"daemon.listen": listen, **TOKENS}).daemon.tls_cert is None
    env = {"TORPOR_DAEMON_LISTEN": listen, "TORPOR_DAEMON_TCP_AUTH": "false"}
    assert load_config(None, env, {}).daemon.tcp_auth is False


def test_tls_keys_come_in_pairs() -> None:
    exc = error(overrides={"daemon.tls_cert": "/c.pem"})
    assert exc.metadata["field"] == "daemon.tls_key" and "daemon.tls_cert" in exc.message
    exc = error(overrides={"daemon.tls_key": "/c.key"})
    assert exc.metadata["field"] == "daemon.tls_cert"
    exc = error(overrides={"daemon.tls_client_ca": "/ca.pem"})
    assert exc.metadata["field"] == "daemon.tls_client_ca"


def test_auth_paths_default_to_none_and_round_trip(tmp_path: Path) -> None:
    c = load_config(None, {}, {})
    assert (c.daemon.tokens_file, c.daemon.tls_cert, c.daemon.listen) == (None, None, "")
    assert c.as_dict()["daemon"]["tokens_file"] == ""  # TOML has no null
    auth = {"daemon.listen": "[::1]:7070", **TLS, **TOKENS, "daemon.tls_client_ca": "/ca.pem"}
    c = load_config(None, {}, auth)
    assert load_config(write(tmp_path, c.to_toml()), {}, {}) == c
