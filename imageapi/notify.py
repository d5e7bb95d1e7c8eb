"""Readiness and shutdown notices to systemd (`Type=notify`): the sd_notify(3) protocol.

The protocol is one datagram of newline-separated `KEY=value` lines sent to the unix socket
named by `$NOTIFY_SOCKET` — a path, or an abstract address when it starts with `@`. Without
that variable (not started by systemd, or not as `Type=notify`) every notice is a no-op.

`Notifier.from_environ()` takes the variable out of the environment, so nothing the daemon
starts (the container helper, hence every container) inherits it: a systemd booting in a
container must never mistake the host's manager for its own.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)

ENV = "NOTIFY_SOCKET"
SEND_TIMEOUT = 5.0  # a full queue at the manager blocks a send; do not wait forever


class Notifier:
    def __init__(self, address: str | None) -> None:
        if address and address.startswith("@"):
            address = "\0" + address[1:]  # the abstract namespace
        elif address and not address.startswith("/"):
            log.warning("%s=%r is neither a path nor an abstract address; ignored", ENV, address)
            address = None
        self.address = address or None

    @classmethod
    def from_environ(cls) -> Notifier:
        return cls(os.environ.pop(ENV, None))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """Send `fields` ("READY=1", "STATUS=...") as one notice; True when it was sent."""
        if self.address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.settimeout(SEND_TIMEOUT)
                sock.connect(self.address)
                sock.send("\n".join(fields).encode())
        except OSError as exc:
            log.warning("cannot notify the service manager (%s): %s", fields[0], exc)
            return False
        return True
