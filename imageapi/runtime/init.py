"""The container's first processes, forked from the helper (`zygote`).

Two ways in. The general one, for any request:

    helper ── fork ──> setup process: join the cgroup, unshare every namespace, fork, exit
                          └── fork ──> init (PID 1 inside): set up the root, pivot_root, exec

The fast one, used whenever a spare is ready (any request but a time namespace): the helper
keeps one *spare* forked ahead of time —

    helper ── fork ──> setup process: unshare the pid namespace, fork, exit
                          └── fork ──> spare (already PID 1 of a fresh pid namespace), waits
                                       for a request; then joins the cgroup, unshares the other
                                       namespaces (they apply to the caller itself), and goes on
                                       as init

— so the two forks are paid before the request, not during it.

A setup process exists because unshare(CLONE_NEWPID) only applies to children. When it exits,
its child is re-parented to the helper (a child subreaper), which learns the entrypoint's exit
status with waitpid.

Reports go over `report_fd` (close-on-exec): `P<pid>` for the init's host pid, `E<text>` for a
failure. End of file with no error means the entrypoint was exec'd.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import socket
import sys
from typing import Any, NoReturn

import prctl

from imageapi.kernel import seccomp
from imageapi.kernel.ns import CLONE_NEWNET, CLONE_NEWPID, unshare
from imageapi.runtime import rootfs
from imageapi.runtime.logfile import stamp

# Capabilities a container's root does not get: loading kernel modules, raw I/O on devices,
# setting the host clock, MAC policy and the kernel log. (CAP_SYS_BOOT stays: in a pid
# namespace reboot(2) just ends the namespace's init — that is how systemd halts.)
DROPPED_CAPS = ["sys_module", "sys_rawio", "sys_time", "mac_admin", "mac_override", "syslog",
                "wake_alarm", "block_suspend", "audit_control"]
# The "confined" profile keeps only these (a typical container runtime's default set, less
# mknod): no sys_admin (mounts), dac_read_search (open_by_handle_at), sys_ptrace, sys_module,
# sys_rawio, net_admin, sys_boot, ... Every other capability, present or future, is dropped.
CONFINED_CAPS = ["chown", "dac_override", "fowner", "fsetid", "kill", "setgid", "setuid",
                 "setpcap", "setfcap", "net_bind_service", "net_raw", "sys_chroot",
                 "audit_write"]
CONTAINER_NOFILE = 1024  # the soft open-file limit a container starts with
RESET_SIGNALS = [signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM, signal.SIGCHLD,
                 signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2]


def _report(fd: int, text: str) -> None:
    try:
        os.write(fd, text.replace("\n", " ").encode() + b"\n")
    except OSError:
        pass


def _join_cgroup(request: dict[str, Any]) -> None:
    # Before unsharing the cgroup namespace, so its root is the container's cgroup.
    if request.get("cgroup"):
        with open(os.path.join(request["cgroup"], "cgroup.procs"), "w") as procs:
            procs.write("0")  # "0" is the writer itself, whatever its pid namespace


def setup_process(request: dict[str, Any], report_fd: int, log_fd: int) -> NoReturn:
    """The general way in: runs in the helper's fresh child; never returns."""
    try:
        prctl.set_name("imageapi-setup")
        _join_cgroup(request)
        unshare(request["flags"])
        pid = os.fork()
    except BaseException as exc:
        _report(report_fd, f"E{_describe(exc)}")
        os._exit(1)
    if pid == 0:
        init_process(request, report_fd, log_fd)
    _report(report_fd, f"P{pid}")
    os._exit(0)


def spare_setup_process(request_fd: int, report_fd: int) -> NoReturn:
    """Makes a spare: runs in the helper's fresh child; never returns."""
    try:
        prctl.set_name("imageapi-setup")
        unshare(CLONE_NEWPID)
        pid = os.fork()
    except BaseException as exc:
        _report(report_fd, f"E{_describe(exc)}")
        os._exit(1)
    if pid == 0:
        _spare(request_fd, report_fd)
    _report(report_fd, f"P{pid}")
    os._exit(0)


def _spare(request_fd: int, report_fd: int) -> NoReturn:
    prctl.set_name("imageapi-spare")
    chunks = []
    try:
        while chunk := os.read(request_fd, 1 << 16):  # the helper closes its end after writing
            chunks.append(chunk)
        os.close(request_fd)
        if not chunks:
            os._exit(0)  # the helper went away: nothing to run
        request = json.loads(b"".join(chunks))
        # At once: a spare that does not answer in time is taken for stuck and killed.
        os.write(report_fd, b"R\n")
        log_fd = _open_log(request["log"])
    except BaseException as exc:
        _report(report_fd, f"E{_describe(exc)}")
        os._exit(1)
    init_process(request, report_fd, log_fd, late_flags=request["flags"] & ~CLONE_NEWPID)


def init_process(
    request: dict[str, Any], report_fd: int, log_fd: int, late_flags: int = 0
) -> NoReturn:
    """PID 1 of the container until it execs the entrypoint; never returns."""

    def say(message: str) -> None:
        try:
            os.write(log_fd, f"{stamp()} init: {message}\n".encode())
        except OSError:
            pass  # a full log must not stop the container: the helper reports lost output

    try:
        prctl.set_name("imageapi-init")
        if late_flags:
            _join_cgroup(request)
            unshare(late_flags)
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
        confined = request.get("profile") == "confined"
        program = seccomp.deny_list() if confined else b""
        if confined:
            say("confining: capabilities " + ",".join(CONFINED_CAPS)
                + "; seccomp deny-list; no new privileges")
            _confine_capabilities()
        else:
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
        os.closerange(keep + 1, max_fd())
        for sig in RESET_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        # The daemon raised its soft open-file limit to the hard one; programs that walk every
        # descriptor up to the limit expect the usual 1024 (systemd raises its own as it likes).
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft > CONTAINER_NOFILE:
            resource.setrlimit(resource.RLIMIT_NOFILE, (CONTAINER_NOFILE, hard))
        if confined:
            seccomp.install(program)  # last: the filter must not see our own setup
        os.execve(request["exe"], request["argv"], request["env"])
    except BaseException as exc:
        text = _describe(exc)
        try:
            say(f"failed: {text}")
        except OSError:
            pass
        _report(report_fd, f"E{text}")
        os._exit(127)


def _open_log(path: str) -> int:
    try:
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
    except OSError:
        return os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)  # the helper said why


def _confine_capabilities() -> None:
    """Bounding set down to CONFINED_CAPS, inheritable set empty: root's exec then gets just
    those (its ambient set empties with the inheritable one)."""
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    if last > prctl.CAP_LAST_CAP:  # fail closed: a capability we cannot name is one we keep
        raise OSError(errno.ENOTSUP, f"the kernel has capabilities up to {last}; python-prctl "
                      f"knows up to {prctl.CAP_LAST_CAP}: cannot confine")
    keep = {getattr(prctl, f"CAP_{name.upper()}") for name in CONFINED_CAPS}
    for cap in range(last + 1):
        if cap not in keep:
            prctl.capbset_drop(cap)
    prctl.cap_inheritable.limit()


def max_fd() -> int:
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
