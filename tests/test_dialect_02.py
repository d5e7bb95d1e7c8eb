"""The Image API 0.2 dialect beside v1, on one object graph, through a real server.

Kraken's two clients as they are (their requests, their success statuses, their responses
decoded as their generated Go models decode them: `tests.gomodels`), every 0.2 operation's
success and refusals (a refusal changes nothing: the `stack` fixture compares the registry,
the mounts, the loop devices and the simulator before and after), objects made through one
dialect used through the other, `local` and `loopback`-in-a-mount attachments, `force`, and
reads that never wait behind slow deletes.
"""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import hostview
from tests.conftest import Stack, build_squashfs
from tests.gomodels import decode_01, decode_02

# Ends 0.5 s after SIGTERM: a stop request is seen `stopping` first, then `exited`.
SLOW_STOP = "/bin/sh -c \"trap 'sleep 0.5; exit 0' TERM; while :; do sleep 0.1; done\""
# Ignores SIGTERM: only the stop timeout's (or a forced delete's) SIGKILL ends it.
DEAF = "/bin/sh -c \"trap '' TERM; while :; do sleep 0.1; done\""
SQUASHFS_RO = {"fs_type": "squashfs", "mount_options": ["ro"]}


def wait_trapped(pid: int, timeout: float = 10) -> None:
    """Until the process has its SIGTERM handler: a stop sent sooner (the shell still
    starting) is ignored, as by any PID 1 without a handler, and ends in SIGKILL."""
    deadline = time.monotonic() + timeout
    while True:
        status = Path(f"/proc/{pid}/status").read_text()
        caught = int(status.split("SigCgt:", 1)[1].split()[0], 16)
        if caught & (1 << (15 - 1)):
            return
        assert time.monotonic() < deadline, f"{pid} never trapped SIGTERM"
        time.sleep(0.01)


def mounted(path: str) -> str | None:
    for mountpoint, fstype, _source in hostview.mounts():
        if mountpoint == os.path.realpath(path):
            return fstype
    return None


class Kraken02:
    """What today's Kraken (the 0.2.0 Go client) sends, and what it accepts as success."""

    def __init__(self, stack: Stack) -> None:
        self.http = stack.api.http

    def _ok(self, response: httpx.Response, status: int) -> Any:
        if response.status_code != status:
            error = decode_02("error", response.json())
            raise AssertionError(f"{response.status_code}: {error['message']}")
        return response.json()

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        return decode_02("container", self._ok(self.http.post("/container", json=body), 201))

    def containers(self) -> list[dict[str, Any]]:
        return decode_02(["container"], self._ok(self.http.get("/container"), 200))

    def stop(self, name: str) -> dict[str, Any]:
        answer = self.http.patch("/container", params={"name": name, "state": "exited"})
        return decode_02("container", self._ok(answer, 200))

    def delete(self, name: str) -> dict[str, Any]:
        answer = self.http.delete("/container", params={"name": name})
        return decode_02("container", self._ok(answer, 200))

    def wait(self, name: str, state: str, timeout: float = 20) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:  # Kraken polls the list once a second; a test need not be so patient
            found = [c for c in self.containers() if c["name"] == name]
            if found and found[0]["state"] == state:
                return found[0]
            assert time.monotonic() < deadline, f"{name}: {found} never {state}"
            time.sleep(0.05)


def rbd_02(stack: Stack) -> dict[str, Any]:
    spec = stack.rbd_spec()
    return {"image": spec["image"], "monitors": spec["monitors"], "options": spec["options"],
            "pool": spec["pool"]}


def kraken_body(stack: Stack, name: str, shape: str) -> dict[str, Any]:
    """Kraken 0.2's POST /container, with the lower in 0.2's shape or v1's."""
    if shape == "0.2":
        lower = {"kind": "attach", "attach": {**SQUASHFS_RO,
                                              "attach": {"kind": "rbd", "rbd": rbd_02(stack)}}}
    else:
        lower = {"kind": "rbd", "rbd": {**SQUASHFS_RO, "rbd": stack.rbd_spec()}}
    return {"command": SLOW_STOP, "mount": {"kind": "overlay", "overlay": {"lower": [lower]}},
            "name": name, "namespaces": None, "state": "running"}


