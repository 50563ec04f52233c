"""Default locations, shared by torpord's config and the CLI (which must agree on the socket).

Run by root (a system service), torpord uses the FHS places; run by a user (a developer's
`make run`), places that user can write, so the daemon and `torpor ps` meet without flags.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path


def default_runtime_dir(env: Mapping[str, str]) -> Path:
    """/run/torpor for root; $XDG_RUNTIME_DIR/torpor or /tmp/torpor-UID for a user."""
    if os.geteuid() == 0:
        return Path("/run/torpor")
    if env.get("XDG_RUNTIME_DIR"):
        return Path(env["XDG_RUNTIME_DIR"]) / "torpor"
    return Path(f"/tmp/torpor-{os.geteuid()}")


def default_state_dir(env: Mapping[str, str]) -> Path:
    """/var/lib/torpor for root; $XDG_STATE_HOME/torpor or ~/.local/state/torpor for a user."""
    if os.geteuid() == 0:
        return Path("/var/lib/torpor")
    base = env.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "torpor"
