"""Name and path safety: what a user may call a model, and where a checkpoint may come from.

Names from users never become paths anywhere in torpor: chunk files are named by their
content hash and snapshots by ids the store generates. The checks here are still strict,
because a model name is echoed into logs, metrics labels and CLI output, and a name that
looks like a path (`../x`) or carries control characters is a mistake or an attack.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from torpor.errors import InvalidArgument

MAX_MODEL_NAME_LEN = 128
"""Longest accepted model name, in characters."""

MAX_SOURCE_PATH_BYTES = 4096
"""Longest accepted checkpoint source path, in UTF-8 bytes (Linux's PATH_MAX)."""
MAX_PATH_COMPONENT_BYTES = 255
"""Longest accepted file name in a source path, in UTF-8 bytes (Linux's NAME_MAX)."""

# A letter or digit first (no leading dot, dash or colon), then up to 127 of a small safe
# set. ':' is allowed for tags such as `llama3:70b`; '/' and '\\' never are.
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


def validate_model_name(name: object) -> str:
    """Return `name` if it is an acceptable model name, else raise InvalidArgument.

    Accepted: `[A-Za-z0-9][A-Za-z0-9._:-]{0,127}` without `..`. Rejected with the reason
    in `metadata["problem"]`: non-strings, empty, too long, path separators, NUL and
    other control characters, a leading dot, and `..` anywhere.
    """
    problem = _name_problem(name)
    if problem is not None:
        shown = repr(name)[:80]
        raise InvalidArgument(
            f"invalid model name {shown}: {problem}; use 1-{MAX_MODEL_NAME_LEN} characters "
            "from A-Z a-z 0-9 . _ : - starting with a letter or digit",
            reason="INVALID_MODEL_NAME",
            metadata={"name": shown, "problem": problem},
        )
    assert isinstance(name, str)
    return name


def _name_problem(name: object) -> str | None:
    """Why `name` is not acceptable, or None when it is."""
    if not isinstance(name, str):
        return f"must be a string, got {type(name).__name__}"
    if not name:
        return "empty"
    if len(name) > MAX_MODEL_NAME_LEN:
        return f"longer than {MAX_MODEL_NAME_LEN} characters ({len(name)})"
    if "/" in name or "\\" in name:
        return "contains a path separator"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        return "contains a NUL or control character"
    if name.startswith("."):
        return "starts with a dot"
    if ".." in name:
        return "contains '..'"
    if _MODEL_NAME.fullmatch(name) is None:
        return "contains a character outside A-Z a-z 0-9 . _ : -"
    return None


def check_source_length(text: str) -> None:
    """Refuse a source path the kernel would refuse to look up (ENAMETOOLONG), before any
    lookup: reason SOURCE_PATH_TOO_LONG."""
    size = len(text.encode(errors="surrogateescape"))
    longest = max((len(p.encode(errors="surrogateescape")) for p in text.split("/")), default=0)
    if size > MAX_SOURCE_PATH_BYTES or longest > MAX_PATH_COMPONENT_BYTES:
        raise InvalidArgument(
            f"checkpoint source path is too long ({size} bytes, longest name {longest}): at "
            f"most {MAX_SOURCE_PATH_BYTES} bytes, {MAX_PATH_COMPONENT_BYTES} per name",
            reason="SOURCE_PATH_TOO_LONG",
            metadata={"source": text[:200], "bytes": size},
        )


def check_source_path(source: str | os.PathLike[str], roots: Iterable[Path]) -> Path:
    """Resolve a checkpoint source directory and require it to lie under a model root.

    Symlinks are resolved on both sides before comparing, so a link inside a root that
    points outside it is rejected. Returns the resolved path, which is what the catalog
    records. Raises InvalidArgument (reason `SOURCE_OUTSIDE_ROOTS`, `SOURCE_MISSING` or
    `NO_MODEL_ROOTS`).
    """
    root_list = [Path(r) for r in roots]
    text = os.fspath(source)
    if "\x00" in text or not text:
        raise InvalidArgument(
            f"invalid checkpoint source path {text!r}", reason="INVALID_SOURCE_PATH"
        )
    if not root_list:
        raise InvalidArgument(
            "no model roots are configured, so no checkpoint source is accepted; "
            "set the model roots in the configuration",
            reason="NO_MODEL_ROOTS",
            metadata={"source": text},
        )
    try:
        resolved = Path(text).resolve(strict=True)
    except (OSError, RuntimeError) as exc:  # missing, a loop, unreadable, a name too long
        raise InvalidArgument(
            f"checkpoint source {text!r} does not exist or cannot be looked up: {exc}",
            reason="SOURCE_MISSING",
            metadata={"source": text},
        ) from exc
    resolved_roots = [r.resolve(strict=False) for r in root_list]
    if not any(resolved.is_relative_to(root) for root in resolved_roots):
        raise InvalidArgument(
            f"checkpoint source {text!r} (resolved to {str(resolved)!r}) is not under any "
            f"model root: {[str(r) for r in resolved_roots]}",
            reason="SOURCE_OUTSIDE_ROOTS",
            metadata={"source": text, "resolved": resolved, "roots": resolved_roots},
        )
    return resolved


MAX_FINGERPRINT_LEN = 512


def check_fingerprint(fingerprint: str) -> str:
    """A snapshot's environment fingerprint (1-512 printable characters), or InvalidArgument."""
    if (
        not isinstance(fingerprint, str)
        or not 0 < len(fingerprint) <= MAX_FINGERPRINT_LEN
        or not fingerprint.isprintable()
    ):
        raise InvalidArgument(
            f"an environment fingerprint is 1-{MAX_FINGERPRINT_LEN} printable characters, "
            f"got {fingerprint!r:.80}",
            reason="INVALID_FINGERPRINT",
        )
    return fingerprint