def nothing_left(stack: Stack) -> None:
    api = stack.api
    assert api.get("/container") == [] and api.get("/mount") == [] and api.get("/attach") == []
    assert stack.sim.mapped() == []
    assert hostview.tree(stack.server.run_dir / "mounts") == set()


@pytest.mark.parametrize("shape", ["0.2", "v1"])
def test_kraken_0_2_flow(stack: Stack, shape: str) -> None:
    kraken = Kraken02(stack)
    made = kraken.create(kraken_body(stack, f"k02-{shape}", shape))
    assert made["state"] == "running" and made["id"] > 0
    top = made["mount"]
    assert top["kind"] == "overlay" and top["id"] > 0 and top["refs"] == 1
    assert mounted(top["mountpoint"]) == "overlay"
    (lower,) = top["overlay"]["lower"]
    assert lower["id"] > 0 and mounted(lower["mountpoint"]) == "squashfs"
    # Answered in the request's dialect; the 0.2 model finds its attach member either way.
    assert lower["kind"] == ("attach" if shape == "0.2" else "rbd")
    attach = lower["attach"]["attach"]
    assert attach["kind"] == "rbd" and attach["id"] > 0
    assert attach["rbd"]["pool"] == "rbd" and attach["rbd"]["options"]["secret"] == ""
    assert attach["device_file"] and str(attach["rbd"]["device_id"]) in stack.sim.mapped()
    pid = stack.api.get(f"/container/{made['id']}")["pid"]
    assert pid in hostview.descendants(stack.server.proc.pid)
    wait_trapped(pid)

    assert kraken.wait(made["name"], "running")["id"] == made["id"]
    assert kraken.stop(made["name"])["state"] == "stopping"
    kraken.wait(made["name"], "exited")
    gone = kraken.delete(made["name"])
    assert (gone["id"], gone["state"], gone["refs"]) == (made["id"], "exited", 0)
    nothing_left(stack)


def test_kraken_0_1_flow(stack: Stack) -> None:
    """The 0.1-era client: v1's nested `kind: rbd` body, byname GETs for state changes."""
    http = stack.api.http
    body = {"name": "k01", "command": SLOW_STOP, "state": "running", "systemd": False,
            "mount": {"kind": "overlay", "overlay": {"lower": [
                {"kind": "rbd", "rbd": {**SQUASHFS_RO, "rbd": stack.rbd_spec()}}]}}}
    answer = http.post("/container", json=body)
    assert answer.status_code == 201, answer.text
    made = decode_01("container", answer.json())
    wait_trapped(stack.api.get(f"/container/{made['id']}")["pid"])
    (lower,) = made["mount"]["overlay"]["lower"]
    assert (lower["kind"], lower["rbd"]["rbd"]["pool"]) == ("rbd", "rbd")
    assert lower["mount_id"] == lower["rbd"]["id"] and lower["rbd"]["rbd_id"] > 0
    got = decode_01("container", http.get("/container/byname/k01").json())
    assert got["state"] == "running" and got["mount"]["mount_id"] == made["mount"]["mount_id"]
    assert decode_01("container", http.get("/container/byname/k01/exited").json())[
        "state"] == "stopping"
    deadline = time.monotonic() + 20
    while decode_01("container", http.get("/container/byname/k01").json())["state"] != "exited":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    answer = http.delete("/container/byname/k01")
    assert answer.status_code == 200
    assert decode_01("container", answer.json())["state"] == "exited"
    nothing_left(stack)


