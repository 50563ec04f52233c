"""`torpor token new`: make a bearer token for torpord's TCP endpoint (issue 12).

It prints the token (shown once; the daemon never stores it) and the line that admits it in
`daemon.tokens_file`, which holds only the token's SHA-256 digest. Nothing here talks to the
daemon, which reads its tokens file at start: restart it after adding a line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from torpor.errors import InvalidArgument
from torpor.scheduler.auth import Scope, new_token
from torpor.scheduler.client.exits import fail
from torpor.scheduler.client.render import print_json
from torpor.store.private import PRIVATE_FILE

token_app = typer.Typer(name="token", help="Bearer tokens for torpord's TCP endpoint.")


@token_app.command("new")
def new(
    scope: Annotated[
        Scope, typer.Option(help="admin: every RPC; client: the Scheduler service and health.")
    ],
    name: Annotated[str, typer.Option(help="A label kept on the line (no spaces).")] = "",
    append: Annotated[
        Path | None,
        typer.Option(help="Also append the line to this tokens file.", show_default=False),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False,
) -> None:
    """Print a new token and its line for daemon.tokens_file."""
    if any(c.isspace() for c in name):
        fail(InvalidArgument(f"--name has no spaces, got {name!r}", reason="BAD_TOKEN_NAME"))
    made = new_token(scope, name)
    if append is not None:
        _append(append, made.line)
    if as_json:
        print_json({"token": made.token, "scope": scope.value, "name": name, "line": made.line})
        return
    typer.echo(f"token (give it to the client; it is not stored anywhere): {made.token}")
    typer.echo(f"line for daemon.tokens_file: {made.line}")


def _append(path: Path, line: str) -> None:
    try:
        with os.fdopen(_open_for_append(path), "a") as f:
            f.write(line + "\n")
    except OSError as exc:
        fail(InvalidArgument(f"cannot append to {path}: {exc.strerror}", reason="BAD_TOKENS_FILE"))


def _open_for_append(path: Path) -> int:
    """A new tokens file is 0600 whatever the umask: its digests let anyone who reads them
    try tokens offline, and torpord needs no group or other bit (issue 12). An existing file
    keeps its mode: the operator may have made it 0640 root:torpor for torpord to read."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
    except FileExistsError:
        return os.open(path, flags)
    try:
        os.fchmod(fd, PRIVATE_FILE)  # the umask only narrows: 0600 exactly, not 0400
    except BaseException:
        os.close(fd)
        raise
    return fd
