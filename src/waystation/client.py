"""How clients (the CLI, runners) reach a server: address, token, TLS, contexts.

Contexts are named servers with their credentials, kept in
`$WAYSTATION_CONFIG` or the user config directory (`contexts.json`, mode
0600). Flags and environment variables override the current context.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import socket
import ssl
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import platformdirs
from grpc import aio

from waystation.core.limits import MAX_MESSAGE_BYTES
from waystation.core.settings import DEFAULT_ADDRESS
from waystation.core.wire import API_PROTOCOL, AUTHORIZATION

log = logging.getLogger(__name__)

# Sent with every call, as upstream clients do: "<minimum>,<current>".
PROTOCOL = (API_PROTOCOL, "1,1")
OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


@dataclass
class Connection:
    address: str = DEFAULT_ADDRESS
    token: str = ""
    tls: bool = False
    tls_ca: str = ""  # a CA bundle to trust instead of the system's
    tls_skip_verify: bool = False  # trust whatever certificate the server shows

    @property
    def uses_tls(self) -> bool:
        return self.tls or bool(self.tls_ca) or self.tls_skip_verify

    def metadata(self) -> list[tuple[str, str]]:
        md = [PROTOCOL]
        if self.token:
            md.append((AUTHORIZATION, self.token))
        return md

    def _credentials(self) -> grpc.ChannelCredentials:
        if self.tls_skip_verify:
            # gRPC cannot skip verification: trust the certificate the server shows.
            host, _, port = self.address.rpartition(":")
            pem = ssl.get_server_certificate((host.strip("[]"), int(port))).encode()
            return grpc.ssl_channel_credentials(root_certificates=pem)
        roots = Path(self.tls_ca).read_bytes() if self.tls_ca else None
        return grpc.ssl_channel_credentials(root_certificates=roots)

    def _options(self) -> list[tuple[str, Any]]:
        if self.tls_skip_verify:
            # The certificate may name another host; accept it for what it says.
            return [*OPTIONS, ("grpc.ssl_target_name_override", _cert_name(self.address))]
        return list(OPTIONS)

    def speaks_tls(self, details: str) -> bool:
        """Whether a plaintext call that failed with `details` met a TLS server.

        The failure reads like a dropped connection ("Socket closed"), so a TLS
        handshake confirms it: only a TLS server answers one.
        """
        hints = ("socket closed", "connection reset", "handshake", "ssl", "tls", "end of file")
        if not any(hint in details.lower() for hint in hints):
            return False
        host, _, port = self.address.rpartition(":")
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # any certificate will do: is it TLS at all?
        try:
            with (
                socket.create_connection((host.strip("[]") or "localhost", int(port)), 3) as sock,
                context.wrap_socket(sock),
            ):
                return True
        except (OSError, ValueError):
            return False

    def channel(self) -> grpc.Channel:
        """A blocking channel (the CLI) that sends our metadata on every call."""
        if self.uses_tls:
            raw = grpc.secure_channel(self.address, self._credentials(), options=self._options())
        else:
            raw = grpc.insecure_channel(self.address, options=self._options())
        return grpc.intercept_channel(raw, _SyncMetadata(self.metadata()))

    def aio_channel(
        self, options: Sequence[tuple[str, Any]] = (), *, intercept_bidi: bool = True
    ) -> aio.Channel:
        """An asyncio channel (runners, tests) that sends our metadata on every call;
        with intercept_bidi=False, bidirectional calls only if given `metadata()`:
        grpc feeds an intercepted one's writes through a task that it leaves
        pending when the server goes away ("Task was destroyed but it is pending")."""
        md = self.metadata()
        kinds: tuple[Any, ...] = (_AioUnaryUnary, _AioUnaryStream, _AioStreamUnary)
        if intercept_bidi:
            kinds += (_AioStreamStream,)
        interceptors: Any = [kind(md) for kind in kinds]
        opts = [*self._options(), *options]
        if self.uses_tls:
            return aio.secure_channel(
                self.address, self._credentials(), options=opts, interceptors=interceptors
            )
        return aio.insecure_channel(self.address, options=opts, interceptors=interceptors)


async def reconnect_pause(why: str, delay: float, stop: asyncio.Event, most: float) -> float:
    """Wait `delay` (jittered) before reconnecting, or until `stop`; return the next delay."""
    wait = delay * random.uniform(0.8, 1.2)
    log.warning("server unreachable (%s); reconnecting in %.1fs", why, wait)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(wait):
            await stop.wait()
    return min(delay * 2, most)


def _cert_name(address: str) -> str:
    host, _, port = address.rpartition(":")
    pem = ssl.get_server_certificate((host.strip("[]"), int(port)))
    der = ssl.PEM_cert_to_DER_cert(pem)
    # The subject's common name: the last one (the issuer's comes first).
    marker = b"\x06\x03\x55\x04\x03"  # OID 2.5.4.3, commonName
    at = der.rfind(marker)
    if at < 0:
        return host
    length = der[at + len(marker) + 1]
    start = at + len(marker) + 2
    return der[start : start + length].decode(errors="replace")


# The interceptor classes are generic only to type checkers.
if TYPE_CHECKING:
    _AioUU = aio.UnaryUnaryClientInterceptor[Any, Any]
    _AioUS = aio.UnaryStreamClientInterceptor[Any, Any]
    _AioSU = aio.StreamUnaryClientInterceptor[Any, Any]
    _AioSS = aio.StreamStreamClientInterceptor[Any, Any]
    _SyncUU = grpc.UnaryUnaryClientInterceptor[Any, Any]
    _SyncUS = grpc.UnaryStreamClientInterceptor[Any, Any]
    _SyncSU = grpc.StreamUnaryClientInterceptor[Any, Any]
    _SyncSS = grpc.StreamStreamClientInterceptor[Any, Any]
else:
    _AioUU = aio.UnaryUnaryClientInterceptor
    _AioUS = aio.UnaryStreamClientInterceptor
    _AioSU = aio.StreamUnaryClientInterceptor
    _AioSS = aio.StreamStreamClientInterceptor
    _SyncUU = grpc.UnaryUnaryClientInterceptor
    _SyncUS = grpc.UnaryStreamClientInterceptor
    _SyncSU = grpc.StreamUnaryClientInterceptor
    _SyncSS = grpc.StreamStreamClientInterceptor


class _AioMetadata:
    """Adds our metadata to every call. aio sorts interceptors by the first kind
    they are an instance of, so each kind gets a class of its own (below)."""

    def __init__(self, metadata: list[tuple[str, str]]) -> None:
        self.metadata = metadata

    def _details(self, details: aio.ClientCallDetails) -> aio.ClientCallDetails:
        merged = aio.Metadata(*(details.metadata or ()), *self.metadata)
        return aio.ClientCallDetails(
            details.method, details.timeout, merged, details.credentials, details.wait_for_ready
        )


class _AioUnaryUnary(_AioMetadata, _AioUU):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _AioUnaryStream(_AioMetadata, _AioUS):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _AioStreamUnary(_AioMetadata, _AioSU):
    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)


class _AioStreamStream(_AioMetadata, _AioSS):
    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)


class _SyncMetadata(
    _SyncUU,
    _SyncUS,
    _SyncSU,
    _SyncSS,
):
    def __init__(self, metadata: list[tuple[str, str]]) -> None:
        self.metadata = metadata

    def _details(self, details: Any) -> Any:
        return _Details(
            details.method,
            details.timeout,
            [*(details.metadata or ()), *self.metadata],
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


@dataclass(frozen=True)
class _Details(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: bool | None
    compression: Any


# -- contexts ----------------------------------------------------------------------


@dataclass
class Contexts:
    current: str = ""
    contexts: dict[str, Connection] = field(default_factory=dict)

    @staticmethod
    def path() -> Path:
        configured = os.environ.get("WAYSTATION_CONFIG")
        if configured:
            return Path(configured)
        return Path(platformdirs.user_config_dir("waystation", appauthor=False)) / "contexts.json"

    @classmethod
    def load(cls) -> Contexts:
        try:
            raw = json.loads(cls.path().read_text())
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read {cls.path()}: {exc}") from None
        known = Connection.__dataclass_fields__
        contexts = {
            name: Connection(**{k: v for k, v in entry.items() if k in known})
            for name, entry in raw.get("contexts", {}).items()
        }
        return cls(raw.get("current", ""), contexts)

    def save(self) -> Path:
        path = self.path()
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        data = {
            "current": self.current,
            "contexts": {n: asdict(c) for n, c in self.contexts.items()},
        }
        # Created 0600 before anything is written: it holds tokens.
        fd = os.open(path.with_suffix(".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
        os.replace(path.with_suffix(".tmp"), path)
        return path

    def active(self) -> Connection | None:
        return self.contexts.get(self.current)