def test_delete_of_a_running_container_stops_it_first_in_both_dialects(stack: Stack) -> None:
    kraken = Kraken02(stack)
    for dialect in ("0.2", "v1"):
        made = kraken.create(kraken_body(stack, f"run-{dialect}", "0.2"))
        wait_trapped(stack.api.get(f"/container/{made['id']}")["pid"])
        if dialect == "0.2":
            gone = kraken.delete(made["name"])
        else:
            gone = stack.api.delete(f"/container/byname/{made['name']}")
        assert gone["state"] == "exited"
        log = Path(made["logfile"]).read_text()
        assert "stopping container (SIGTERM)" in log and "SIGKILL" not in log
        nothing_left(stack)


# -- /attach ----------------------------------------------------------------------------------


def test_attach_rbd_read_and_delete(stack: Stack) -> None:
    api = stack.api
    made = api.post("/attach", {"kind": "rbd", "rbd": rbd_02(stack)})
    assert made["kind"] == "rbd" and made["refs"] == 1 and "secret" not in made["rbd"]["options"]
    assert str(made["rbd"]["device_id"]) in stack.sim.mapped()
    assert Path(made["device_file"]) == stack.sim.devdir / f"rbd{made['rbd']['device_id']}"
    assert api.get("/attach", params={"id": made["id"]}) == [made]
    assert api.get("/attach", params={"kind": "rbd"}) == [made]
    assert api.get("/attach", params={"kind": "loopback"}) == []
    # The same object through v1.
    v1 = api.get(f"/attach/rbd/{made['id']}")
    assert (v1["device_id"], v1["device_file"]) == (made["rbd"]["device_id"],
                                                    made["device_file"])
    gone = api.delete("/attach", params={"id": made["id"]})
    assert gone["id"] == made["id"] and gone["refs"] == 0 and stack.sim.mapped() == []


@pytest.mark.parametrize(
    ("method", "path", "params", "body", "status", "fragment"),
    [
        ("GET", "/attach", {"id": 999999}, None, 404, "999999"),
        ("GET", "/attach", {"kind": "floppy"}, None, 400, "kind"),
        ("POST", "/attach", None, {"kind": "floppy"}, 400, "kind"),
        ("POST", "/attach", None, {"rbd": {"monitors": ["10.0.0.1"], "pool": "rbd",
                                           "image": "x"}}, 400, "kind"),
        ("POST", "/attach", None, {"kind": "iscsi", "iscsi": {
            "initiator": "iqn.2021-01.test:i", "target": "iqn.2021-01.test:t",
            "host": "127.0.0.1"}}, 501, "iSCSI initiator"),
        ("POST", "/attach", None, {"kind": "loopback", "loopback": {
            "path": "/etc", "base": "root"}}, 400, "not a regular file"),
        ("POST", "/attach", None, {"kind": "local", "local": {"path": "/etc/hostname"}}, 400,
         "not a block device"),
        ("DELETE", "/attach", {"id": 999999}, None, 404, "999999"),
        ("DELETE", "/attach", None, None, 400, "id"),
        ("GET", "/mount", {"id": 999999}, None, 404, "999999"),
        ("GET", "/mount", {"kind": "floppy"}, None, 400, "kind"),
        ("POST", "/mount", None, {"kind": "nfs", "nfs": {"host": "127.0.0.1",
                                                          "path": "/export"}}, 501, "NFS"),
        ("POST", "/mount", None, {"kind": "uri", "uri": {}}, 400, "uri"),
        ("POST", "/mount", None, {"kind": "uri"}, 501, "no server implements"),
        ("POST", "/mount", None, {"kind": "attach", "attach": {
            **SQUASHFS_RO, "attach": {"id": 999999}}}, 404, "999999"),
        ("POST", "/mount", None, {"kind": "bind", "bind": {"path": "etc", "base": "mount"}},
         400, "mount"),
        ("DELETE", "/mount", {"id": 999999}, None, 404, "999999"),
        ("DELETE", "/mount", None, None, 400, "id"),
        ("GET", "/container", {"id": 999999}, None, 404, "999999"),
        ("GET", "/container", {"name": "nobody"}, None, 404, "nobody"),
        ("GET", "/container", {"state": "asleep"}, None, 400, "state"),
        ("PATCH", "/container", {"name": "nobody", "state": "asleep"}, None, 400, "state"),
        ("PATCH", "/container", {"name": "nobody", "state": "paused"}, None, 501, "paus"),
        ("PATCH", "/container", {"state": "exited"}, None, 400, "id or name"),
        ("PATCH", "/container", {"id": 999999, "state": "exited"}, None, 404, "999999"),
        ("PATCH", "/container", {"name": "nobody", "state": "exited"}, None, 404, "nobody"),
        ("DELETE", "/container", None, None, 400, "id or name"),
        ("DELETE", "/container", {"id": 999999}, None, 404, "999999"),
        ("DELETE", "/container", {"name": "nobody"}, None, 404, "nobody"),
    ],
)  # fmt: skip
def test_0_2_bad_requests_change_nothing(
    stack: Stack, method: str, path: str, params: Any, body: Any, status: int, fragment: str
) -> None:
    answer = stack.api.request(method, path, status, params=params, json=body)
    assert fragment in answer.json()["message"], answer.text


