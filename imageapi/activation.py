"""Listening sockets handed over by systemd socket activation (the sd_listen_fds(3) protocol).

The service manager binds the sockets (`systemd/imageapi.socket`), starts the daemon with them
as file descriptors 3, 4, ... and says so in `$LISTEN_FDS` (how many) and `$LISTEN_PID` (for
which process: a variable inherited by a child is not meant for it). Because the manager keeps
the sockets, connections made while the daemon restarts wait in the queue instead of failing.

`take_sockets()` removes the variables from the environment and makes the descriptors
close-on-exec, so that nothing the daemon starts (the container helper, hence every container:
a systemd booting in one must not think it was activated) inherits either.
"""

from __future__ import annotations

import os
import socket

LISTEN_FDS_START = 3
ENV = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class ActivationError(Exception):
    """What the service manager passed cannot be served; the message says why."""


def take_sockets() -> list[socket.socket]:
    """The listening sockets passed to this process, in order; [] when not activated."""
    pid, count, _names = (os.environ.pop(name, None) for name in ENV)
    if pid is None or count is None or pid != str(os.getpid()):
        return []
    try:
        n = int(count)
    except ValueError:
        raise ActivationError(f"LISTEN_FDS={count!r} is not a number") from None
    sockets: list[socket.socket] = []
    try:
        for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + n):
            sockets.append(_listening_socket(fd))
    except BaseException:
        for sock in sockets:
            sock.detach()  # not ours to close on a refusal: the manager owns them
        raise
    return sockets


def _listening_socket(fd: int) -> socket.socket:
    try:
        os.set_inheritable(fd, False)
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ActivationError(f"file descriptor {fd} (LISTEN_FDS): not a socket ({exc})") from None
    try:
        stream = sock.type == socket.SOCK_STREAM
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        family = sock.family in (socket.AF_UNIX, socket.AF_INET, socket.AF_INET6)
    except OSError as exc:
        sock.detach()
        raise ActivationError(f"file descriptor {fd} (LISTEN_FDS): {exc}") from None
    if not (stream and listening and family):
        sock.detach()
        raise ActivationError(
            f"file descriptor {fd} (LISTEN_FDS): not a listening stream socket of a unix or "
            "IP address (the socket unit needs ListenStream=)"
        )
    sock.setblocking(False)
    return sock
