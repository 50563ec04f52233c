"""deploy/sysusers.d and deploy/tmpfiles.d: they create the user and the directories that the
unit and torpord's derived config name, and systemd's tools accept them where installed."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.deploy.deployfiles import (
    SYSUSERS_PATH,
    TMPFILES_PATH,
    config_lines,
    config_under_systemd,
    load_unit,
)


@pytest.fixture(scope="module")
def unit():
    return load_unit()


@pytest.fixture(scope="module")
def tmpfiles() -> dict[str, list[str]]:
    """tmpfiles.d lines by path: [type, path, mode, user, group, age]."""
    return {fields[1]: fields for fields in config_lines(TMPFILES_PATH)}


def test_sysusers_creates_the_units_user_with_the_state_directory_as_home(unit) -> None:
    users = [f for f in config_lines(SYSUSERS_PATH) if f[0] == "u"]
    assert len(users) == 1
    _, name, uid, gecos, home = users[0]
    assert name == unit.service("User")
    # A "u" line without a group creates the group of the same name, which the unit runs as.
    assert ":" not in uid and unit.service("Group") == name
    assert gecos
    assert Path(home) == config_under_systemd(unit).daemon.state_dir


def test_sysusers_adds_the_user_to_video_for_restricted_device_nodes(unit) -> None:
    members = [(f[1], f[2]) for f in config_lines(SYSUSERS_PATH) if f[0] == "m"]
    assert members == [(unit.service("User"), "video")]


def test_tmpfiles_creates_the_directories_torpord_derives(unit, tmpfiles) -> None:
    config = config_under_systemd(unit)
    expected = {
        str(config.daemon.state_dir),
        str(config.store.snapshot_dir),
        *(str(root) for root in config.daemon.model_roots),
    }
    assert set(tmpfiles) == expected
    for fields in tmpfiles.values():
        kind, _, _, user, group, *_ = fields
        assert kind == "d"
        assert (user, group) == (unit.service("User"), unit.service("Group"))


def test_tmpfiles_modes_agree_with_the_unit(unit, tmpfiles) -> None:
    state = str(config_under_systemd(unit).daemon.state_dir)
    # The unit's StateDirectoryMode and tmpfiles.d would otherwise change it back and forth.
    assert tmpfiles[state][2] == unit.service("StateDirectoryMode")
    for fields in tmpfiles.values():
        assert int(fields[2], 8) & 0o007 == 0, f"{fields[1]} is open to others"


def test_tmpfiles_leaves_the_runtime_directory_to_the_unit(unit, tmpfiles) -> None:
    runtime = str(config_under_systemd(unit).daemon.runtime_dir)
    assert not [path for path in tmpfiles if path.startswith(runtime)]


def test_systemd_sysusers_creates_the_user(tmp_path: Path) -> None:
    tool = shutil.which("systemd-sysusers")
    if tool is None:
        pytest.skip("systemd-sysusers is not installed here (it comes with systemd)")
    (tmp_path / "etc").mkdir()
    # With --root, file arguments are looked up inside the root: feed the file on stdin.
    run = subprocess.run(
        [tool, f"--root={tmp_path}", "-"],
        stdin=SYSUSERS_PATH.open(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    passwd = {
        line.split(":")[0]: line.split(":")
        for line in (tmp_path / "etc/passwd").read_text().splitlines()
    }
    groups = {
        line.split(":")[0]: line for line in (tmp_path / "etc/group").read_text().splitlines()
    }
    torpor = passwd["torpor"]
    assert torpor[5] == "/var/lib/torpor"
    assert int(torpor[2]) < 1000  # a system user
    assert groups["torpor"].split(":")[2] == torpor[3]
    assert "torpor" in groups["video"].split(":")[3].split(",")


def test_systemd_tmpfiles_creates_the_directories(tmp_path: Path, tmpfiles) -> None:
    sysusers = shutil.which("systemd-sysusers")
    tool = shutil.which("systemd-tmpfiles")
    if tool is None or sysusers is None:
        pytest.skip("systemd-tmpfiles is not installed here (it comes with systemd)")
    if os.geteuid() != 0:
        pytest.skip("systemd-tmpfiles sets owners (torpor), which needs root")
    (tmp_path / "etc").mkdir()
    subprocess.run([sysusers, f"--root={tmp_path}", "-"], stdin=SYSUSERS_PATH.open(), check=True)
    run = subprocess.run(
        [tool, "--create", f"--root={tmp_path}", "-"],
        stdin=TMPFILES_PATH.open(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    uid = int((tmp_path / "etc/passwd").read_text().split("torpor:x:")[1].split(":")[0])
    for path, fields in tmpfiles.items():
        created = (tmp_path / path.lstrip("/")).stat()
        assert created.st_uid == uid, path
        assert created.st_mode & 0o7777 == int(fields[2], 8), path
