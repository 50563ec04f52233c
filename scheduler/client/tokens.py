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
        # 0644 at most: the file holds digests, not secrets, but only its owner writes it.
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        with os.fdopen(fd, "a") as f:
            f.write(line + "\n")
    except OSError as exc:
        fail(InvalidArgument(f"cannot append to {path}: {exc.strerror}", reason="BAD_TOKENS_FILE"))
