"""A provisioner daemon as a process: from its settings to the end of its last job.

`waystation provisioner` parses its flags into DaemonSettings and calls `run`.
The loop that acquires, runs and reports jobs, and reconnects when the server
goes away, is `ProvisionerDaemon.run` (daemon.py); this adds what a process
needs around it: its work directory, its signals and a start line.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import uuid

from waystation.provisioner.base import Provisioner
from waystation.provisioner.daemon import DaemonSettings, ProvisionerDaemon

log = logging.getLogger("waystation")


def default_daemon_id() -> str:
    """The host name and a random suffix: two daemons on one host are two owners."""
    return f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}"


def run(settings: DaemonSettings, provisioners: dict[str, Provisioner]) -> None:
    """Take jobs until stopped: the first SIGINT or SIGTERM takes no more jobs and
    finishes the one in hand; a second one cancels it. A server that refuses the
    daemon raises its grpc error."""
    if settings.work_dir is not None:
        settings.work_dir.mkdir(parents=True, exist_ok=True)
    asyncio.run(serve(settings, provisioners))


async def serve(settings: DaemonSettings, provisioners: dict[str, Provisioner]) -> None:
    daemon = ProvisionerDaemon(settings, provisioners)
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        daemon.stop(now=signals > 1)

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    log.info(
        "provisioner daemon %s serving %s (provisioners: %s; tags: %s)",
        settings.daemon_id,
        settings.address,
        ", ".join(settings.provisioners),
        settings.tags or "none",
    )
    await daemon.run()
