"""The files under deploy/, parsed for the tests: the systemd unit, sysusers.d and tmpfiles.d
lines, and the daemon config that systemd's directories imply."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from torpor.scheduler.daemon_config import DaemonConfig, load_config

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
UNIT_PATH = DEPLOY / "torpord.service"
SYSUSERS_PATH = DEPLOY / "sysusers.d" / "torpor.conf"
TMPFILES_PATH = DEPLOY / "tmpfiles.d" / "torpor.conf"
KUBERNETES_DIR = DEPLOY / "kubernetes"
DAEMONSET_PATH = KUBERNETES_DIR / "torpord-daemonset.yaml"
DEPLOY_DOC = REPO / "docs" / "DEPLOY.md"


@dataclass(frozen=True)
class Unit:
    """A unit file as systemd reads it: per section, every `Key=value` in order (keys repeat)."""

    sections: dict[str, list[tuple[str, str]]]

    def values(self, section: str, key: str) -> list[str]:
        """Every assignment of `key`, in order (list settings such as After= accumulate)."""
        return [v for k, v in self.sections.get(section, []) if k == key]

    def value(self, section: str, key: str) -> str | None:
        """The effective value of a single-valued setting: the last assignment."""
        found = self.values(section, key)
        return found[-1] if found else None

    def service(self, key: str) -> str | None:
        return self.value("Service", key)


def parse_unit(text: str) -> Unit:
    """systemd.syntax(7), the part unit files use: [Section] headers, `Key=value` lines, `#`
    and `;` comments, backslash continuations."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for line in _logical_lines(text):
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        key, sep, value = line.partition("=")
        if not sep or current is None:
            raise ValueError(f"not a Key=value line inside a section: {line!r}")
        current.append((key.strip(), value.strip()))
    return Unit(sections)


def _logical_lines(text: str) -> list[str]:
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not pending and (not stripped or stripped[0] in "#;"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1].rstrip() + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    return lines


def load_unit() -> Unit:
    return parse_unit(UNIT_PATH.read_text())


def is_true(value: str | None) -> bool:
    """systemd's boolean: 1, yes, y, true, t, on (any case)."""
    return value is not None and value.lower() in {"1", "yes", "y", "true", "t", "on"}


_SPAN_UNITS = {"": 1.0, "s": 1.0, "sec": 1.0, "min": 60.0, "m": 60.0, "h": 3600.0}


def seconds(span: str) -> float:
    """A systemd time span ("90", "90s", "1min 30s") in seconds."""
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", span):
        total += float(number) * _SPAN_UNITS[unit]
    return total


def config_lines(path: Path) -> list[list[str]]:
    """The fields of each sysusers.d/tmpfiles.d line (comments and blank lines left out)."""
    lines = path.read_text().splitlines()
    return [shlex.split(line) for line in lines if line.strip() and line.lstrip()[0] != "#"]


def config_under_systemd(unit: Unit, env: dict[str, str] | None = None) -> DaemonConfig:
    """The config torpord derives with no config file, in the environment the unit gives it:
    StateDirectory=X sets $STATE_DIRECTORY=/var/lib/X, RuntimeDirectory=X $RUNTIME_DIRECTORY."""
    state = unit.service("StateDirectory")
    runtime = unit.service("RuntimeDirectory")
    systemd_env = {"STATE_DIRECTORY": f"/var/lib/{state}", "RUNTIME_DIRECTORY": f"/run/{runtime}"}
    return load_config(None, {**systemd_env, **(env or {})}, {})


def unit_paths(unit: Unit, key: str) -> list[str]:
    """The paths of a path-list setting (ReadWritePaths=, RequiresMountsFor=), without the "-"
    (ignore if missing) and "+" prefixes."""
    section = "Unit" if key == "RequiresMountsFor" else "Service"
    return [p.lstrip("-+") for v in unit.values(section, key) for p in v.split()]
