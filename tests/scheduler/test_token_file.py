"""`torpor token new --append FILE` (scheduler/client/tokens.py): the tokens file it creates
is its owner's only, whatever the umask (issue 12, found by the standing security suite:
it was 0644, so any local user could read the token digests)."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest

TORPOR = (sys.executable, "-m", "torpor.cli")


def _token_new(tokens: Path, umask: int) -> None:
    subprocess.run(
        [*TORPOR, "token", "new", "--scope", "admin", "--name", "ops", "--append", str(tokens)],
        check=True,
        capture_output=True,
        timeout=60,
        umask=umask,
    )


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077])
def test_a_new_tokens_file_is_0600_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    tokens = tmp_path / "tokens"
    _token_new(tokens, umask)
    assert stat.S_IMODE(tokens.stat().st_mode) == 0o600
    _token_new(tokens, umask)  # appended to, not replaced
    assert len(tokens.read_text().splitlines()) == 2
    assert stat.S_IMODE(tokens.stat().st_mode) == 0o600


def test_an_existing_tokens_file_keeps_its_mode(tmp_path: Path) -> None:
    """An operator may have made it 0640 root:torpor, for torpord to read: not ours to
    narrow."""
    tokens = tmp_path / "tokens"
    tokens.touch()
    tokens.chmod(0o640)
    _token_new(tokens, 0o022)
    assert stat.S_IMODE(tokens.stat().st_mode) == 0o640
    assert tokens.read_text().startswith("admin sha256:")
