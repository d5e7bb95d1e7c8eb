"""The cached systemd image of tests/images.py: its contents, that it mounts, that it is built
once."""

from __future__ import annotations

import os
import stat
import struct
import threading
import time
from pathlib import Path

import pytest

from tests import hostview
from tests.images import (
    HOSTNAME,
    apt_mirror,
    cached_build,
    mounted_squashfs,
    recipe_key,
    systemd_image,
)

SQUASHFS_MAGIC = b"hsqs"
ZSTD_COMPRESSION = 6  # squashfs superblock compression id


def test_systemd_image_is_a_zstd_squashfs(systemd_squashfs: Path) -> None:
    with open(systemd_squashfs, "rb") as f:
        superblock = f.read(96)
    assert superblock[:4] == SQUASHFS_MAGIC
    (compression,) = struct.unpack_from("<H", superblock, 20)
    assert compression == ZSTD_COMPRESSION
    assert systemd_squashfs.stat().st_size > 10 * 2**20  # a whole system, not a stub


def test_systemd_image_mounts_and_holds_a_bootable_systemd(
    systemd_squashfs: Path, tmp_path: Path
) -> None:
    mnt = tmp_path / "mnt"
    loops_before = hostview.loop_devices()
    with mounted_squashfs(systemd_squashfs, mnt) as root:
        assert (str(root), "squashfs") in {(m, t) for m, t, _ in hostview.mounts()}
        for path in ("usr/lib/systemd/systemd", "usr/bin/systemctl"):
            mode = (root / path).lstat().st_mode
            assert stat.S_ISREG(mode) and mode & 0o111, f"{path} is not an executable file"
        assert any((root / "usr/bin" / d).is_file() for d in ("dbus-daemon", "dbus-broker"))
        # systemd-sysv: /sbin/init is systemd (usr-merged: /sbin -> usr/sbin).
        assert os.readlink(root / "usr/sbin/init") in ("/lib/systemd/systemd",
                                                         "/usr/lib/systemd/systemd")
        os_release = (root / "usr/lib/os-release").read_text()
        assert "VERSION_CODENAME=bookworm" in os_release
        # The documented customisation.
        assert (root / "etc/machine-id").read_bytes() == b""
        assert not (root / "var/lib/dbus/machine-id").exists()
        assert (root / "etc/hostname").read_text() == HOSTNAME + "\n"
        assert list((root / "var/cache/apt/archives").glob("*.deb")) == []
        assert [p for p in (root / "var/lib/apt/lists").iterdir() if p.is_file()] == []
    assert str(mnt) not in {m for m, _, _ in hostview.mounts()}
    assert hostview.loop_devices() == loops_before, "mount -o loop left a loop device"


def test_second_call_returns_the_cached_file(systemd_squashfs: Path) -> None:
    before = systemd_squashfs.stat()
    start = time.monotonic()
    again = systemd_image()
    elapsed = time.monotonic() - start
    assert again == systemd_squashfs
    after = again.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert elapsed < 2.0, f"the cached image took {elapsed:.1f} s: was it rebuilt?"
    leftovers = [p.name for p in again.parent.iterdir()
                 if p.name.startswith(".") and (p.name.endswith(".tmp") or ".build-" in p.name)]
    assert leftovers == [], "a build left temporary files in the cache"


# -- the cache mechanics, with a toy build (no root, no network) ----------------------------------


def test_concurrent_callers_build_once(tmp_path: Path) -> None:
    builds = []

    def slow_build(out: Path) -> None:
        builds.append(out)
        time.sleep(0.3)
        out.write_bytes(b"x" * 4096)

    results: list[Path] = []
    # Each thread opens the lock file itself: flock locks belong to the open file description,
    # so threads exclude each other exactly as processes do.
    threads = [
        threading.Thread(target=lambda: results.append(cached_build(tmp_path, "toy", slow_build)))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1
    assert results == [tmp_path / "toy"] * 4
    assert (tmp_path / "toy").read_bytes() == b"x" * 4096
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy", "toy.lock"]


def test_failed_build_leaves_nothing_and_is_retried(tmp_path: Path) -> None:
    def broken(out: Path) -> None:
        out.write_bytes(b"half")
        raise RuntimeError("mirror unreachable")

    with pytest.raises(RuntimeError, match="mirror unreachable"):
        cached_build(tmp_path, "toy", broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy.lock"]
    built = cached_build(tmp_path, "toy", lambda out: out.write_bytes(b"whole"))
    assert built.read_bytes() == b"whole"


def test_recipe_key_changes_with_the_recipe() -> None:
    base = {"suite": "bookworm", "include": ["systemd"]}
    assert recipe_key(base) == recipe_key(dict(reversed(base.items())))
    assert recipe_key(base) != recipe_key({**base, "include": ["systemd", "dbus"]})
    assert recipe_key(base) != recipe_key(base, test_recipe_key_changes_with_the_recipe)


def test_apt_mirror_reads_both_source_formats(tmp_path: Path) -> None:
    deb822 = tmp_path / "deb822"
    (deb822 / "sources.list.d").mkdir(parents=True)
    (deb822 / "sources.list.d/debian.sources").write_text(
        "Types: deb\n# a comment\nURIs: http://mirror.example/debian/\n"
        "Suites: bookworm bookworm-updates\nComponents: main\n\n"
        "Types: deb\nURIs: http://security.example/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n"
    )
    assert apt_mirror("bookworm", deb822) == "http://mirror.example/debian"

    oneline = tmp_path / "oneline"
    (oneline / "sources.list.d").mkdir(parents=True)
    (oneline / "sources.list").write_text(
        "deb [arch=amd64 signed-by=/k.gpg] http://one.example/debian bookworm main contrib\n"
    )
    assert apt_mirror("bookworm", oneline) == "http://one.example/debian"
    assert apt_mirror("trixie", oneline) == "http://deb.debian.org/debian"
