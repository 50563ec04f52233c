"""deploy/torpord.service: the directives torpord's behaviour depends on, the hardening that
must be on and the options that must stay off for CUDA, and systemd's own verdict where
systemd-analyze is installed."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.deploy.deployfiles import (
    DEPLOY_DOC,
    UNIT_PATH,
    config_under_systemd,
    is_true,
    load_unit,
    parse_unit,
    seconds,
    unit_paths,
)
from torpor.scheduler.daemon_config import DEFAULT_CONFIG_PATH, load_config

HARDENING_ON = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectHostname": "yes",
    "ProtectProc": "invisible",
    "RestrictSUIDSGID": "yes",
    "RestrictNamespaces": "yes",
    "LockPersonality": "yes",
    "RestrictRealtime": "yes",
    "SystemCallArchitectures": "native",
}
"""On, with the value each must have."""

CUDA_BREAKERS = {
    "PrivateDevices": "hides /dev/nvidia*",
    "MemoryDenyWriteExecute": "refuses the writable+executable mappings of the CUDA stack",
    "ProtectClock": "implies DeviceAllow=char-rtc r, which closes the device list",
    "PrivateUsers": "unmaps the device nodes' owners",
}
"""Off: each breaks CUDA in the way given."""


@pytest.fixture(scope="module")
def unit():
    return load_unit()


def test_parser_reads_repeated_keys_continuations_and_comments() -> None:
    parsed = parse_unit(
        "# comment\n[Unit]\nAfter=a.service\n; also a comment\nAfter=b.service\n"
        "[Service]\nExecStart=/bin/x \\\n  --flag\nCapabilityBoundingSet=\n"
    )
    assert parsed.values("Unit", "After") == ["a.service", "b.service"]
    assert parsed.service("ExecStart") == "/bin/x --flag"
    assert parsed.service("CapabilityBoundingSet") == ""
    with pytest.raises(ValueError, match="not a Key=value"):
        parse_unit("[Service]\nbogus line\n")


def test_readiness_is_notified_by_torpord_alone(unit) -> None:
    assert unit.service("Type") == "notify"
    assert unit.service("NotifyAccess") == "main"


def test_exec_start_runs_torpord_from_the_venv_with_the_default_config(unit) -> None:
    argv = unit.service("ExecStart").split()
    assert argv[0] == "/opt/torpor/venv/bin/torpord"
    assert argv[1:] == ["--config", str(DEFAULT_CONFIG_PATH)]
    assert len(unit.values("Service", "ExecStart")) == 1


def test_runs_as_the_dedicated_user_with_its_own_directories(unit) -> None:
    assert unit.service("User") == "torpor"
    assert unit.service("Group") == "torpor"
    assert not is_true(unit.service("DynamicUser"))  # the user comes from sysusers.d
    assert unit.service("StateDirectory") == "torpor"
    assert unit.service("RuntimeDirectory") == "torpor"
    assert unit.service("RuntimeDirectoryMode") == "0750"
    assert unit.service("StateDirectoryMode") == "0750"


def test_systemd_directories_give_torpord_its_paths(unit) -> None:
    """With no config file, $STATE_DIRECTORY and $RUNTIME_DIRECTORY place everything."""
    config = config_under_systemd(unit)
    assert config.daemon.state_dir == Path("/var/lib/torpor")
    assert config.daemon.socket == Path("/run/torpor/torpord.sock")
    assert config.store.snapshot_dir == Path("/var/lib/torpor/snapshots")
    assert config.store.catalog_url == "sqlite:////var/lib/torpor/catalog.db"
    # Group torpor may connect (rw for the group), others may not; the 0750 directory
    # above lets the group through to it.
    assert config.daemon.socket_mode & 0o060 == 0o060
    assert config.daemon.socket_mode & 0o007 == 0


def test_snapshot_store_stays_writable_and_its_mount_is_awaited(unit) -> None:
    snapshots = str(config_under_systemd(unit).store.snapshot_dir)
    assert snapshots in unit_paths(unit, "ReadWritePaths")
    assert snapshots in unit_paths(unit, "RequiresMountsFor")


def test_limits_for_pinned_memory_and_many_files(unit) -> None:
    assert unit.service("LimitMEMLOCK") == "infinity"
    assert int(unit.service("LimitNOFILE")) >= 65536


def test_restarts_on_failure(unit) -> None:
    assert unit.service("Restart") == "on-failure"
    assert seconds(unit.service("RestartSec")) > 0


def test_sigterm_reaches_torpord_alone_and_the_stop_timeout_covers_its_drain(unit) -> None:
    assert unit.service("KillMode") == "mixed"
    defaults = load_config(None, {}, {})
    drain = defaults.daemon.drain_timeout_s + defaults.worker.stop_timeout_s
    assert seconds(unit.service("TimeoutStopSec")) >= drain + 15


def test_a_worker_killed_for_memory_does_not_stop_the_service(unit) -> None:
    assert unit.service("OOMPolicy") == "continue"


def test_nvidia_uvm_node_is_created_before_the_sandbox_forbids_it(unit) -> None:
    """NoNewPrivileges stops libcuda's setuid nvidia-modprobe: run it privileged first."""
    pre = unit.values("Service", "ExecStartPre")
    assert any(re.match(r"^[-+]{2}/usr/bin/nvidia-modprobe -u", line) for line in pre), pre


