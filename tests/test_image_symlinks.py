"""An image's symlinks never steer the daemon's own writes or mounts onto the host (issue 10).

Each image here is the test image with one of its top-level directories replaced by a symlink
to a directory of the host (absolute, or by `..` escapes), built into a squashfs and run
through a real server: a loop device, its mount, an overlay, a container. What the daemon and
the container's init make or mount lands inside the image, where the image itself sees the
link's target after pivot_root — or the request is a clear 400 that changes nothing. The
host's directories are compared, file by file, before and after.
"""

from __future__ import annotations

import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import hostview
from tests.conftest import Stack, build_squashfs

# A systemd container is stopped by SIGRTMIN+3; busybox's trap takes only its number.
SYSTEMD_LIKE = (f"/bin/sh -c 'trap \"exit 0\" TERM {int(signal.SIGRTMIN) + 3}; "
                "sleep 1000 & wait'")
ESCAPE = "../" * 24  # more than any depth: the host's lookup would reach its `/`


@pytest.fixture
def host_dir() -> Iterator[Path]:
    """A fresh directory of the host, named by the images' symlinks; it must not change. Not
    under /tmp, /run or /var: inside the image those are the container's own tmpfs (or the
    link itself), which would hide where things are made."""
    base = next(d for d in ("/srv", "/mnt", "/opt") if Path(d).is_dir())
    host = Path(tempfile.mkdtemp(prefix="imageapi-test-", dir=base))
    try:
        for sub in ("run", "tmp", "var"):
            (host / sub).mkdir()
            (host / sub / "keep").write_text("host data\n")
        before = snapshot(host)
        yield host
        assert snapshot(host) == before, "the host directory changed"
        assert not [m for m in hostview.mounts() if m[0].startswith(str(host))]
    finally:
        shutil.rmtree(host)


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() if p.is_file() else "dir"
            for p in root.rglob("*")}


def in_image(path: Path | str) -> str:
    """`path` of the host, as a path inside the image (no leading slash)."""
    return str(path).lstrip("/")


def build_image(image_tree: Path, out: Path, links: dict[str, str],
                dirs: tuple[str, ...] = ()) -> Path:
    """The test image with each `links` name (a top-level directory) made a symlink."""
    tree = out / "tree"
    shutil.copytree(image_tree, tree, symlinks=True)
    for name, target in links.items():
        if (tree / name).is_dir():
            shutil.rmtree(tree / name)
        (tree / name).symlink_to(target)
    for d in dirs:
        (tree / d).mkdir(parents=True)
    return build_squashfs(tree, out / "image.sqsh")


def squashfs_mount(image: Path) -> dict[str, Any]:
    return {"kind": "loopback", "loopback": {"fs_type": "squashfs", "mount_options": ["ro"],
                                             "loopback": {"path": str(image)}}}


def overlay_mount(image: Path) -> dict[str, Any]:
    return {"kind": "overlay", "overlay": {"lower": [squashfs_mount(image)]}}


