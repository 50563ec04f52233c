"""How one config key is parsed and bounded (`Rule`), and the small parsers behind it.

Split from `torpor.scheduler.daemon_config`, which declares the keys.
"""

from __future__ import annotations

import ipaddress
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torpor.errors import InvalidArgument
from torpor.store.store_config import CatalogConfig
from torpor.units import parse_size

MiB, GiB, TiB = 1024**2, 1024**3, 1024**4
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _exact_size(n: float) -> str:
    """`n` bytes in the largest binary unit that divides it: 16MiB, 4TiB, 1024TiB."""
    for unit, scale in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if n and n % scale == 0:
            return f"{int(n // scale)}{unit}"
    return str(int(n))


def _half_host_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


@dataclass(frozen=True, slots=True)
class Rule:
    """How one key is parsed and bounded. `text` is the rule as errors and docs print it."""

    kind: str  # int float size bool choice path optpath exe mode hostport url
    lo: float | None = None
    hi: float | None = None
    choices: tuple[str, ...] = ()
    many: bool = False  # a list: a TOML array, or comma-separated text
    lo_open: bool = False
    auto: Callable[[], object] | None = None  # what the value "auto" stands for

    @property
    def text(self) -> str:
        lo, hi = self.lo, self.hi
        bounds = f"({lo}, {hi}]" if self.lo_open else f"{lo}..{hi}"
        one = {
            "int": f"an integer in {bounds}",
            "float": f"a number in {bounds}",
            "size": f"a size in {_exact_size(lo or 0)}..{_exact_size(hi or 0)} "
            "(bytes, or a number with a unit: 256MiB, 4GiB)",
            "bool": "true or false",
            "choice": "one of " + ", ".join(self.choices),
            "path": "a path",
            "optpath": 'a path, or "" for none',
            "exe": "the path of an executable file",
            "mode": 'a permission mode in 0o000..0o777 (TOML 0o660, or the string "0660")',
            "hostport": 'HOST:PORT with a port in 1..65535 (IPv6 as [::1]:PORT), or ""',
            "url": "a sqlite:/// or postgresql+psycopg:// URL",
        }[self.kind]
        one += ' or "auto"' if self.auto else ""
        return f"a list of distinct items, each {one}" if self.many else one

    def parse(self, value: object) -> Any:
        """The typed value; ValueError (its text the rule) when `value` breaks the rule."""
        if self.auto is not None and value == "auto":
            value = self.auto()
        try:
            if not self.many:
                return self._one(value)
            if isinstance(value, str):  # environment or command line: comma-separated
                value = [part.strip() for part in value.split(",") if part.strip()]
            if not isinstance(value, list | tuple):
                raise TypeError
            items = tuple(self._one(item) for item in value)
            if len(set(items)) != len(items):
                raise ValueError
            return items
        except InvalidArgument as exc:  # from parse_size, or the catalog's URL check
            detail = f" ({exc.message})" if self.kind == "url" else ""
            raise ValueError(self.text + detail) from None
        except (ValueError, TypeError):
            raise ValueError(self.text) from None

    def _one(self, v: Any) -> Any:
        if isinstance(v, bool) and self.kind != "bool":
            raise TypeError
        parsed: Any
        match self.kind, v:
            case "int", int():
                parsed = v
            case "int", str():
                parsed = int(v.strip(), 10)  # "64" yes; "6.4" and 6.4 no
            case "float", int() | float() | str():
                parsed = float(v)
                if not math.isfinite(parsed):
                    raise ValueError
            case "size", int() | str():
                parsed = parse_size(v)
            case "bool", bool():
                parsed = v
            case "bool", str() if v.strip().lower() in _TRUE + _FALSE:
                parsed = v.strip().lower() in _TRUE
            case "choice", str() if v.strip().lower() in self.choices:
                parsed = v.strip().lower()
            case "path" | "exe", str() | Path() if str(v).strip():
                parsed = Path(str(v).strip()).expanduser().absolute()
            case "optpath", None:
                parsed = None
            case "optpath", str() | Path():
                parsed = Path(str(v).strip()).expanduser().absolute() if str(v).strip() else None
            case "mode", int():
                parsed = v
            case "mode", str():
                parsed = int(v.strip().lower().removeprefix("0o"), 8)
            case "hostport", str():
                parsed = _hostport(v.strip())
            case "url", str():
                parsed = CatalogConfig(url=v.strip()).url  # validates it
            case _:
                raise TypeError
        if self.kind == "exe":
            if not (parsed.is_file() and os.access(parsed, os.X_OK)):
                raise ValueError
            parsed = str(parsed)
        if self.lo is not None and self.hi is not None:
            above = parsed > self.lo if self.lo_open else parsed >= self.lo
            if not (above and parsed <= self.hi):
                raise ValueError
        return parsed


def _hostport(text: str) -> str:
    if not text:
        return ""
    host, _, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        ipaddress.IPv6Address(host[1:-1])
    elif not host or ":" in host or "[" in host:
        raise ValueError
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError
    return f"{host}:{int(port)}"


def is_loopback(hostport: str) -> bool:
    """Whether a `hostport` value (already parsed) names only this host's loopback interface:
    127.0.0.0/8, [::1] or localhost. 0.0.0.0, [::] and every other name reach the network."""
    host = hostport.rpartition(":")[0].strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def _key(default: object, **rule: Any) -> Any:
    """A config field with a default and the rule that bounds it."""
    return field(default=default, metadata={"rule": Rule(**rule), "derived": ""})


def _derived(derived: str, **rule: Any) -> dict[str, object]:
    """Metadata of a field that load_config derives when it is not set; `derived` says how."""
    return {"rule": Rule(**rule), "derived": derived}


def _invalid(key: str, value: object, rule: str) -> InvalidArgument:
    return InvalidArgument(
        f"{key} = {value!r} is invalid: it must be {rule}",
        reason="INVALID_CONFIG",
        metadata={"field": key, "value": value, "rule": rule},
    )
