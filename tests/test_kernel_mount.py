"""The kernel layer's mount helpers on their own: `is_mountpoint` against mountinfo."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from imageapi.kernel import mount as km
from tests.conftest import need_privileges


@pytest.fixture
def mounts(tmp_path: Path) -> Iterator[Path]:
    """tmp/fs (a tmpfs), tmp/fs/bound (a bind mount of a directory of that same tmpfs, which
    st_dev comparisons cannot tell from a plain directory) and a symlink to the tmpfs."""
    need_privileges()
    fs = tmp_path / "fs"
    fs.mkdir()
    km.mount("tmpfs", str(fs), "tmpfs", 0, "size=1m")
    try:
        (fs / "plain").mkdir()
        (fs / "source").mkdir()
        (fs / "bound").mkdir()
        km.mount(str(fs / "source"), str(fs / "bound"), None, km.MS_BIND)
        (tmp_path / "link").symlink_to(fs)
        yield tmp_path
    finally:
        km.umount(str(fs), km.MNT_DETACH)
    assert not [m for m in km.mountinfo() if m.mountpoint.startswith(str(tmp_path))]


@pytest.mark.parametrize("how", ["statx", "mountinfo fallback"])
def test_is_mountpoint_agrees_with_mountinfo(
    mounts: Path, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if how != "statx":
        monkeypatch.setattr(km, "_statx", None)  # as on a libc without statx
    fs = mounts / "fs"
    expected = {
        fs: True, fs / "bound": True, mounts / "link": True, Path("/"): True,
        fs / "plain": False, fs / "source": False, mounts: False,
        mounts / "missing": False, fs / "plain" / "missing" / "deeper": False,
    }  # fmt: skip
    table = {m.mountpoint for m in km.mountinfo()}
    for path, answer in expected.items():
        assert km.is_mountpoint(str(path)) is answer, path
        assert (os.path.realpath(path) in table) is answer, path  # the expectation is right
