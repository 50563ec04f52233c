"""The global options of the client commands and the session every command runs in."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import typer

from torpor.errors import TorporError
from torpor.scheduler.client.connection import Connection
from torpor.scheduler.client.credentials import TcpOptions
from torpor.scheduler.client.exits import fail, interrupted
from torpor.scheduler.client.render import print_json
from torpor.scheduler.client.shapes import Json
from torpor.scheduler.client.target import resolve_target


@dataclass(frozen=True, slots=True)
class ClientOptions:
    """`torpor [--socket PATH | --address HOST:PORT [TCP options]] [--timeout S] [--json]
    COMMAND`; `tcp` holds the TCP options (token, TLS)."""

    socket: Path | None = None
    address: str | None = None
    timeout: float | None = None
    json: bool = False
    tcp: TcpOptions = field(default_factory=TcpOptions)


def options(ctx: typer.Context) -> ClientOptions:
    """The global options (defaults when the app ran without its callback)."""
    return ctx.obj if isinstance(ctx.obj, ClientOptions) else ClientOptions()


def wants_json(ctx: typer.Context, as_json: bool) -> bool:
    """`--json` given to the command or before it."""
    return as_json or options(ctx).json


def emit(ctx: typer.Context, as_json: bool, doc: Json, human: Callable[[Json], None]) -> None:
    """Print `doc` as JSON when asked to, else as `human` renders it."""
    if wants_json(ctx, as_json):
        print_json(doc)
    else:
        human(doc)


@contextlib.contextmanager
def session(ctx: typer.Context) -> Iterator[Connection]:
    """A connection to torpord for one command. A TorporError ends the command with its
    one-line reason and exit status; Ctrl-C or SIGTERM with status 130."""
    opts = options(ctx)
    try:
        with sigterm_interrupts():
            target = resolve_target(opts.socket, opts.address)
            creds = opts.tcp.credentials(os.environ) if target.address is not None else None
            with Connection(target, opts.timeout, creds) as conn:
                yield conn
    except TorporError as err:
        fail(err)
    except KeyboardInterrupt:
        interrupted()


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Let SIGTERM stop a command the way Ctrl-C does (KeyboardInterrupt), so that the same
    `finally` blocks run: a held lease is released either way."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