def container_mounts(pid: int) -> set[tuple[str, str]]:
    """(mountpoint inside the container, fstype) of the container's mounts."""
    out = set()
    with open(f"/proc/{pid}/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            out.add((left.split()[4], right.split()[0]))
    return out


def refused(stack: Stack, mount: dict[str, Any], systemd: bool) -> str:
    """POST /container must be a 400 that leaves no container, mount or log behind."""
    api = stack.api
    logs_before = hostview.tree(stack.server.run_dir / "logs")
    reply = api.request("POST", "/container", 400, json={
        "mount": mount, "command": SYSTEMD_LIKE, "systemd": systemd, "state": "running",
    }).json()
    assert api.get("/container") == [] and api.get("/mount") == []
    assert api.get("/attach/loopback") == []
    assert hostview.tree(stack.server.run_dir / "logs") == logs_before, "a log file was made"
    return reply["message"]


def probing(paths: tuple[str, ...]) -> str:
    """A systemd-like entrypoint that writes into each of `paths` and logs its filesystem."""
    probes = "; ".join(f'touch {p}/written; echo "fs {p} $(stat -f -c %T {p}/)"' for p in paths)
    return SYSTEMD_LIKE.replace("; sleep", f"; {probes}; sleep")


def run_and_delete(stack: Stack, mount: dict[str, Any], probes: tuple[str, ...],
                   expect: set[tuple[str, str]], made: tuple[str, ...] = ()) -> None:
    """Run a systemd container on `mount`: each of `probes` is a tmpfs as the container sees
    it, its mounts include `expect` (as mountinfo shows them) and each of `made` (a path in
    the image) is a directory of the overlay's upper layer; then delete it."""
    api = stack.api
    c = api.post("/container", {"mount": mount, "command": probing(probes), "systemd": True,
                                "state": "running"})
    log = Path(c["logfile"])
    try:
        assert c["state"] == "running", c
        mounts = container_mounts(c["pid"])
        assert expect <= mounts, f"missing {expect - mounts} in {sorted(mounts)}"
        for path in made:
            assert (Path(c["mount"]["overlay"]["upperdir"]) / path.lstrip("/")).is_dir(), path
        deadline = time.monotonic() + 20
        while not all(f"fs {p} " in log.read_text() for p in probes):
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        for p in probes:
            assert f"fs {p} tmpfs\n" in log.read_text(), log.read_text()
    finally:
        gone = api.delete(f"/container/{c['id']}")
    assert gone["state"] == "exited", log.read_text()
    assert api.get("/mount") == [] and api.get("/attach/loopback") == []


# -- the daemon and the init follow the image's symlinks inside the image --------------------


@pytest.mark.parametrize("how", ["absolute", "relative"])
def test_symlinked_var_gets_its_journal_inside_the_image(
    stack: Stack, image_tree: Path, tmp_path: Path, host_dir: Path, how: str
) -> None:
    """`/var -> <host dir>`: /var/lib/journal is made and mounted at <host dir>/lib/journal
    inside the image (in the overlay), never on the host."""
    host = in_image(host_dir)
    image = build_image(image_tree, tmp_path, {"var": f"/{host}" if how == "absolute"
                                               else ESCAPE + host})
    run_and_delete(stack, overlay_mount(image), ("/var/lib/journal",),
                   {(f"/{host}/lib/journal", "tmpfs")}, made=(f"/{host}/lib/journal",))


@pytest.mark.parametrize("how", ["absolute", "relative"])
def test_symlinked_run_and_tmp_get_their_tmpfs_inside_the_image(
    stack: Stack, image_tree: Path, tmp_path: Path, host_dir: Path, how: str
) -> None:
    """`/run` and `/tmp` link to <host dir>/run and /tmp, which exist on the host: each tmpfs
    goes on the link's target inside the image, made there in the overlay."""
    host = in_image(host_dir)
    prefix = "/" if how == "absolute" else ESCAPE
    image = build_image(image_tree, tmp_path, {"run": f"{prefix}{host}/run",
                                               "tmp": f"{prefix}{host}/tmp"})
    run_and_delete(stack, overlay_mount(image), ("/run", "/tmp"),
                   {(f"/{host}/run", "tmpfs"), (f"/{host}/tmp", "tmpfs")},
                   made=(f"/{host}/run", f"/{host}/tmp"))


def test_symlink_to_a_directory_of_a_read_only_image_is_mounted_on(
    stack: Stack, image_tree: Path, tmp_path: Path, host_dir: Path
) -> None:
    """A bare squashfs whose `/var` leads to a directory that has lib/journal inside the
    image: the tmpfs goes there, nothing needs making."""
    host = in_image(host_dir)
    image = build_image(image_tree, tmp_path, {"var": f"/{host}"}, dirs=(f"{host}/lib/journal",))
    run_and_delete(stack, squashfs_mount(image), ("/var/lib/journal",),
                   {(f"/{host}/lib/journal", "tmpfs")})


# -- what cannot work is a clear 400 at create, whatever the mount ---------------------------


@pytest.mark.parametrize("kind", ["squashfs", "overlay"])
@pytest.mark.parametrize(("name", "how"), [
    ("dev", "absolute"), ("dev", "relative"), ("dev", "in-image"),
    ("proc", "absolute"), ("proc", "relative"), ("proc", "in-image"),
    ("sys", "absolute"),
])
def test_symlinked_kernel_mountpoint_is_refused_alike(
    stack: Stack, image_tree: Path, tmp_path: Path, host_dir: Path, name: str, how: str,
    kind: str,
) -> None:
    """`/dev` or `/proc` a symlink: the same 400 on a bare squashfs and on an overlay."""
    target = {"absolute": f"/{in_image(host_dir)}", "relative": ESCAPE + in_image(host_dir),
              "in-image": "/etc"}[how]
    image = build_image(image_tree, tmp_path, {name: target})
    mount = squashfs_mount(image) if kind == "squashfs" else overlay_mount(image)
    message = refused(stack, mount, systemd=False)
    assert message == (f"/{name} in the image is a symlink (to {target}); it must be a "
                       f"directory, on which the container gets the kernel's /{name}")


@pytest.mark.parametrize(("links", "says"), [
    # Through the host's /proc this is the host's own root: the daemon must not go there.
    pytest.param({"var": "/proc/self/root{host}"},
                 "/var/lib/journal in the image leads to /proc/self/root{host}/lib/journal, "
                 "under /proc, which the container gets from the kernel", id="var-into-proc"),
    pytest.param({"run": "/dev/shm"},
                 "/run in the image leads to /dev/shm, under /dev, which the container gets "
                 "from the kernel", id="run-into-dev"),
    pytest.param({"tmp": ESCAPE}, "/tmp in the image leads to the image's root itself",
                 id="tmp-to-root"),
    pytest.param({"var": "/var"}, "/var/lib/journal in the image cannot be resolved: Too many "
                 "levels of symbolic links", id="var-loop"),
    pytest.param({"var": "/etc/os-release"}, "/var/lib/journal in the image cannot be "
                 "resolved: Not a directory (/etc/os-release)", id="var-to-a-file"),
])
def test_systemd_mountpoint_leading_nowhere_sane_is_refused(
    stack: Stack, image_tree: Path, tmp_path: Path, host_dir: Path, links: dict[str, str],
    says: str,
) -> None:
    links = {k: v.format(host=host_dir) for k, v in links.items()}
    image = build_image(image_tree, tmp_path, links)
    assert refused(stack, overlay_mount(image), systemd=True) == says.format(host=host_dir)


@pytest.mark.parametrize("how", ["absolute", "relative"])
def test_read_only_image_says_where_its_symlink_leads(
    stack: Stack, image_tree: Path, tmp_path: Path, host_dir: Path, how: str
) -> None:
    """A bare squashfs cannot get /var/lib/journal made: the 400 names the in-image target."""
    target = f"/{in_image(host_dir)}" if how == "absolute" else ESCAPE + in_image(host_dir)
    image = build_image(image_tree, tmp_path, {"var": target})
    assert refused(stack, squashfs_mount(image), systemd=True) == (
        f"the image has no /var/lib/journal (its symlinks lead to /{in_image(host_dir)}/lib/"
        "journal) and is read-only, so it cannot be made; run the container on an overlay "
        "of it"
    )
