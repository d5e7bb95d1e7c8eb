"""The container's filesystem: what its init sees as `/`, `/proc`, `/dev`, `/sys`.

Runs in the container's first process, inside its fresh mount and pid namespaces, before the
entrypoint is exec'd. Every path inside the image is resolved by the kernel inside the image
(openat2 RESOLVE_IN_ROOT), as the image sees it after pivot_root: its symlinks can never steer
a directory made or a mount placed onto the host's tree. Mounts go onto the very directory an
fd holds (`/proc/self/fd/N`), so nothing can swap the path between the check and the mount.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from imageapi.kernel import mount as km
from imageapi.kernel.ns import pivot_root
from imageapi.kernel.resolve import open_in_root

Say = Callable[[str], None]

NOSUID_NODEV_NOEXEC = km.MS_NOSUID | km.MS_NODEV | km.MS_NOEXEC
O_DIR = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
O_ENTRY = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
MAX_SYMLINKS = 40

# (name, major, minor): the character devices every container gets, mode 0666.
DEVICES = [("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("tty", 5, 0),
           ("random", 1, 8), ("urandom", 1, 9)]
# (name, fstype, flags, data): what is mounted in the new /dev.
DEV_MOUNTS = [
    ("shm", "tmpfs", km.MS_NOSUID | km.MS_NODEV, "mode=1777,size=65536k"),
    ("mqueue", "mqueue", NOSUID_NODEV_NOEXEC, ""),
    ("pts", "devpts", km.MS_NOSUID | km.MS_NOEXEC, "newinstance,ptmxmode=0666,mode=620"),
]
# (link, target) under /dev.
DEV_LINKS = [("ptmx", "pts/ptmx"), ("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
             ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")]
# /proc files that expose the host's kernel (memory, keys, timers): hidden behind /dev/null.
PROC_MASKED_FILES = ["kcore", "keys", "timer_list", "sched_debug", "latency_stats"]
PROC_MASKED_DIRS = ["acpi", "scsi"]
PROC_READ_ONLY = ["sys", "sysrq-trigger", "irq", "bus", "fs"]
# Where `prepare` mounts, to be checked (or made) in the image before anything runs. The
# kernel's filesystems go on directories of the image's top level, never through a symlink;
# the systemd ones follow the image's symlinks, resolved inside the image.
MOUNTPOINTS = ("/proc", "/dev", "/sys")
SYSTEMD_MOUNTPOINTS = ("/run", "/tmp", "/var/lib/journal")


class SetupError(Exception):
    """A step of the container setup failed; the message says which and why."""


def _fd_path(fd: int) -> str:
    # mount(2) follows this magic link to the directory the fd holds, wherever it is now.
    return f"/proc/self/fd/{fd}"


def _dir(rootfd: int, path: str, *, follow: bool = True) -> int:
    """An O_PATH fd of the directory `path` inside the image, made if absent.

    With `follow` false the last component must be a directory itself, not a symlink.
    """
    try:
        return _open_or_make(rootfd, path, follow, [0])
    except NotADirectoryError:
        raise SetupError(f"{path} in the image is not a directory") from None
    except OSError as exc:
        raise SetupError(f"cannot make {path} in the image: {exc.strerror}") from exc


def _open_or_make(rootfd: int, path: str, follow: bool, links: list[int]) -> int:
    """`links` counts the symlinks followed, shared across the recursion."""
    flags = O_DIR if follow else O_DIR | os.O_NOFOLLOW
    try:
        return open_in_root(rootfd, path, flags)
    except FileNotFoundError:
        pass
    except NotADirectoryError:
        if not follow and _is_symlink(rootfd, path):
            raise SetupError(f"{path} in the image is a symlink, not a directory") from None
        raise
    # Something on the way is missing: make the parent first (resolved the same way), then
    # the last component in it. `/` always exists, so this ends.
    parts = [p for p in path.split("/") if p]
    parent, name = "/" + "/".join(parts[:-1]), parts[-1]
    parent_fd = _open_or_make(rootfd, parent, True, links)
    try:
        if name not in (".", ".."):
            try:
                os.mkdir(name, 0o755, dir_fd=parent_fd)
            except FileExistsError:
                # A symlink to nowhere: make its target, in the image, as the image sees it.
                # Anything else was made meanwhile or is no directory: the open below tells.
                if _is_symlink(parent_fd, name):
                    if not follow:
                        raise SetupError(
                            f"{path} in the image is a symlink, not a directory") from None
                    links[0] += 1
                    if links[0] > MAX_SYMLINKS:
                        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path) from None
                    target = os.readlink(name, dir_fd=parent_fd)
                    return _open_or_make(rootfd, target if target.startswith("/")
                                         else f"{parent}/{target}", True, links)
    finally:
        os.close(parent_fd)
    return open_in_root(rootfd, path, flags)


def _is_symlink(dirfd: int, path: str) -> bool:
    try:
        fd = open_in_root(dirfd, path, O_ENTRY)
    except OSError:
        return False
    try:
        return stat.S_ISLNK(os.fstat(fd).st_mode)
    finally:
        os.close(fd)


def _mount(say: Say, rootfd: int, path: str, fstype: str, flags: int, data: str = "",
           *, follow: bool = True) -> None:
    say(f"mounting {path}")
    fd = _dir(rootfd, path, follow=follow)
    try:
        if follow and os.path.samestat(os.fstat(fd), os.fstat(rootfd)):
            raise SetupError(f"{path} in the image leads to the image's root itself")
        _mount_at(path, _fd_path(fd), fstype, flags, data)
    finally:
        os.close(fd)


def _mount_at(path: str, target: str, fstype: str, flags: int, data: str = "") -> None:
    try:
        km.mount(fstype, target, fstype, flags, data)
    except OSError as exc:
        raise SetupError(f"cannot mount {path} ({fstype}): {exc.strerror}") from exc


@contextmanager
def _held(dirfd: int, name: str) -> Iterator[str]:
    """The magic-link path of `name` right in `dirfd` (a symlink there is not followed)."""
    fd = os.open(name, O_ENTRY, dir_fd=dirfd)
    try:
        yield _fd_path(fd)
    finally:
        os.close(fd)


def _bind(source: str | None, dirfd: int, name: str, flags: int = 0) -> None:
    """Bind `source` (None: the entry itself) onto `name` in `dirfd`; remount with `flags`."""
    with _held(dirfd, name) as target:
        km.mount(source or target, target, None, km.MS_BIND | km.MS_REC)
    if flags:
        # A remount must name the new mount's root: a fresh lookup crosses into it, the old
        # fd (the entry underneath) does not.
        with _held(dirfd, name) as target:
            km.mount("", target, None, km.MS_BIND | km.MS_REMOUNT | flags)


def _mode(dirfd: int, name: str) -> int | None:
    try:
        return os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_mode
    except FileNotFoundError:
        return None


def prepare(root: str, *, systemd: bool, console: str | None, say: Say) -> None:
    """Build the container's view of the system on `root` (not yet its root)."""
    say("making all mounts private")
    km.mount("", "/", None, km.MS_REC | km.MS_PRIVATE)
    say("preparing image")
    # pivot_root needs the new root to be a mount point of its own.
    km.mount(root, root, None, km.MS_BIND | km.MS_REC)
    # Opened after the bind, so every mount below lands in the tree pivot_root will take.
    rootfd = os.open(root, O_DIR)
    try:
        _prepare(rootfd, systemd=systemd, console=console, say=say)
    finally:
        os.close(rootfd)