@pytest.mark.parametrize("key", sorted(HARDENING_ON))
def test_hardening_is_on(unit, key: str) -> None:
    assert unit.service(key) == HARDENING_ON[key]


def test_capability_bounding_set_is_empty(unit) -> None:
    assert unit.service("CapabilityBoundingSet") == ""


@pytest.mark.parametrize("key", sorted(CUDA_BREAKERS))
def test_options_that_break_cuda_are_off(unit, key: str) -> None:
    assert not is_true(unit.service(key)), f"{key} {CUDA_BREAKERS[key]}"


def test_device_access_is_not_closed_without_the_nvidia_devices(unit) -> None:
    policy = unit.service("DevicePolicy") or "auto"
    allowed = " ".join(unit.values("Service", "DeviceAllow"))
    if policy != "auto" or allowed:
        assert "nvidia" in allowed, f"DevicePolicy={policy} DeviceAllow={allowed!r}"


def test_installed_for_multi_user_boot(unit) -> None:
    assert unit.value("Install", "WantedBy") == "multi-user.target"


def test_every_choice_is_documented(unit) -> None:
    """docs/DEPLOY.md's hardening table names each option that is on and each left off."""
    doc = DEPLOY_DOC.read_text()
    named = [*HARDENING_ON, *CUDA_BREAKERS, "CapabilityBoundingSet", "DevicePolicy"]
    named += ["KillMode", "LimitMEMLOCK", "OOMPolicy", "NoNewPrivileges", "ProcSubset"]
    missing = [key for key in named if f"`{key}" not in doc]
    assert not missing, f"docs/DEPLOY.md does not explain {missing}"


# ---- systemd's own checks ---------------------------------------------------------------


def _analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed here (it comes with systemd)")
    return tool


def _runnable_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart's binary replaced by /bin/true: verify refuses a command that
    does not exist, and torpord is not installed under /opt/torpor/venv here."""
    text = UNIT_PATH.read_text()
    copy = tmp_path / UNIT_PATH.name
    copy.write_text(text.replace("ExecStart=/opt/torpor/venv/bin/torpord", "ExecStart=/bin/true"))
    assert copy.read_text() != text
    return copy


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    tool = _analyze()
    run = subprocess.run(
        [tool, "verify", "--man=no", str(_runnable_copy(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    # verify exits 0 even for unknown keys and unparsable values, which it only reports.
    assert not re.search(r"Unknown|ignoring|Failed|not executable|Invalid", output), output


def test_systemd_analyze_verify_catches_a_bad_value(tmp_path: Path) -> None:
    """The check above can fail: the same copy with a bad limit is reported."""
    tool = _analyze()
    copy = _runnable_copy(tmp_path)
    copy.write_text(copy.read_text().replace("LimitMEMLOCK=infinity", "LimitMEMLOCK=lots"))
    run = subprocess.run(
        [tool, "verify", "--man=no", str(copy)], capture_output=True, text=True, timeout=60
    )
    assert "Failed to parse resource value" in run.stdout + run.stderr


def test_systemd_analyze_security_rates_the_exposure_low(tmp_path: Path) -> None:
    tool = _analyze()
    run = subprocess.run(
        [tool, "security", "--offline=yes", "--no-pager", str(_runnable_copy(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", run.stdout + run.stderr)
    if run.returncode != 0 and found is None:
        pytest.skip(f"this systemd-analyze has no offline security review: {run.stderr.strip()}")
    assert found, run.stdout + run.stderr
    # 10 is fully exposed; 3.9 as written. The options left off for CUDA cost the rest.
    assert float(found.group(1)) <= 4.5, run.stdout
