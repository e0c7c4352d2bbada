"""Server settings: one dataclass, filled by the CLI from flags, environment and the
--config file (cli/server_config.py says which wins)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

import platformdirs

from waystation.core.timeouts import Timeouts

DEFAULT_LISTEN = "127.0.0.1:9701"
DEFAULT_ADDRESS = DEFAULT_LISTEN


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


def default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir("waystation", appauthor=False))


@dataclass(frozen=True)
class ServerSettings:
    listen: str = DEFAULT_LISTEN
    data_dir: Path = field(default_factory=default_data_dir)
    # SQLite in the data directory when unset.
    db_url: str | None = None
    fsync: bool = True
    # Seconds that in-flight RPCs get to finish at shutdown.
    shutdown_grace: float = 10.0
    timeouts: Timeouts = field(default_factory=Timeouts)
    # Off only in --dev mode, which refuses to listen beyond loopback.
    auth: bool = True
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # HOST:PORT to serve Prometheus metrics on over HTTP; none when unset.
    metrics_listen: str | None = None
    # Seconds to keep retrying a PostgreSQL that refuses connections at start.
    db_wait: float = 60.0
    # The server's log lines: "text" or "json" (one object a line).
    log_format: str = "text"
    # Seconds audit log entries are kept (90 days); older ones are pruned hourly.
    audit_retention: float = 90 * 24 * 3600.0
    # Seconds a login token is valid unless its minter says otherwise (30 days); 0: forever.
    token_ttl: float = 30 * 24 * 3600.0

    @property
    def database_url(self) -> str:
        return self.db_url or sqlite_url(self.data_dir / "waystation.db")


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
