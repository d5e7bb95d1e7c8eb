"""The kernel rbd driver's sysfs interface (Documentation/ABI/testing/sysfs-bus-rbd).

Mapping is one write() of "<mon_addrs> <options> <pool> <image> [<snap>]" to
`add_single_major` (or `add` on kernels without single-major support); the kernel answers
through write()'s errno. Unmapping writes "<dev_id>" or "<dev_id> force" to
`remove_single_major` / `remove`. Each mapped device shows up as `devices/<dev_id>/`.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

# The attributes that identify which image a device maps.
IDENTITY_ATTRS = ("pool", "pool_ns", "name", "current_snap")


class KrbdUnavailable(OSError):
    """Neither control file exists: the rbd module is not loaded (or the path is wrong)."""

    def __init__(self, sysfs: Path) -> None:
        super().__init__(errno.ENODEV, "the kernel's rbd driver is not loaded", str(sysfs))


class Krbd:
    def __init__(self, sysfs: Path) -> None:
        self.sysfs = sysfs

    def _write_control(self, stem: str, text: str) -> None:
        """One write() to `<stem>_single_major`, or to `<stem>` where that does not exist.

        With single-major on, the plain files answer EINVAL, so the fallback is taken only when
        the single-major file is absent, not when it fails.
        """
        path = self.sysfs / f"{stem}_single_major"
        try:
            fd = os.open(path, os.O_WRONLY)
        except FileNotFoundError:
            path = self.sysfs / stem
            try:
                fd = os.open(path, os.O_WRONLY)
            except FileNotFoundError:
                raise KrbdUnavailable(self.sysfs) from None
        try:
            data = text.encode()
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(errno.EIO, f"short write ({written} of {len(data)} bytes)", str(path))
        except OSError as exc:
            if exc.filename is None:
                raise OSError(exc.errno, exc.strerror, str(path)) from None
            raise
        finally:
            os.close(fd)

    def add(self, request: str) -> None:
        self._write_control("add", request)

    def remove(self, dev_id: int, force: bool = False) -> None:
        self._write_control("remove", f"{dev_id} force" if force else str(dev_id))

    def device_ids(self) -> set[int]:
        try:
            names = os.listdir(self.sysfs / "devices")
        except FileNotFoundError:
            return set()
        return {int(n) for n in names if n.isdigit()}

    def attr(self, dev_id: int, name: str) -> str:
        return (self.sysfs / "devices" / str(dev_id) / name).read_text().rstrip("\n")

    def identity(self, dev_id: int) -> dict[str, str] | None:
        """The device's pool/pool_ns/name/current_snap, or None if it vanished meanwhile."""
        found: dict[str, str] = {}
        for name in IDENTITY_ATTRS:
            try:
                found[name] = self.attr(dev_id, name)
            except FileNotFoundError:
                if name != "pool_ns" or not (self.sysfs / "devices" / str(dev_id)).is_dir():
                    return None
                found[name] = ""  # kernels before 4.20 have no namespaces
        return found
