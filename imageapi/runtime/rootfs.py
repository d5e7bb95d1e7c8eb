"""The container's filesystem: what its init sees as `/`, `/proc`, `/dev`, `/sys`.

Runs in the container's first process, inside its fresh mount and pid namespaces, before the
entrypoint is exec'd. The host paths in here are only reachable until `enter()` pivots.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable

from imageapi.kernel import mount as km
from imageapi.kernel.ns import pivot_root

Say = Callable[[str], None]

NOSUID_NODEV_NOEXEC = km.MS_NOSUID | km.MS_NODEV | km.MS_NOEXEC

# (name, major, minor): the character devices every container gets, mode 0666.
DEVICES = [("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("tty", 5, 0),
           ("random", 1, 8), ("urandom", 1, 9)]
# (link, target) under /dev.
DEV_LINKS = [("ptmx", "pts/ptmx"), ("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
             ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")]
# /proc files that expose the host's kernel (memory, keys, timers): hidden behind /dev/null.
PROC_MASKED_FILES = ["kcore", "keys", "timer_list", "sched_debug", "latency_stats"]
PROC_MASKED_DIRS = ["acpi", "scsi"]
PROC_READ_ONLY = ["sys", "sysrq-trigger", "irq", "bus", "fs"]
# Where `prepare` mounts, to be checked (or made) in the image before anything runs.
MOUNTPOINTS = ("/proc", "/dev", "/sys")
SYSTEMD_MOUNTPOINTS = ("/run", "/tmp", "/var/lib/journal")


class SetupError(Exception):
    """A step of the container setup failed; the message says which and why."""


def _in(root: str, path: str) -> str:
    return os.path.join(root, path.lstrip("/"))


def _dir(root: str, path: str) -> str:
    """The host path of a directory inside the image, created if absent; never a symlink."""
    target = _in(root, path)
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        try:
            os.makedirs(target, mode=0o755)
        except OSError as exc:
            raise SetupError(f"the image has no {path} and it cannot be made: {exc}") from exc
        return target
    if not stat.S_ISDIR(st.st_mode):
        raise SetupError(f"{path} in the image is not a directory")
    return target


def _mount(say: Say, root: str, path: str, fstype: str, flags: int, data: str = "") -> None:
    say(f"mounting {path}")
    target = _dir(root, path)
    try:
        km.mount(fstype, target, fstype, flags, data)
    except OSError as exc:
        raise SetupError(f"cannot mount {path} ({fstype}): {exc.strerror}") from exc


def _bind(source: str, target: str, flags: int = 0) -> None:
    km.mount(source, target, None, km.MS_BIND | km.MS_REC)
    if flags:
        km.mount("", target, None, km.MS_BIND | km.MS_REMOUNT | flags)


def prepare(root: str, *, systemd: bool, console: str | None, say: Say) -> None:
    """Build the container's view of the system on `root` (not yet its root)."""
    say("making all mounts private")
    km.mount("", "/", None, km.MS_REC | km.MS_PRIVATE)
    say("preparing image")
    # pivot_root needs the new root to be a mount point of its own.
    km.mount(root, root, None, km.MS_BIND | km.MS_REC)

    _mount(say, root, "/proc", "proc", NOSUID_NODEV_NOEXEC)
    _mount(say, root, "/dev", "tmpfs", km.MS_NOSUID | km.MS_STRICTATIME, "mode=755,size=65536k")
    _mount(say, root, "/dev/shm", "tmpfs", km.MS_NOSUID | km.MS_NODEV, "mode=1777,size=65536k")
    _mount(say, root, "/dev/mqueue", "mqueue", NOSUID_NODEV_NOEXEC)
    _mount(say, root, "/dev/pts", "devpts", km.MS_NOSUID | km.MS_NOEXEC,
           "newinstance,ptmxmode=0666,mode=620")
    _mount(say, root, "/sys", "sysfs", NOSUID_NODEV_NOEXEC | km.MS_RDONLY)
    if systemd:
        _mount(say, root, "/run", "tmpfs", km.MS_NOSUID | km.MS_NODEV, "mode=755")
        _mount(say, root, "/tmp", "tmpfs", km.MS_NOSUID | km.MS_NODEV, "mode=1777")
        # In our cgroup namespace this shows only the container's own (delegated) cgroup.
        _mount(say, root, "/sys/fs/cgroup", "cgroup2", NOSUID_NODEV_NOEXEC)
        _mount(say, root, "/var/lib/journal", "tmpfs", km.MS_NOSUID | km.MS_NODEV, "mode=755")

    dev = _in(root, "/dev")
    for name, major, minor in DEVICES:
        say(f"making device file /dev/{name}")
        path = os.path.join(dev, name)
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(major, minor))
        os.chmod(path, 0o666)  # mknod's mode is filtered by the umask
    for link, target in DEV_LINKS:
        say(f"creating symlink /dev/{link} -> {target}")
        os.symlink(target, os.path.join(dev, link))
    if console is not None:
        say("attaching /dev/console")
        path = os.path.join(dev, "console")
        with open(path, "w"):
            pass
        os.chmod(path, 0o600)
        _bind(console, path)

    proc = _in(root, "/proc")
    for name in PROC_MASKED_FILES:
        if os.path.isfile(os.path.join(proc, name)):
            _bind(os.path.join(dev, "null"), os.path.join(proc, name))
    for name in PROC_MASKED_DIRS:
        if os.path.isdir(os.path.join(proc, name)):
            km.mount("tmpfs", os.path.join(proc, name), "tmpfs", km.MS_RDONLY)
    for name in PROC_READ_ONLY:
        path = os.path.join(proc, name)
        if os.path.exists(path):
            _bind(path, path, km.MS_RDONLY | NOSUID_NODEV_NOEXEC)


def enter(root: str, say: Say) -> None:
    """Make `root` the process's `/` and drop every host mount from its namespace."""
    say("entering the image")
    os.chdir(root)
    try:
        # The pivot_root(".", ".") idiom: the old root ends up stacked under the new one
        # and is lazily unmounted, so no directory is needed to park it in.
        pivot_root(".", ".")
        km.umount(".", km.MNT_DETACH)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        # pivot_root refuses a root on rootfs/initramfs: move the mount over / and chroot.
        say("pivot_root not possible here; moving the image over / instead")
        km.mount(root, "/", None, km.MS_MOVE)
        os.chroot(".")
    os.chdir("/")
