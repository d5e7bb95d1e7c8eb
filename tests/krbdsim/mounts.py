"""Reading /proc/self/mountinfo."""

from __future__ import annotations

import os


def unescape_mountinfo(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as \\ooo (octal)."""
    out = []
    i = 0
    while i < len(field):
        code = field[i + 1 : i + 4]
        if field[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_points(fstype_prefix: str = "") -> list[str]:
    """Mount points whose filesystem type starts with `fstype_prefix`."""
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            fstype = fields[fields.index("-") + 1]
            if fstype.startswith(fstype_prefix):
                points.append(unescape_mountinfo(fields[4]))
    return points


def is_mounted(mountpoint: str | os.PathLike[str], fstype_prefix: str = "fuse") -> bool:
    return os.path.realpath(mountpoint) in mount_points(fstype_prefix)
