"""The one error hierarchy of torpor.

Every failure that crosses a component boundary is a `TorporError` carrying a `Code` (which
maps one-to-one onto a gRPC status code, see `torpor.rpc_status`) and a `retryable` flag.
Callers branch on the class or the code, never on message text.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar


class Code(enum.Enum):
    """Error categories; the names are the gRPC status code names they map to."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    UNAVAILABLE = "UNAVAILABLE"
    ABORTED = "ABORTED"
    CANCELLED = "CANCELLED"
    UNIMPLEMENTED = "UNIMPLEMENTED"
    DATA_LOSS = "DATA_LOSS"
    INTERNAL = "INTERNAL"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"


@dataclass(frozen=True)
class Wire:
    """How a code crosses each of torpord's APIs: the gRPC status (by name) and, for the
    OpenAI-compatible HTTP API, the HTTP status and OpenAI's error `type`."""

    grpc: str
    http: int
    openai_type: str


WIRE: Mapping[Code, Wire] = {
    Code.INVALID_ARGUMENT: Wire("INVALID_ARGUMENT", 400, "invalid_request_error"),
    Code.NOT_FOUND: Wire("NOT_FOUND", 404, "not_found_error"),
    Code.ALREADY_EXISTS: Wire("ALREADY_EXISTS", 409, "conflict_error"),
    Code.FAILED_PRECONDITION: Wire("FAILED_PRECONDITION", 400, "invalid_request_error"),
    Code.RESOURCE_EXHAUSTED: Wire("RESOURCE_EXHAUSTED", 429, "rate_limit_error"),
    Code.DEADLINE_EXCEEDED: Wire("DEADLINE_EXCEEDED", 504, "timeout_error"),
    Code.UNAVAILABLE: Wire("UNAVAILABLE", 503, "service_unavailable_error"),
    Code.ABORTED: Wire("ABORTED", 409, "aborted_error"),
    Code.CANCELLED: Wire("CANCELLED", 499, "cancelled_error"),
    Code.UNIMPLEMENTED: Wire("UNIMPLEMENTED", 501, "not_implemented_error"),
    Code.DATA_LOSS: Wire("DATA_LOSS", 500, "server_error"),
    Code.INTERNAL: Wire("INTERNAL", 500, "server_error"),
    Code.UNAUTHENTICATED: Wire("UNAUTHENTICATED", 401, "authentication_error"),
    Code.PERMISSION_DENIED: Wire("PERMISSION_DENIED", 403, "permission_error"),
}
"""The one table from a torpor error's code to the gRPC status and the HTTP status that
carry it (docs/API.md "Errors"); `torpor.rpc_status` and the HTTP API both read it."""


class TorporError(Exception):
    """Base of every torpor error.

    `reason` is a stable, machine-readable UPPER_SNAKE identifier (e.g. `PROMPT_TOO_LONG`);
    `metadata` carries the offending values as strings so clients can act on them.
    """

    code: ClassVar[Code] = Code.INTERNAL
    retryable: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, object] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.code.value
        self.metadata: dict[str, str] = {k: str(v) for k, v in (metadata or {}).items()}

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, reason={self.reason!r})"


class InvalidArgument(TorporError):
    """The request itself is wrong: a bad value, a malformed spec, an unusable checkpoint."""

    code = Code.INVALID_ARGUMENT


class NotFound(TorporError):
    """A named thing (model, lease, snapshot, file) does not exist."""

    code = Code.NOT_FOUND


class AlreadyExists(TorporError):
    """A create would overwrite something that exists."""

    code = Code.ALREADY_EXISTS


class FailedPrecondition(TorporError):
    """The system is not in a state where the request can ever succeed as asked
    (a model too large for any GPU, fp8 on a device without fp8 support)."""

    code = Code.FAILED_PRECONDITION


class ResourceExhausted(TorporError):
    """A bound was hit (queue full, store full); trying later may succeed."""

    code = Code.RESOURCE_EXHAUSTED
    retryable = True


class DeadlineExceeded(TorporError):
    """The caller's deadline passed before the work was done."""

    code = Code.DEADLINE_EXCEEDED
    retryable = True


class Unavailable(TorporError):
    """A component is down (daemon stopped, worker crashed); a retry may succeed."""

    code = Code.UNAVAILABLE
    retryable = True


class Aborted(TorporError):
    """The work was abandoned because of a conflicting operation (an eviction with ABORT)."""

    code = Code.ABORTED
    retryable = True


class Cancelled(TorporError):
    """The caller cancelled the work."""

    code = Code.CANCELLED


class Unimplemented(TorporError):
    """The operation is not supported by this build or backend."""

    code = Code.UNIMPLEMENTED


class DataLoss(TorporError):
    """Stored bytes are corrupt or missing (a chunk failed its hash check)."""

    code = Code.DATA_LOSS


class Internal(TorporError):
    """A bug: an invariant broke. Never retried automatically."""

    code = Code.INTERNAL


class Unauthenticated(TorporError):
    """The caller did not prove who it is: a TCP call with no bearer token, or a token that
    is not in the daemon's tokens file."""

    code = Code.UNAUTHENTICATED


class PermissionDenied(TorporError):
    """The caller is known but its scope does not cover the call (a client token on Admin)."""

    code = Code.PERMISSION_DENIED


BY_CODE: dict[Code, type[TorporError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        ResourceExhausted,
        DeadlineExceeded,
        Unavailable,
        Aborted,
        Cancelled,
        Unimplemented,
        DataLoss,
        Internal,
        Unauthenticated,
        PermissionDenied,
    )
}


def error_for(
    code: Code,
    message: str,
    *,
    reason: str | None = None,
    metadata: Mapping[str, object] | None = None,
) -> TorporError:
    """Build the error of the class that corresponds to `code`."""
    return BY_CODE[code](message, reason=reason, metadata=metadata)
