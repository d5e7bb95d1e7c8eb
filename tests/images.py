"""Real system images for tests and benchmarks, built once per machine and cached.

`systemd_image()` returns a squashfs of a minimal Debian bookworm that can boot systemd as PID 1 in
a container: debootstrap `--variant=minbase --include=systemd,systemd-sysv,dbus`, a few documented
changes (see `_customise`), squashed with zstd (fast to read, nearly as small as xz).

The build takes minutes and needs root and the Debian mirror, so the result is kept in a cache
directory (`/var/cache/imageapi-tests/`, or `$IMAGEAPI_TEST_CACHE`) under a name keyed by a hash of
everything that defines the image (the recipe below and the source of `_customise`): change any of
it and the next call builds a new file. A build goes to a temporary file that is renamed into place
only when complete, under an exclusive `flock` on a lock file, so concurrent test processes build it
once and never see half a file. Stale images of older recipes are left in the cache directory.

This module does not import pytest: `bench/` uses it too. Building needs root; `debootstrap` is
installed with apt-get when it is missing.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import inspect
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

DEFAULT_CACHE_DIR = Path("/var/cache/imageapi-tests")
CACHE_ENV = "IMAGEAPI_TEST_CACHE"
FALLBACK_MIRROR = "http://deb.debian.org/debian"

SUITE = "bookworm"
VARIANT = "minbase"
INCLUDE = ("systemd", "systemd-sysv", "dbus")
MKSQUASHFS_OPTIONS = ("-comp", "zstd", "-noappend", "-quiet", "-no-progress")
# The hostname containers of this image call themselves, unless the runtime sets another.
HOSTNAME = "imageapi-systemd"


def cache_dir_default() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR)


def apt_mirror(suite: str = SUITE, sources: Path = Path("/etc/apt")) -> str:
    """The URI apt on this machine uses for `suite` main (so debootstrap goes where apt is allowed
    to go), from the deb822 `*.sources` files or the one-line `sources.list` format; falls back to
    deb.debian.org."""
    files = [sources / "sources.list", *sorted((sources / "sources.list.d").glob("*.list"))]
    for path in files:
        with contextlib.suppress(OSError):
            for line in path.read_text().splitlines():
                words = line.split("#", 1)[0].split()
                if words[:1] != ["deb"]:
                    continue
                words = words[1:]
                if words and words[0].startswith("["):  # [option=value ...]
                    while words and not words[0].endswith("]"):
                        words.pop(0)
                    words = words[1:]
                if len(words) >= 3 and words[1] == suite and "main" in words[2:]:
                    return words[0].rstrip("/")
    for path in sorted((sources / "sources.list.d").glob("*.sources")):
        with contextlib.suppress(OSError):
            for stanza in path.read_text().split("\n\n"):
                fields: dict[str, list[str]] = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or ":" not in line or line[:1].isspace():
                        continue
                    key, value = line.split(":", 1)
                    fields[key.strip().lower()] = value.split()
                if (
                    "deb" in fields.get("types", [])
                    and suite in fields.get("suites", [])
                    and "main" in fields.get("components", [])
                    and fields.get("enabled", ["yes"]) != ["no"]
                    and fields.get("uris")
                ):
                    return fields["uris"][0].rstrip("/")
    return FALLBACK_MIRROR


def _architecture() -> str:
    out = subprocess.run(
        ["dpkg", "--print-architecture"], capture_output=True, text=True, check=False
    )
    return out.stdout.strip() or os.uname().machine


# -- the cache ---------------------------------------------------------------------------------


def recipe_key(recipe: dict[str, object], *code: Callable[..., object]) -> str:
    """A short hash of a recipe and of the source of the functions that carry it out."""
    h = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode())
    for fn in code:
        h.update(inspect.getsource(fn).encode())
    return h.hexdigest()[:16]


def cached_build(cache_dir: Path, name: str, build: Callable[[Path], None]) -> Path:
    """`cache_dir/name`, built by `build(tmp_file)` if it is not there yet.

    `build` writes the whole result to the path it is given (a temporary file in `cache_dir`,
    which is then renamed to `name`). An exclusive flock on `cache_dir/name.lock` makes
    concurrent callers, in any process, wait for the one that builds."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / name
    if target.is_file():
        return target
    with open(cache_dir / f"{name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        if target.is_file():  # someone else built it while we waited
            return target
        fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=cache_dir)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            build(tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            tmp.chmod(0o644)
            tmp.replace(target)
        finally:
            tmp.unlink(missing_ok=True)
        return target


# -- the systemd image -------------------------------------------------------------------------


def systemd_recipe() -> dict[str, object]:
    return {
        "suite": SUITE,
        "variant": VARIANT,
        "include": list(INCLUDE),
        "mirror": apt_mirror(),
        "arch": _architecture(),
        "mksquashfs": list(MKSQUASHFS_OPTIONS),
        "hostname": HOSTNAME,
    }


def systemd_image(cache_dir: Path | None = None) -> Path:
    """A squashfs file of a minimal Debian bookworm with systemd, systemd-sysv and dbus; built
    (as root, minutes) on the first call on a machine, then returned from the cache."""
    cache = cache_dir if cache_dir is not None else cache_dir_default()
    recipe = systemd_recipe()
    name = f"debian-{SUITE}-systemd-{recipe_key(recipe, _customise)}.sqsh"
    return cached_build(cache, name, lambda out: _build_systemd(recipe, cache, out))


def ensure_debootstrap() -> None:
    if shutil.which("debootstrap", path=_SBIN_PATH):
        return
    if shutil.which("apt-get") is None:
        raise RuntimeError("debootstrap is missing and there is no apt-get to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "debootstrap"],
        check=True, env=env, stdout=subprocess.DEVNULL,
    )  # fmt: skip


_SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _build_systemd(recipe: dict[str, object], cache: Path, out: Path) -> None:
    if os.geteuid() != 0:
        raise PermissionError("building the systemd image needs root (debootstrap, mknod)")
    ensure_debootstrap()
    env = {"PATH": _SBIN_PATH, "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive",
           "HOME": "/root"}  # fmt: skip
    # The tree is built next to the cache (same disk, not a tmpfs), and removed afterwards.
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=cache))
    root = work / "root"
    log = work / "debootstrap.log"
    try:
        cmd = [
            "debootstrap", f"--variant={recipe['variant']}",
            "--include=" + ",".join(recipe["include"]),  # type: ignore[arg-type]
            f"--arch={recipe['arch']}", str(recipe["suite"]), str(root), str(recipe["mirror"]),
        ]  # fmt: skip
        with open(log, "wb") as f:
            done = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, check=False)
        if done.returncode != 0:
            tail = log.read_text(errors="replace")[-4000:]
            raise RuntimeError(f"debootstrap failed ({done.returncode}):\n{tail}")
        _customise(root)
        # mksquashfs warns that it cannot store the POSIX ACLs systemd-tmpfiles put on
        # /var/log/journal ("Unrecognised xattr prefix system.posix_acl_*"): harmless, so its
        # output is shown only when it fails.
        squashed = subprocess.run(
            ["mksquashfs", str(root), str(out), *MKSQUASHFS_OPTIONS], env=env,
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if squashed.returncode != 0:
            raise RuntimeError(f"mksquashfs failed ({squashed.returncode}):\n"
                               + (squashed.stdout + squashed.stderr)[-4000:])
    finally:
        _remove_tree(work)


def _customise(root: Path) -> None:
    """What a container boot needs beyond debootstrap's result, and no more.

    - /etc/machine-id empty: the image is shared by every container made from it, so it must
      not carry one identity. systemd treats an empty file as "not yet initialised": at boot it
      takes the id from the `container_uuid` environment variable of PID 1 if the runtime sets
      one ("Initializing machine ID from container UUID"), or makes a random one, and writes it
      to the file if / is writable (the overlay) or mounts it over the file if not; it is a
      first boot (`ConditionFirstBoot=` units run; none in this image waits for input).
      /var/lib/dbus/machine-id, if debootstrap's dbus made one, goes too (dbus then reads
      /etc/machine-id).
    - /etc/hostname and /etc/resolv.conf are copied from the build host by debootstrap; a fixed
      hostname replaces the first and the second is emptied, so no trace of the build host
      remains and the image does not depend on where it was built.
    - apt's package cache and lists, and debootstrap's log, are removed (they only make the
      image bigger).
    No unit is masked: whatever does not work in a container is for the runtime to provide.
    (Checked: with this image, `systemd-nspawn -b` and a bare runtime — unshare of mount, pid,
    uts, ipc and cgroup namespaces, then /proc, read-only /sys, cgroup2 on /sys/fs/cgroup, a tmpfs
    /dev with the basic nodes, devpts, /dev/shm, /dev/mqueue, tmpfs /run and /tmp, a pty bound
    on /dev/console, env `container=`, exec /sbin/init — both reach `running` with no failed
    unit.)
    """
    (root / "etc/machine-id").write_text("")
    (root / "var/lib/dbus/machine-id").unlink(missing_ok=True)
    for name, text in (("etc/hostname", HOSTNAME + "\n"), ("etc/resolv.conf", "")):
        path = root / name
        path.unlink(missing_ok=True)  # the copies keep the host's mode (0755 here)
        path.write_text(text)
        path.chmod(0o644)
    for pattern in ("var/cache/apt/*.bin", "var/cache/apt/archives/*.deb", "var/lib/apt/lists/*"):
        for path in root.glob(pattern):
            if path.is_file() and not path.is_symlink():
                path.unlink()
    (root / "var/log/bootstrap.log").unlink(missing_ok=True)


# -- careful removal ---------------------------------------------------------------------------


def mounts_under(path: Path) -> list[str]:
    """Mountpoints at or below `path`, deepest first (debootstrap mounts /proc and /sys in its
    target and may leave them behind when it fails)."""
    prefix = str(path.resolve())
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return sorted(found, key=len, reverse=True)


def _remove_tree(path: Path) -> None:
    if not path.exists():
        return
    for point in mounts_under(path):
        subprocess.run(["umount", "--lazy", point], check=False)
    left = mounts_under(path)
    if left:  # never let rmtree walk into a mounted /proc or /sys
        raise RuntimeError(f"not removing {path}: still mounted: {left}")
    shutil.rmtree(path)


@contextlib.contextmanager
def mounted_squashfs(image: Path, where: Path) -> Iterator[Path]:
    """`image` mounted read-only on `where` (a loop device set up by mount, with autoclear, so
    unmounting frees it too)."""
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "squashfs", "-o", "loop,ro", str(image), str(where)], check=True
    )
    try:
        yield where
    finally:
        for _ in range(50):
            if subprocess.run(["umount", str(where)], check=False).returncode == 0:
                break
            time.sleep(0.1)  # EBUSY right after a process in it exited
        else:
            subprocess.run(["umount", "--lazy", str(where)], check=False)