def _prepare(rootfd: int, *, systemd: bool, console: str | None, say: Say) -> None:
    _mount(say, rootfd, "/proc", "proc", NOSUID_NODEV_NOEXEC, follow=False)
    # Each mount just made, reached by a fresh lookup (which crosses into it) and held from
    # now on: what later mounts do to the image's paths cannot redirect what goes in there.
    proc = _dir(rootfd, "/proc", follow=False)
    try:
        _mount(say, rootfd, "/dev", "tmpfs", km.MS_NOSUID | km.MS_STRICTATIME,
               "mode=755,size=65536k", follow=False)
        dev = _dir(rootfd, "/dev", follow=False)
        try:
            _prepare_in(rootfd, proc, dev, systemd=systemd, console=console, say=say)
        finally:
            os.close(dev)
    finally:
        os.close(proc)


def _prepare_in(rootfd: int, proc: int, dev: int, *, systemd: bool, console: str | None,
                say: Say) -> None:
    for name, fstype, flags, data in DEV_MOUNTS:
        # The tmpfs is this namespace's own: nothing in it needs resolving in the image.
        say(f"mounting /dev/{name}")
        os.mkdir(name, 0o755, dir_fd=dev)
        with _held(dev, name) as target:
            _mount_at(f"/dev/{name}", target, fstype, flags, data)
    _mount(say, rootfd, "/sys", "sysfs", NOSUID_NODEV_NOEXEC | km.MS_RDONLY, follow=False)
    if systemd:
        _mount(say, rootfd, "/run", "tmpfs", km.MS_NOSUID | km.MS_NODEV, "mode=755")
        _mount(say, rootfd, "/tmp", "tmpfs", km.MS_NOSUID | km.MS_NODEV, "mode=1777")
        # In our cgroup namespace this shows only the container's own (delegated) cgroup.
        _mount(say, rootfd, "/sys/fs/cgroup", "cgroup2", NOSUID_NODEV_NOEXEC)
        _mount(say, rootfd, "/var/lib/journal", "tmpfs", km.MS_NOSUID | km.MS_NODEV,
               "mode=755")
    _populate_dev(dev, console, say)
    _mask_proc(proc, dev)


def _populate_dev(dev: int, console: str | None, say: Say) -> None:
    for name, major, minor in DEVICES:
        say(f"making device file /dev/{name}")
        os.mknod(name, stat.S_IFCHR | 0o666, os.makedev(major, minor), dir_fd=dev)
        os.chmod(name, 0o666, dir_fd=dev)  # mknod's mode is filtered by the umask
    for link, target in DEV_LINKS:
        say(f"creating symlink /dev/{link} -> {target}")
        os.symlink(target, link, dir_fd=dev)
    if console is not None:
        say("attaching /dev/console")
        fd = os.open("console", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600, dir_fd=dev)
        try:
            os.fchmod(fd, 0o600)
        finally:
            os.close(fd)
        _bind(console, dev, "console")


def _mask_proc(proc: int, dev: int) -> None:
    with _held(dev, "null") as null:
        for name in PROC_MASKED_FILES:
            if stat.S_ISREG(_mode(proc, name) or 0):
                _bind(null, proc, name)
    for name in PROC_MASKED_DIRS:
        if stat.S_ISDIR(_mode(proc, name) or 0):
            with _held(proc, name) as target:
                km.mount("tmpfs", target, "tmpfs", km.MS_RDONLY)
    for name in PROC_READ_ONLY:
        if _mode(proc, name) is not None:
            _bind(None, proc, name, km.MS_RDONLY | NOSUID_NODEV_NOEXEC)


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
