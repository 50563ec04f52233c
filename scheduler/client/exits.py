"""Exit statuses of the client commands: one per error code, so scripts can branch on them.

| exit | meaning |
| --- | --- |
| 0 | success |
| 1 | INTERNAL: a bug, or a status that is not torpor's |
| 2 | INVALID_ARGUMENT: a bad option or value (click's own usage errors are 2 too) |
| 3 | NOT_FOUND: unknown model, lease or snapshot |
| 4 | ALREADY_EXISTS: the model name is taken |
| 5 | FAILED_PRECONDITION: never fits on any GPU, pinned, wrong state |
| 6 | RESOURCE_EXHAUSTED: queue or store budget full (retryable) |
| 7 | DEADLINE_EXCEEDED: a deadline or DRAIN timeout passed; 600 s silent in a wait (retryable) |
| 8 | UNAVAILABLE: torpord is not running or not reachable, or a worker died (retryable) |
| 9 | ABORTED: an eviction in ABORT mode ended the request or lease (retryable) |
| 10 | UNIMPLEMENTED: not supported by this daemon or backend |
| 11 | DATA_LOSS: a snapshot chunk failed its hash check |
| 12 | UNAUTHENTICATED: TCP without a token, or a token torpord does not know |
| 13 | PERMISSION_DENIED: a client-scope token on an Admin call |
| 130 | CANCELLED: interrupted (Ctrl-C, SIGTERM) before the command was done |

The retryable codes are exactly 6-9. `torpor acquire` and `torpor events --follow` run until
interrupted, so an interrupt is their normal end and exits 0.
"""

from __future__ import annotations

import sys
from typing import NoReturn

import typer

from torpor.errors import Code, TorporError

EXIT_CODES: dict[Code, int] = {
    Code.INTERNAL: 1,
    Code.INVALID_ARGUMENT: 2,
    Code.NOT_FOUND: 3,
    Code.ALREADY_EXISTS: 4,
    Code.FAILED_PRECONDITION: 5,
    Code.RESOURCE_EXHAUSTED: 6,
    Code.DEADLINE_EXCEEDED: 7,
    Code.UNAVAILABLE: 8,
    Code.ABORTED: 9,
    Code.UNIMPLEMENTED: 10,
    Code.DATA_LOSS: 11,
    Code.UNAUTHENTICATED: 12,
    Code.PERMISSION_DENIED: 13,
    Code.CANCELLED: 130,
}
INTERRUPTED = EXIT_CODES[Code.CANCELLED]


def exit_code(err: TorporError) -> int:
    """The exit status of a command that failed with `err`."""
    return EXIT_CODES[err.code]


def one_line(text: str) -> str:
    """`text` with its whitespace runs (newlines included) folded into single spaces."""
    return " ".join(text.split())


def fail(err: TorporError) -> NoReturn:
    """Print `torpor: error: <reason>` on one line of stderr and exit with err's status."""
    print(f"torpor: error: {one_line(err.message)}", file=sys.stderr, flush=True)
    raise typer.Exit(exit_code(err))


def interrupted() -> NoReturn:
    """Exit after Ctrl-C or SIGTERM stopped a command before it was done."""
    print("torpor: interrupted", file=sys.stderr, flush=True)
    raise typer.Exit(INTERRUPTED)
