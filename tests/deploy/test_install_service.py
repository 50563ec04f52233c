"""`make install-service`: the steps it would run on a host (`make -n`), and a staged run
(DESTDIR) with a stub in place of the venv build, which needs neither root nor systemd."""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from tests.deploy.deployfiles import DEPLOY, REPO, SYSUSERS_PATH, TMPFILES_PATH, UNIT_PATH

STUB_VENV = """#!/bin/sh
# A stand-in for deploy/install-venv.sh: records its argument, makes the venv's scripts.
echo "$1" >> "$(dirname "$0")/venv-calls"
mkdir -p "$1/bin"
for script in python torpor torpord; do printf '#!/bin/sh\\n' > "$1/bin/$script"; done
chmod +x "$1/bin/"*
"""

# On a staged install, none of these may run: `false` would fail the make.
NO_SYSTEMD = ["SYSTEMCTL=false", "SYSTEMD_SYSUSERS=false", "SYSTEMD_TMPFILES=false"]


def make(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("make") is None:
        pytest.skip("make is not installed here")
    return subprocess.run(
        ["make", "--no-print-directory", "-C", str(REPO), "install-service", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def stub(tmp_path: Path) -> Path:
    path = tmp_path / "stub-venv"
    path.write_text(STUB_VENV)
    path.chmod(0o755)
    return path


def staged(stage: Path, stub: Path, *args: str) -> subprocess.CompletedProcess[str]:
    run = make(f"DESTDIR={stage}", f"SERVICE_VENV_INSTALL={stub}", *NO_SYSTEMD, *args)
    assert run.returncode == 0, run.stdout + run.stderr
    return run


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_dry_run_lists_the_host_steps_in_order() -> None:
    run = make("-n")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()

    def step(text: str) -> int:
        found = [i for i, line in enumerate(lines) if text in line]
        assert found, f"no step with {text!r} in:\n{run.stdout}"
        return found[0]

    root = step("id -u")
    venv = step("deploy/install-venv.sh /opt/torpor/venv")
    unit = step("/usr/local/lib/systemd/system/torpord.service")
    sysusers = step("systemd-sysusers /usr/local/lib/sysusers.d/torpor.conf")
    config = step("install -m 0640 -g torpor deploy/torpord.toml /etc/torpor/torpord.toml")
    tmpfiles = step("systemd-tmpfiles --create /usr/local/lib/tmpfiles.d/torpor.conf")
    reload = step("systemctl daemon-reload")
    # The group must exist before the config is given to it; the directories' owner before
    # tmpfiles; systemd reads the unit after it is in place.
    assert root < venv < unit < sysusers < config < tmpfiles < reload
    assert step("if [[ -e /etc/torpor/torpord.toml ]]") < config  # never overwritten
    assert step("ln -sfn /opt/torpor/venv/bin/torpor /usr/local/bin/torpor") > venv
    assert "systemctl enable --now torpord" in run.stdout


def test_dry_run_with_destdir_skips_what_needs_the_target_host() -> None:
    run = make("-n", "DESTDIR=/stage")
    assert run.returncode == 0, run.stderr
    for command in ("systemd-sysusers", "systemd-tmpfiles --create", "systemctl daemon-reload"):
        lines = [line for line in run.stdout.splitlines() if command in line]
        assert lines, command
        assert all(line.startswith("echo") for line in lines), lines
    assert "id -u" not in run.stdout
    assert "-g torpor" not in run.stdout


def test_staged_install_puts_every_file_in_place(tmp_path: Path, stub: Path) -> None:
    stage = tmp_path / "stage"
    run = staged(stage, stub)
    assert (tmp_path / "venv-calls").read_text().split() == [f"{stage}/opt/torpor/venv"]
    installed = {
        "usr/local/lib/systemd/system/torpord.service": UNIT_PATH,
        "usr/local/lib/sysusers.d/torpor.conf": SYSUSERS_PATH,
        "usr/local/lib/tmpfiles.d/torpor.conf": TMPFILES_PATH,
        "etc/torpor/torpord.toml": DEPLOY / "torpord.toml",
    }
    for relative, source in installed.items():
        assert (stage / relative).read_text() == source.read_text(), relative
    assert mode(stage / "usr/local/lib/systemd/system/torpord.service") == 0o644
    # The config may come to hold a catalog password: not world-readable.
    assert mode(stage / "etc/torpor/torpord.toml") == 0o640
    for name in ("torpor", "torpord"):
        link = stage / "usr/local/bin" / name
        # The link names the final path; it resolves once the tree is on the host.
        assert link.is_symlink() and str(link.readlink()) == f"/opt/torpor/venv/bin/{name}"
        assert (stage / "opt/torpor/venv/bin" / name).exists()
    assert "staged so not run: false daemon-reload" in run.stdout


def test_an_existing_config_is_kept(tmp_path: Path, stub: Path) -> None:
    stage = tmp_path / "stage"
    config = stage / "etc/torpor/torpord.toml"
    config.parent.mkdir(parents=True)
    config.write_text("[policy]\nqueue_bound = 8\n")
    run = staged(stage, stub)
    assert config.read_text() == "[policy]\nqueue_bound = 8\n"
    assert "kept" in run.stdout


def test_another_venv_path_is_written_into_the_unit_and_the_links(
    tmp_path: Path, stub: Path
) -> None:
    stage = tmp_path / "stage"
    staged(stage, stub, "SERVICE_VENV=/srv/torpor/venv")
    unit = (stage / "usr/local/lib/systemd/system/torpord.service").read_text()
    assert "ExecStart=/srv/torpor/venv/bin/torpord --config /etc/torpor/torpord.toml" in unit
    assert "/opt/torpor" not in unit
    assert str((stage / "usr/local/bin/torpor").readlink()) == "/srv/torpor/venv/bin/torpor"
    assert (stage / "srv/torpor/venv/bin/torpord").exists()


def test_the_real_venv_build_refuses_to_be_staged(tmp_path: Path) -> None:
    """A venv names its own path in its scripts: staged, it would name the staging tree."""
    stage = tmp_path / "stage"
    run = make(f"DESTDIR={stage}", *NO_SYSTEMD)
    assert run.returncode != 0
    assert "cannot be staged" in run.stderr
    assert not stage.exists()
