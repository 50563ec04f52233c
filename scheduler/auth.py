"""Who may call torpord over TCP (issue 12): bearer tokens in two scopes, checked by a
grpc.aio server interceptor, and the TLS credentials of the TCP port.

The Unix socket is guarded by its file mode (0660, group torpor) and is served by a server
without this interceptor. On TCP every call carries `authorization: Bearer <token>`; the
daemon keeps only the tokens' SHA-256 digests (`daemon.tokens_file`), so the file holds no
usable secret. A token is 32 random bytes, so a plain, unsalted digest is as strong as a
salted one: there is no dictionary to precompute.

Scopes: `client` may call the Scheduler service, health and reflection; `admin` may call
everything. A missing or unknown token is UNAUTHENTICATED; a client token on any other
service (Admin) is PERMISSION_DENIED. Both are answered before the handler runs, so a refused
call changes nothing.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import structlog

from torpor.errors import FailedPrecondition, PermissionDenied, TorporError, Unauthenticated
from torpor.rpc_status import to_status

_log = structlog.get_logger("torpor.auth")

TOKEN_PREFIX = "torpor_"
"""Every token starts with it, so a leaked one is easy to recognise (and to scan for)."""
HASH_PREFIX = "sha256:"
AUTH_HEADER = "authorization"
BEARER = "bearer "


class Scope(enum.Enum):
    """What a token may call; ADMIN includes everything CLIENT may."""

    CLIENT = "client"
    ADMIN = "admin"


CLIENT_SERVICES = frozenset(
    {
        "torpor.v1.Scheduler",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }
)
"""Services a client token may call; every other service (Admin, and any added later) needs
an admin token, so a new service is closed until it is named here."""


@dataclass(frozen=True, slots=True)
class TokenEntry:
    """One line of the tokens file."""

    scope: Scope
    digest: bytes  # sha256 of the token
    name: str = ""


@dataclass(frozen=True, slots=True)
class NewToken:
    """A freshly made token and the tokens-file line that admits it."""

    token: str
    scope: Scope
    name: str

    @property
    def line(self) -> str:
        return format_line(self.scope, digest(self.token), self.name)


def new_token(scope: Scope, name: str = "") -> NewToken:
    """A random token (32 bytes from the OS's CSPRNG) of `scope`."""
    if any(c.isspace() for c in name):
        raise ValueError("a token name has no spaces")
    return NewToken(TOKEN_PREFIX + secrets.token_urlsafe(32), scope, name)


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def format_line(scope: Scope, token_digest: bytes, name: str = "") -> str:
    return f"{scope.value} {HASH_PREFIX}{token_digest.hex()}" + (f" {name}" if name else "")


def parse_tokens(text: str, origin: str) -> tuple[TokenEntry, ...]:
    """The entries of a tokens file: `SCOPE sha256:HEX [NAME]` per line; blank lines and
    `#` comments are skipped. A bad line is an error naming `origin` and the line number."""
    entries = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        try:
            scope = Scope(parts[0])
            if len(parts) > 3 or not parts[1].startswith(HASH_PREFIX):
                raise ValueError
            hashed = bytes.fromhex(parts[1].removeprefix(HASH_PREFIX))
            if len(hashed) != hashlib.sha256().digest_size:
                raise ValueError
        except (ValueError, IndexError):
            raise FailedPrecondition(
                f"{origin}:{number}: expected `admin|client sha256:<64 hex digits> [name]` "
                "(`torpor token new` prints such a line)",
                reason="BAD_TOKENS_FILE",
                metadata={"file": origin, "line": number},
            ) from None
        entries.append(TokenEntry(scope, hashed, parts[2] if len(parts) == 3 else ""))
    return tuple(entries)


def load_tokens(path: Path) -> tuple[TokenEntry, ...]:
    """daemon.tokens_file's entries; FailedPrecondition naming the key when it is unreadable."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise FailedPrecondition(
            f"cannot read daemon.tokens_file {path}: {exc.strerror}",
            reason="BAD_TOKENS_FILE",
            metadata={"file": str(path)},
        ) from None
    return parse_tokens(text, str(path))


class Tokens:
    """The known tokens; `check` answers which entry a presented token is."""

    def __init__(self, entries: tuple[TokenEntry, ...]) -> None:
        self.entries = entries

    def check(self, token: str) -> TokenEntry | None:
        """The entry of `token`, or None. Every entry is compared, each in constant time, so
        the time taken says nothing about which digest bytes matched."""
        presented = digest(token)
        found = None
        for entry in self.entries:
            if hmac.compare_digest(presented, entry.digest):
                found = entry
        return found


def bearer_token(metadata: Any) -> str | None:
    """The token of an `authorization: Bearer <token>` header, or None (an empty one too)."""
    for key, value in metadata or ():
        if key == AUTH_HEADER and isinstance(value, str) and value.lower().startswith(BEARER):
            return value[len(BEARER) :].strip() or None
    return None


def authorize(tokens: Tokens, method: str, metadata: Any) -> TorporError | None:
    """Why a call of `method` (`/package.Service/Method`) with `metadata` is refused, or None
    when its token's scope covers the method's service."""
    token = bearer_token(metadata)
    if token is None:
        return Unauthenticated(
            "this TCP endpoint needs a bearer token (the CLI reads $TORPOR_TOKEN or --token-file)",
            reason="TOKEN_MISSING",
        )
    entry = tokens.check(token)
    if entry is None:
        return Unauthenticated("the bearer token is not one torpord knows", reason="TOKEN_UNKNOWN")
    service = method.lstrip("/").partition("/")[0]
    if entry.scope is Scope.ADMIN or service in CLIENT_SERVICES:
        return None
    return PermissionDenied(
        f"{service} needs an admin token; this one ({entry.name or 'unnamed'}) is client scope",
        reason="SCOPE_ADMIN_REQUIRED",
        metadata={"service": service, "scope": entry.scope.value},
    )


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses, before the handler runs, every call whose token does not cover its service."""

    def __init__(self, tokens: Tokens) -> None:
        self.tokens = tokens

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        refusal = authorize(self.tokens, method, handler_call_details.invocation_metadata)
        handler = await continuation(handler_call_details)
        if refusal is None:
            return handler  # None for an unknown method, which gRPC answers UNIMPLEMENTED
        _log.warning("tcp_call_refused", method=method, reason=refusal.reason)
        return _refusing(handler, refusal)


def _refusing(handler: grpc.RpcMethodHandler | None, err: TorporError) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that only aborts with `err`'s status; for an
    unknown method (None) a unary one, so a stranger cannot probe which methods exist."""
    status = to_status(err)

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort_with_status(status)

    async def streaming(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort_with_status(status)
        yield  # pragma: no cover - makes this an async generator

    if handler is None:
        return grpc.unary_unary_rpc_method_handler(unary)
    # No request deserializer: a caller who is not let in never gets its bytes parsed.
    des, ser = None, handler.response_serializer
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary, des, ser)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming, des, ser)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary, des, ser)
    return grpc.stream_stream_rpc_method_handler(streaming, des, ser)


def server_credentials(cert: Path, key: Path, client_ca: Path | None) -> grpc.ServerCredentials:
    """TLS for the TCP port; with `client_ca`, clients must present a certificate it signed."""

    def read(path: Path, config_key: str) -> bytes:
        try:
            return path.read_bytes()
        except OSError as exc:
            raise FailedPrecondition(
                f"cannot read daemon.{config_key} {path}: {exc.strerror}",
                reason="BAD_TLS_FILE",
                metadata={"field": f"daemon.{config_key}", "file": str(path)},
            ) from None

    pair = (read(key, "tls_key"), read(cert, "tls_cert"))
    ca = read(client_ca, "tls_client_ca") if client_ca is not None else None
    return grpc.ssl_server_credentials(
        [pair], root_certificates=ca, require_client_auth=ca is not None
    )