def test_a_delete_of_something_in_use_is_a_409_that_changes_nothing(stack: Stack) -> None:
    api = stack.api
    rbd = api.post("/attach", {"kind": "rbd", "rbd": rbd_02(stack)})
    mnt = api.post("/mount", {"kind": "attach", "attach": {**SQUASHFS_RO,
                                                           "attach": {"id": rbd["id"]}}})
    c = api.post("/container", {"command": "/bin/true", "mount": {"kind": "attach",
                                                                  "id": mnt["id"]}})
    before = stack.world()
    for path, ident in (("/attach", rbd["id"]), ("/mount", mnt["id"])):
        for force in (False, True):  # force overrides the system, never the graph
            message = api.request("DELETE", path, 409, params={"id": ident, "force": force})
            assert "in use" in message.json()["message"]
    assert stack.world() == before
    api.delete("/container", params={"id": c["id"]})
    assert api.delete("/mount", params={"id": mnt["id"]})["kind"] == "attach"
    api.delete("/attach", params={"id": rbd["id"]})


def test_cross_dialect_use(stack: Stack) -> None:
    api = stack.api
    # Attached through v1, seen and mounted through 0.2.
    rbd = api.post("/attach/rbd", stack.rbd_spec())
    (seen,) = api.get("/attach", params={"kind": "rbd"})
    assert (seen["id"], seen["kind"], seen["refs"]) == (rbd["id"], "rbd", 1)
    mnt = api.post("/mount", {"kind": "attach", "attach": {**SQUASHFS_RO,
                                                           "attach": {"id": rbd["id"]}}})
    assert mnt["kind"] == "attach" and mnt["id"] == mnt["mount_id"]
    assert mnt["attach"]["attach"]["id"] == rbd["id"] and "rbd" not in mnt["attach"]["attach"]
    assert mounted(mnt["mountpoint"]) == "squashfs"
    # v1 sees the 0.2 mount as an rbd mount, and a v1 overlay takes it by 0.2's reference.
    assert api.get(f"/mount/rbd/{mnt['id']}")["rbd_id"] == rbd["id"]
    ovl = api.post("/mount/overlay", {"lower": [{"kind": "attach", "id": mnt["id"]}]})
    assert ovl["lower"][0]["kind"] == "rbd" and ovl["lower"][0]["id"] == mnt["id"]
    (listed,) = api.get("/mount", params={"kind": "overlay"})
    assert listed["kind"] == "overlay" and listed["overlay"]["lower"][0]["kind"] == "attach"
    api.delete("/attach", params={"id": rbd["id"]}, expect=409)
    # Deleted through the other dialect each.
    api.request("DELETE", "/mount", 200, params={"id": ovl["id"]})
    api.request("DELETE", "/mount", 200, json={"kind": "rbd", "mount_id": mnt["id"]})
    api.delete("/attach", params={"id": rbd["id"]})
    nothing_left(stack)


