"""The container's first two processes, forked from the helper (`zygote`).

    helper ── fork ──> setup process: join the cgroup, unshare namespaces, fork, report, exit
                          └── fork ──> init (PID 1 inside): set up the root, pivot_root, exec

The setup process exists because unshare(CLONE_NEWPID) only applies to children: its child
is PID 1 of the new namespace. When it exits, that child is re-parented to the helper (a
child subreaper), which then learns the entrypoint's exit status with waitpid.

Both report over `report_fd` (close-on-exec): `P<pid>` for the init's host pid, `E<text>` for
a failure. End of file with no error means the entrypoint was exec'd.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import sys
from typing import Any, NoReturn

import prctl

from imageapi.kernel.ns import CLONE_NEWNET, unshare
from imageapi.runtime import rootfs
from imageapi.runtime.logfile import stamp

# Capabilities a container's root does not get: loading kernel modules, raw I/O on devices,
# setting the host clock, MAC policy and the kernel log. (CAP_SYS_BOOT stays: in a pid
# namespace reboot(2) just ends the namespace's init — that is how systemd halts.)
DROPPED_CAPS = ["sys_module", "sys_rawio", "sys_time", "mac_admin", "mac_override", "syslog",
                "wake_alarm", "block_suspend", "audit_control"]
RESET_SIGNALS = [signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM, signal.SIGCHLD,
                 signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2]


def _report(fd: int, text: str) -> None:
    try:
        os.write(fd, text.replace("\n", " ").encode() + b"\n")
    except OSError:
        pass


def setup_process(request: dict[str, Any], report_fd: int, log_fd: int) -> NoReturn:
    """Runs in the helper's fresh child; never returns."""
    try:
        prctl.set_name("imageapi-setup")
        if request.get("cgroup"):
            # Before unsharing the cgroup namespace, so its root is the container's cgroup.
            with open(os.path.join(request["cgroup"], "cgroup.procs"), "w") as procs:
                procs.write(str(os.getpid()))
        unshare(request["flags"])
        pid = os.fork()
    except BaseException as exc:
        _report(report_fd, f"E{_describe(exc)}")
        os._exit(1)
    if pid == 0:
        init_process(request, report_fd, log_fd)
    _report(report_fd, f"P{pid}")
    os._exit(0)


def init_process(request: dict[str, Any], report_fd: int, log_fd: int) -> NoReturn:
    """PID 1 of the container until it execs the entrypoint; never returns."""

    def say(message: str) -> None:
        os.write(log_fd, f"{stamp()} init: {message}\n".encode())

    try:
        prctl.set_name("imageapi-init")
        os.setsid()  # no controlling terminal, out of the daemon's process group
        root = request["root"]
        rootfs.prepare(root, systemd=request["systemd"], console=request.get("console"),
                       say=say)
        if request["flags"] & CLONE_NEWNET:
            say("bringing up lo")
            from pyroute2 import IPRoute  # only containers with their own network pay for it

            with IPRoute() as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        socket.sethostname(request["hostname"])
        rootfs.enter(root, say)
        for cap in DROPPED_CAPS:
            if hasattr(prctl.capbset, cap):
                setattr(prctl.capbset, cap, False)
        null = os.open("/dev/null", os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        say(f"executing {request['exe']}")
        log_fd = 2
        keep = report_fd  # close-on-exec: it closes itself when exec succeeds
        os.closerange(3, keep)
        os.closerange(keep + 1, _max_fd())
        for sig in RESET_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        os.execve(request["exe"], request["argv"], request["env"])
    except BaseException as exc:
        text = _describe(exc)
        try:
            say(f"failed: {text}")
        except OSError:
            pass
        _report(report_fd, f"E{text}")
        os._exit(127)


def _max_fd() -> int:
    try:
        return os.sysconf("SC_OPEN_MAX")
    except (ValueError, OSError):
        return 1024


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno:
        name = errno.errorcode.get(exc.errno, str(exc.errno))
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{name}: {exc.strerror}{where}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


if __name__ == "__main__":  # pragma: no cover - run only through the helper
    sys.exit("imageapi.runtime.init is run by the imageapi helper, not by hand")
