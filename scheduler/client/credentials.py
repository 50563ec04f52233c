"""How the CLI proves itself to torpord over TCP (issue 12): a bearer token, sent as
`authorization: Bearer <token>` on every call, over TLS when the daemon serves TLS.

The token comes from `$TORPOR_TOKEN` or from `--token-file` (`$TORPOR_TOKEN_FILE`), never from
a command-line argument, where `ps` would show it to every user. The Unix socket needs no
token (its file mode is its guard), so none of this applies to it.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from torpor.errors import InvalidArgument
from torpor.scheduler.client.target import Target

TOKEN_ENV = "TORPOR_TOKEN"


@dataclass(frozen=True, slots=True)
class TcpCredentials:
    """What the CLI presents on TCP: a token and TLS settings (all optional)."""

    token: str | None = None
    tls: bool = False
    tls_ca: Path | None = None  # None with tls: the system's roots
    tls_cert: Path | None = None  # mutual TLS: the client's certificate and key
    tls_key: Path | None = None
    tls_server_name: str | None = None  # the name the certificate must carry, if not the host


@dataclass(frozen=True, slots=True)
class TcpOptions:
    """The CLI's TCP options as given; `credentials` reads the files they name."""

    token_file: Path | None = None
    tls: bool = False
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_server_name: str | None = None

    def credentials(self, env: Mapping[str, str]) -> TcpCredentials:
        """The token (--token-file, else $TORPOR_TOKEN) and TLS settings; TLS is on when any
        TLS option is given."""
        if (self.tls_cert is None) != (self.tls_key is None):
            raise InvalidArgument(
                "give --tls-cert and --tls-key together", reason="BAD_TLS_OPTIONS"
            )
        token = _read_token(self.token_file) if self.token_file else env.get(TOKEN_ENV, "")
        tls_options = (self.tls_ca, self.tls_cert, self.tls_server_name)
        return TcpCredentials(
            token=token.strip() or None,
            tls=self.tls or any(x is not None for x in tls_options),
            tls_ca=self.tls_ca,
            tls_cert=self.tls_cert,
            tls_key=self.tls_key,
            tls_server_name=self.tls_server_name,
        )


def _read_token(path: Path) -> str:
    try:
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except OSError as exc:
        raise InvalidArgument(
            f"cannot read --token-file {path}: {exc.strerror}", reason="BAD_TOKEN_FILE"
        ) from None
    if len(lines) != 1:
        raise InvalidArgument(
            f"--token-file {path} must hold one token on one line", reason="BAD_TOKEN_FILE"
        )
    return lines[0]


def open_channel(target: Target, creds: TcpCredentials | None) -> grpc.Channel:
    """A channel to `target`: plain for a Unix socket; for TCP, TLS when asked and the token
    added to every call."""
    if target.address is None or creds is None:
        return grpc.insecure_channel(target.grpc_target)
    if creds.token and not creds.tls and not _loopback(target.address):
        raise InvalidArgument(
            f"refusing to send a token in plaintext to {target.address}; give --tls-ca "
            "(or --tls for the system's CAs)",
            reason="TOKEN_WITHOUT_TLS",
        )
    if creds.tls:
        options = []
        if creds.tls_server_name:
            options.append(("grpc.ssl_target_name_override", creds.tls_server_name))
        channel = grpc.secure_channel(target.grpc_target, _ssl(creds), options=options)
    else:
        channel = grpc.insecure_channel(target.grpc_target)
    if creds.token:
        return grpc.intercept_channel(channel, _BearerToken(creds.token))
    return channel


def _ssl(creds: TcpCredentials) -> grpc.ChannelCredentials:
    def read(path: Path | None, option: str) -> bytes | None:
        if path is None:
            return None
        try:
            return path.read_bytes()
        except OSError as exc:
            raise InvalidArgument(
                f"cannot read {option} {path}: {exc.strerror}", reason="BAD_TLS_OPTIONS"
            ) from None

    return grpc.ssl_channel_credentials(
        root_certificates=read(creds.tls_ca, "--tls-ca"),
        private_key=read(creds.tls_key, "--tls-key"),
        certificate_chain=read(creds.tls_cert, "--tls-cert"),
    )


def _loopback(address: str) -> bool:
    # The daemon's own test of a listen address (scheduler/config_rules.py imports no
    # SQLAlchemy, unlike scheduler/daemon_config.py).
    from torpor.scheduler.config_rules import is_loopback

    return is_loopback(address)


class _BearerToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds `authorization: Bearer <token>` to every call of a channel."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _with_token(self, details: Any) -> Any:
        metadata = [*(details.metadata or ()), self._header]
        return _CallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with_token(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._with_token(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._with_token(details), requests)


class _CallDetails(
    collections.namedtuple(
        "_CallDetails",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,
):
    """grpc's ClientCallDetails with the token in its metadata."""