# -- loopback inside a mount, local devices, binds ---------------------------------------------


@pytest.fixture(scope="module")
def nested_image(image_tree: Path, squashfs_image: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A squashfs that holds another squashfs image file (images/inner.sqsh)."""
    where = tmp_path_factory.mktemp("nested")
    tree = shutil.copytree(image_tree, where / "tree", symlinks=True)
    (tree / "images").mkdir()
    shutil.copyfile(squashfs_image, tree / "images/inner.sqsh")
    # The host has /usr/lib/os-release, the image no /usr/lib: resolved inside the image.
    (tree / "images/escape").symlink_to("/usr/lib")
    return build_squashfs(tree, where / "outer.sqsh")


def test_loopback_with_base_mount_attaches_a_file_inside_another_mount(
    stack: Stack, nested_image: Path
) -> None:
    api = stack.api
    outer = api.post("/attach", {"kind": "loopback", "loopback": {"path": str(nested_image),
                                                                   "base": "root"}})
    assert outer["loopback"] == {"path": str(nested_image), "base": "root",
                                 "readPartitions": False, "ro": True}
    outer_mnt = api.post("/mount", {"kind": "attach", "attach": {
        **SQUASHFS_RO, "attach": {"id": outer["id"]}}})
    inner = api.post("/attach", {"kind": "loopback", "loopback": {
        "path": "images/inner.sqsh", "base": "mount",
        "mount": {"id": outer_mnt["id"], "kind": "attach"}}})
    assert inner["loopback"]["mount"]["id"] == outer_mnt["id"]
    backing = hostview.loop_devices()[Path(inner["device_file"]).name]
    assert backing == os.path.join(os.path.realpath(outer_mnt["mountpoint"]), "images/inner.sqsh")
    # v1 sees the file where the host has it.
    assert api.get(f"/attach/loopback/{inner['id']}")["path"].endswith("/images/inner.sqsh")
    inner_mnt = api.post("/mount", {"kind": "attach", "attach": {
        **SQUASHFS_RO, "attach": {"id": inner["id"]}}})
    assert (Path(inner_mnt["mountpoint"]) / "etc/os-release").is_file()
    assert not (Path(inner_mnt["mountpoint"]) / "images").exists()  # the inner image
    # The outer mount is held by the file attached from it.
    answer = api.request("DELETE", "/mount", 409, params={"id": outer_mnt["id"]})
    assert f"loopback {inner['id']}" in answer.json()["message"]
    # A symlink in the image resolves inside the image, never on the host.
    api.post("/attach", {"kind": "loopback", "loopback": {
        "path": "images/escape/os-release", "base": "mount",
        "mount": {"id": outer_mnt["id"], "kind": "attach"}}}, expect=400)
    for path, ident in (("/mount", inner_mnt["id"]), ("/attach", inner["id"]),
                        ("/mount", outer_mnt["id"]), ("/attach", outer["id"])):
        api.delete(path, params={"id": ident})
    nothing_left(stack)


def test_loopback_in_a_mount_defined_inline_in_one_container(
    stack: Stack, nested_image: Path
) -> None:
    """The whole chain in one request: an overlay on the inner image, attached from a file
    inside the outer image's mount; one DELETE takes it all down, bottom-up."""
    outer = {"kind": "attach", "attach": {**SQUASHFS_RO, "attach": {
        "kind": "loopback", "loopback": {"path": str(nested_image), "base": "root"}}}}
    inner = {"kind": "attach", "attach": {**SQUASHFS_RO, "attach": {
        "kind": "loopback", "loopback": {"path": "/images/inner.sqsh", "base": "mount",
                                         "mount": outer}}}}
    kraken = Kraken02(stack)
    made = kraken.create({"command": SLOW_STOP, "name": "nested", "state": "running",
                          "mount": {"kind": "overlay", "overlay": {"lower": [inner]}}})
    assert len(stack.api.get("/attach")) == 2 and len(stack.api.get("/mount")) == 3
    kraken.delete(made["name"])
    nothing_left(stack)


@pytest.fixture
def outside_loop(squashfs_image: Path) -> Any:
    """A loop device set up outside imageapi (as an admin would): a `local` device."""
    device = subprocess.run(["losetup", "-f", "--show", "-r", str(squashfs_image)],
                            check=True, capture_output=True, text=True).stdout.strip()
    yield device
    subprocess.run(["losetup", "-d", device], check=True)


def test_local_attaches_an_existing_device_and_leaves_it_in_place(
    stack: Stack, outside_loop: str, squashfs_image: Path
) -> None:
    api = stack.api
    local = api.post("/attach", {"kind": "local", "local": {"path": outside_loop}})
    assert local == {"id": local["id"], "kind": "local", "device_file": outside_loop, "refs": 1,
                     "local": {"path": outside_loop}}
    api.post("/attach", {"kind": "local", "local": {"path": outside_loop}}, expect=409)
    mnt = api.post("/mount", {"kind": "attach", "attach": {**SQUASHFS_RO,
                                                           "attach": {"id": local["id"]}}})
    assert mnt["attach"]["attach"]["kind"] == "local"
    sources = {m[2] for m in hostview.mounts() if m[0] == os.path.realpath(mnt["mountpoint"])}
    assert sources == {outside_loop}
    # v1 lists it too, under the one name it has for it; deleted by v1's generic DELETE.
    (v1,) = api.get("/mount")
    assert (v1["kind"], v1["id"]) == ("attach", mnt["id"]) and "attach" in v1
    api.request("DELETE", "/mount", 200, json={"kind": "attach", "mount_id": mnt["id"]})
    api.delete("/attach", params={"id": local["id"], "force": True})
    # Still there, still bound to its file.
    assert hostview.loop_devices()[Path(outside_loop).name] == str(squashfs_image)
    nothing_left(stack)


def test_bind_told_apart_by_shape(stack: Stack, nested_image: Path, tmp_path: Path) -> None:
    api = stack.api
    host_dir = tmp_path / "tree"
    (host_dir / "sub").mkdir(parents=True)
    # v1: no base, read-only by default.
    v1 = api.post("/mount", {"kind": "bind", "bind": {"path": str(host_dir)}})
    assert v1["bind"]["ro"] is True and "base" not in v1["bind"]
    with pytest.raises(OSError):
        (Path(v1["mountpoint"]) / "x").write_text("no")
    # 0.2: base root, read-write by default, recursive takes the mount below along.
    subprocess.run(["mount", "-t", "tmpfs", "imageapi-test", str(host_dir / "sub")], check=True)
    try:
        (host_dir / "sub/seen").write_text("below\n")
        rec = api.post("/mount", {"kind": "bind", "bind": {
            "path": str(host_dir), "base": "root", "recursive": True}})
        assert rec["kind"] == "bind" and rec["bind"]["ro"] is False
        assert rec["bind"]["recursive"] is True and rec["bind"]["base"] == "root"
        (Path(rec["mountpoint"]) / "written").write_text("yes\n")
        assert (host_dir / "written").read_text() == "yes\n"
        assert (Path(rec["mountpoint"]) / "sub/seen").read_text() == "below\n"
        api.delete("/mount", params={"id": rec["id"]})
        assert not [m for m in hostview.mounts() if m[0].startswith(
            os.path.realpath(rec["mountpoint"]))]
    finally:
        subprocess.run(["umount", str(host_dir / "sub")], check=True)
    api.delete("/mount", params={"id": v1["id"]})
    # 0.2: base mount, a directory inside another mount, which it stands on.
    image = api.post("/mount", {"kind": "attach", "attach": {**SQUASHFS_RO, "attach": {
        "kind": "loopback", "loopback": {"path": str(nested_image), "base": "root"}}}})
    etc = api.post("/mount", {"kind": "bind", "bind": {
        "path": "etc", "base": "mount", "mount": {"id": image["id"], "kind": "attach"},
        "ro": True}})
    assert (Path(etc["mountpoint"]) / "os-release").is_file()
    assert etc["bind"]["mount"]["id"] == image["id"]
    api.delete("/mount", params={"id": image["id"]}, expect=409)
    api.delete("/mount", params={"id": etc["id"]})
    api.delete("/mount", params={"id": image["id"]})
    nothing_left(stack)


# -- force ------------------------------------------------------------------------------------


def test_forced_container_delete_kills_at_once(stack: Stack) -> None:
    kraken = Kraken02(stack)
    body = {**kraken_body(stack, "deaf", "0.2"), "command": DEAF}
    made = kraken.create(body)
    gone = stack.api.delete("/container", params={"name": "deaf", "force": True})
    assert gone["state"] == "exited"
    log = Path(made["logfile"]).read_text()
    assert "stopping container (SIGKILL)" in log and "stop timeout" not in log
    nothing_left(stack)


def test_forced_unmount_detaches_a_mount_busy_outside(stack: Stack, tmp_path: Path) -> None:
    api = stack.api
    (tmp_path / "dir").mkdir()
    mnt = api.post("/mount", {"kind": "bind", "bind": {"path": str(tmp_path / "dir"),
                                                        "base": "root"}})
    # A process of the host with its working directory in it keeps it busy.
    busy = subprocess.Popen(["sleep", "60"], cwd=mnt["mountpoint"])
    try:
        before = stack.world()
        answer = api.request("DELETE", "/mount", 409, params={"id": mnt["id"]})
        assert "EBUSY" in answer.json()["message"]
        assert stack.world() == before
        api.delete("/mount", params={"id": mnt["id"], "force": True})
        assert mounted(mnt["mountpoint"]) is None
    finally:
        busy.kill()
        busy.wait()
    nothing_left(stack)


# -- reads never wait behind slow writes ------------------------------------------------------


def test_reads_answer_while_deletes_wait_out_stop_timeouts(stack: Stack) -> None:
    """More deletes than the thread pool has threads, each waiting for a container that
    ignores SIGTERM: a read in the middle answers before any of them has ended."""
    api = stack.api
    n = 45  # the pool has 40
    ovl = api.post("/mount", {"kind": "overlay", "overlay": {"lower": [
        {"kind": "attach", "attach": {**SQUASHFS_RO,
                                      "attach": {"kind": "rbd", "rbd": rbd_02(stack)}}}]}})
    ids = [api.post("/container", {"command": DEAF, "state": "running",
                                   "mount": {"kind": "overlay", "id": ovl["id"]}})["id"]
           for _ in range(n)]
    done: list[int] = []

    def delete(cid: int) -> None:
        with httpx.Client(base_url=str(api.http.base_url), timeout=60) as client:
            assert client.delete("/container", params={"id": cid}).status_code == 200
        done.append(cid)

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(delete, cid) for cid in ids]
        deadline = time.monotonic() + 30
        while len(api.get("/container", params={"state": "stopping"})) < n:
            assert time.monotonic() < deadline and not done
            time.sleep(0.05)
        listed = api.get("/container")
        assert len(listed) == n and not done, "a read waited for the deletes"
        for future in futures:
            future.result()
    api.delete("/mount", params={"id": ovl["id"]})
    nothing_left(stack)


def test_an_explicit_null_body_is_not_a_left_out_one(stack: Stack, tmp_path: Path) -> None:
    mnt = stack.api.post("/mount", {"kind": "bind", "bind": {"path": str(tmp_path),
                                                              "base": "root"}})
    answer = stack.api.request("DELETE", "/mount", 400, params={"id": mnt["id"]},
                               content=b"null", headers={"content-type": "application/json"})
    assert "body" in answer.json()["message"]
    stack.api.delete("/mount", params={"id": mnt["id"]})
