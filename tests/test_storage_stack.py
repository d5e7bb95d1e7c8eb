"""The storage half of the seed walkthrough (steps 3-5 and 9) and the nested shapes of the
main client, against a real server, the krbd simulator and real squashfs/overlay mounts."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from tests import hostview
from tests.apiclient import ref
from tests.conftest import Stack


def mounted(path: str) -> str | None:
    """The fstype mounted exactly at `path`, if any."""
    for mountpoint, fstype, _source in hostview.mounts():
        if mountpoint == path:
            return fstype
    return None


def test_seed_walkthrough_attach_mount_overlay_teardown(stack: Stack) -> None:
    api = stack.api
    # Step 3: attach the image read-only.
    spec = stack.rbd_spec()
    rbd = api.post("/attach/rbd", spec)
    assert rbd["image"] == "systemd.sqsh" and rbd["pool"] == "rbd"
    assert rbd["monitors"] == spec["monitors"]
    assert rbd["options"] == {"ro": True, "name": stack.cluster.key_name}, "secret must not echo"
    assert rbd["id"] >= 1 and rbd["refs"] == 1
    device = Path(rbd["device_file"])
    assert device == stack.sim.devdir / f"rbd{rbd['device_id']}"
    assert stat.S_ISBLK(device.stat().st_mode)
    assert str(rbd["device_id"]) in stack.sim.mapped()
    assert stack.cluster.secret not in stack.server.log_text()

    # Step 4: mount it, with the seed's legacy {"id": N} shape.
    mnt = api.post("/mount/rbd", {"id": rbd["id"], "fs_type": "squashfs", "mount_options": ["ro"]})
    assert mnt["rbd_id"] == rbd["id"] and "rbd" not in mnt
    assert mnt["fs_type"] == "squashfs" and mnt["mount_options"] == ["ro"]
    image_root = Path(mnt["mountpoint"])
    assert image_root.parent == stack.server.run_dir / "mounts"
    assert image_root.name.startswith("mount_")
    assert mounted(str(image_root)) == "squashfs"
    assert (image_root / "etc/os-release").read_text().startswith('NAME="imageapi test image"')
    assert api.get(f"/attach/rbd/{rbd['id']}")["refs"] == 2

    # Step 5: a private read-write overlay over it, with the legacy bare-integer lower.
    ovl = api.post("/mount/overlay", {"lower": [mnt["id"]]})
    assert [ref(x) for x in ovl["lower"]] == [{"kind": "rbd", "mount_id": mnt["id"]}]
    top = Path(ovl["mountpoint"])
    for key, prefix in (("mountpoint", "mount_"), ("upperdir", "upper_"), ("workdir", "work_")):
        assert Path(ovl[key]).name.startswith(prefix)
    assert mounted(str(top)) == "overlay"
    (top / "etc/written-here").write_text("hello\n")
    assert (Path(ovl["upperdir"]) / "etc/written-here").read_text() == "hello\n"
    assert not (image_root / "etc/written-here").exists()
    with pytest.raises(OSError) as err:
        (image_root / "etc/nope").write_text("x")
    assert err.value.errno == errno.EROFS
    assert api.get(f"/mount/rbd/{mnt['id']}")["refs"] == 2

    # Deleting in the wrong order is refused and changes nothing.
    refused = api.delete(f"/mount/rbd/{mnt['id']}", expect=409)
    assert f"overlay mount {ovl['id']}" in refused["message"]
    api.delete(f"/attach/rbd/{rbd['id']}", expect=409)
    assert api.get(f"/mount/rbd/{mnt['id']}")["refs"] == 2
    assert mounted(str(image_root)) == "squashfs"

    # Step 9: tear it all down, top first; each delete returns the deleted object.
    gone = api.delete(f"/mount/overlay/{ovl['id']}")
    assert gone["id"] == ovl["id"] and gone["mountpoint"] == ovl["mountpoint"]
    assert mounted(str(top)) is None
    assert not Path(ovl["upperdir"]).exists() and not Path(ovl["workdir"]).exists()
    assert api.delete(f"/mount/rbd/{mnt['id']}")["id"] == mnt["id"]
    assert not image_root.exists()
    assert api.delete(f"/attach/rbd/{rbd['id']}")["id"] == rbd["id"]
    assert not device.exists()
    api.get(f"/attach/rbd/{rbd['id']}", expect=404)


def nested_overlay(stack: Stack) -> dict:
    """The shape the main client sends: overlay <- rbd mount <- rbd, all inline."""
    return {
        "kind": "overlay",
        "overlay": {
            "lower": [
                {
                    "kind": "rbd",
                    "rbd": {"fs_type": "squashfs", "mount_options": ["ro"],
                            "rbd": stack.rbd_spec()},
                }
            ]
        },
    }


def test_nested_stack_is_built_in_one_call_and_removed_in_one(stack: Stack) -> None:
    api = stack.api
    made = api.post("/mount", nested_overlay(stack))
    assert made["kind"] == "overlay"
    ovl = made["overlay"]
    assert made["mount_id"] == ovl["id"] and ovl["refs"] == 1
    lower = ovl["lower"][0]
    assert lower["kind"] == "rbd"
    inner = lower["rbd"]
    assert inner["id"] == lower["mount_id"] and inner["refs"] == 1
    assert inner["rbd"]["id"] == inner["rbd_id"] and "secret" not in inner["rbd"]["options"]
    # ids come from one counter: built bottom-up.
    assert inner["rbd_id"] < inner["id"] < ovl["id"]
    assert mounted(ovl["mountpoint"]) == "overlay"
    assert mounted(inner["mountpoint"]) == "squashfs"
    assert len(stack.sim.mapped()) == 1

    listed = api.get("/mount")
    assert {(m["kind"], m["mount_id"]) for m in listed} == {
        ("overlay", ovl["id"]), ("rbd", inner["id"])
    }
    # Inline children belong to their owner: they cannot be deleted on their own.
    api.delete(f"/mount/rbd/{inner['id']}", expect=409)
    api.delete(f"/attach/rbd/{inner['rbd_id']}", expect=409)

    gone = api.request("DELETE", "/mount", 200,
                       json={"kind": "overlay", "mount_id": ovl["id"]}).json()
    assert gone["mount_id"] == ovl["id"]
    assert api.get("/mount") == [] and api.get("/attach/rbd") == []
    assert stack.sim.mapped() == []
    assert mounted(inner["mountpoint"]) is None


def test_referenced_lower_survives_its_overlay(stack: Stack) -> None:
    api = stack.api
    base = api.post("/mount/rbd", {"fs_type": "squashfs", "mount_options": ["ro"],
                                   "rbd": stack.rbd_spec()})
    assert base["refs"] == 1 and base["rbd"]["refs"] == 1
    overlays = [
        api.post("/mount/overlay", {"lower": [{"kind": "rbd", "mount_id": base["id"]}]})
        for _ in range(2)
    ]
    assert api.get(f"/mount/rbd/{base['id']}")["refs"] == 3
    for ovl in overlays:
        api.delete(f"/mount/overlay/{ovl['id']}")
    survivor = api.get(f"/mount/rbd/{base['id']}")
    assert survivor["refs"] == 1 and mounted(survivor["mountpoint"]) == "squashfs"
    api.delete(f"/mount/rbd/{base['id']}")
    assert stack.sim.mapped() == []


def test_overlay_of_overlays_and_several_lowers(stack: Stack) -> None:
    api = stack.api
    base = api.post("/mount/rbd", {"fs_type": "squashfs", "mount_options": ["ro"],
                                   "rbd": stack.rbd_spec()})
    mid = api.post("/mount/overlay", {"lower": [{"kind": "rbd", "mount_id": base["id"]}]})
    Path(mid["mountpoint"], "mid-layer").write_text("mid\n")
    top = api.post("/mount/overlay", {"lower": [
        {"kind": "overlay", "mount_id": mid["id"]},
        {"kind": "rbd", "mount_id": base["id"]},
    ]})
    root = Path(top["mountpoint"])
    assert (root / "mid-layer").read_text() == "mid\n"
    assert (root / "etc/os-release").exists()
    assert api.get("/mount/overlay") == [
        api.get(f"/mount/overlay/{mid['id']}"), api.get(f"/mount/overlay/{top['id']}")
    ]
    for path in (f"/mount/overlay/{top['id']}", f"/mount/overlay/{mid['id']}",
                 f"/mount/rbd/{base['id']}"):
        api.delete(path)


def test_generic_mount_get_and_unmount_forms(stack: Stack) -> None:
    api = stack.api
    rbd = api.post("/attach/rbd", stack.rbd_spec())
    made = api.post("/mount", {"kind": "rbd", "rbd": {"fs_type": "squashfs",
                                                      "mount_options": ["ro"],
                                                      "rbd_id": rbd["id"]}})
    assert ref(made) == {"kind": "rbd", "mount_id": made["rbd"]["id"]}
    # v1's member, and 0.2's for the same mount (the superset both clients decode).
    assert made["attach"]["attach"]["id"] == rbd["id"] and made["refs"] == 1
    assert api.get("/mount") == [made]
    # Wrong kind for the id: not found under that kind, nothing changes.
    api.request("DELETE", "/mount", 404, json={"kind": "overlay", "mount_id": made["mount_id"]})
    api.request("DELETE", "/mount", 200, json={"kind": "rbd", "mount_id": made["mount_id"]})
    assert api.get(f"/attach/rbd/{rbd['id']}")["refs"] == 1
    api.delete(f"/attach/rbd/{rbd['id']}")


def test_snapshot_and_namespace_map_to_the_right_device(stack: Stack) -> None:
    api = stack.api
    snap = api.post("/attach/rbd", {**stack.rbd_spec(), "snapshot": "v1"})
    ns_spec = stack.rbd_spec(image="base", pool="images", namespace="team1")
    ns = api.post("/attach/rbd", ns_spec)
    head = api.post("/attach/rbd", stack.rbd_spec(image="base", pool="images"))
    devices = stack.sim.sysfs / "devices"
    assert (devices / str(snap["device_id"]) / "current_snap").read_text().strip() == "v1"
    assert (devices / str(ns["device_id"]) / "pool_ns").read_text().strip() == "team1"
    assert (devices / str(head["device_id"]) / "pool_ns").read_text().strip() == ""
    assert len({snap["device_id"], ns["device_id"], head["device_id"]}) == 3
    for obj in (snap, ns, head):
        api.delete(f"/attach/rbd/{obj['id']}")


def test_every_option_reaches_the_kernel(stack: Stack) -> None:
    api = stack.api
    options = {
        "fsid": stack.cluster.fsid, "ip": "127.0.0.1", "share": True, "crc": True,
        "ceph_requires_signatures": True, "tcp_nodelay": True, "cephx_sign_messages": True,
        "lock_on_read": True, "exclusive": True, "notrim": True, "abort_on_full": True,
        "mount_timeout": 30, "osdkeepalive": 5, "osd_idle_ttl": 60, "queue_depth": 64,
        "lock_timeout": 10, "alloc_size": 65536,
    }
    rbd = api.post("/attach/rbd", stack.rbd_spec(**options))
    info = (stack.sim.sysfs / "devices" / str(rbd["device_id"]) / "config_info").read_text()
    words = info.split()[1].split(",")
    for expected in ("ro", "share", "crc", "cephx_require_signatures", "tcp_nodelay",
                     "cephx_sign_messages", "lock_on_read", "exclusive", "notrim",
                     "abort_on_full", f"fsid={stack.cluster.fsid}", "ip=127.0.0.1",
                     "mount_timeout=30", "osdkeepalive=5", "osd_idle_ttl=60",
                     "queue_depth=64", "lock_timeout=10", "alloc_size=65536",
                     f"name={stack.cluster.key_name}"):
        assert expected in words, f"{expected} missing from {words}"
    assert rbd["options"] == {"ro": True, "name": stack.cluster.key_name, **options}
    api.delete(f"/attach/rbd/{rbd['id']}")


def test_ids_are_global_and_never_reused(stack: Stack) -> None:
    api = stack.api
    first = api.post("/attach/rbd", stack.rbd_spec())
    api.delete(f"/attach/rbd/{first['id']}")
    second = api.post("/attach/rbd", stack.rbd_spec())
    assert second["id"] > first["id"]
    api.delete(f"/attach/rbd/{second['id']}")
    assert not os.path.exists(second["device_file"])
