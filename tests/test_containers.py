"""Containers through the API: isolation, the seed walkthrough's steps 6-9, the main client's
flow, exit statuses, stop timeouts and bad input — real processes in real namespaces."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

import pytest

from tests import hostview
from tests.apiclient import ref
from tests.conftest import STOP_TIMEOUT, Stack

EXPECTED_DEV = {"console", "fd", "full", "mqueue", "null", "ptmx", "pts", "random", "shm",
                "stderr", "stdin", "stdout", "tty", "urandom", "zero"}


def overlay_spec(stack: Stack) -> dict[str, Any]:
    """overlay <- rbd mount <- rbd, all inline: what the main client sends."""
    return {"kind": "overlay", "overlay": {"lower": [{"kind": "rbd", "rbd": {
        "fs_type": "squashfs", "mount_options": ["ro"], "rbd": stack.rbd_spec()}}]}}


def wait_state(stack: Stack, path: str, states: set[str], timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        view = stack.api.get(path)
        if view["state"] in states:
            return view
        assert time.monotonic() < deadline, f"{path} still {view['state']}, wanted {states}"
        time.sleep(0.05)


def wait_for(path: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def ns_ids(pid: int | str) -> dict[str, str]:
    return {ns: os.readlink(f"/proc/{pid}/ns/{ns}")
            for ns in ("mnt", "pid", "uts", "ipc", "net", "cgroup")}


PROBE = (
    "echo $$ > /probe/pid; hostname > /probe/hostname; ls /dev > /probe/dev; "
    "ps -o pid > /probe/ps; cat /proc/self/mountinfo > /probe/mountinfo; "
    "if echo x > /proc/sys/kernel/domainname; then echo writable; else echo ro; fi "
    "> /probe/procsys 2>/dev/null; ip -o link > /probe/links; echo $container > /probe/env; "
    "touch /probe/done; exec sleep 1000"
)


def test_container_is_isolated(stack: Stack) -> None:
    api = stack.api
    made = api.post("/mount", overlay_spec(stack))
    ovl = made["overlay"]
    upper = Path(ovl["upperdir"])
    image_root = Path(ovl["lower"][0]["rbd"]["mountpoint"])
    c = api.post("/container", {
        "name": "iso1", "mount": {"kind": "overlay", "mount_id": ovl["id"]},
        "command": f"/bin/sh -c 'mkdir /probe; {PROBE}'", "state": "running",
        "namespaces": ["net"],
    })
    assert c["state"] == "running" and c["pid"] > 1
    probe = upper / "probe"
    wait_for(probe / "done")
    assert (probe / "pid").read_text().strip() == "1"
    assert (probe / "hostname").read_text().strip() == "iso1"
    assert set((probe / "dev").read_text().split()) == EXPECTED_DEV
    pids = (probe / "ps").read_text().split()[1:]
    assert "1" in pids and len(pids) <= 3, f"sees other processes: {pids}"
    assert (probe / "procsys").read_text().strip() == "ro"
    assert (probe / "env").read_text().strip() == "imageapi"
    links = (probe / "links").read_text()
    assert "lo:" in links and "UP" in links and len(links.strip().splitlines()) == 1, links
    mountpoints = [line.split()[4] for line in (probe / "mountinfo").read_text().splitlines()]
    assert mountpoints[0] == "/" and "/proc" in mountpoints and "/dev/pts" in mountpoints
    assert not [m for m in mountpoints if m.startswith(("/tmp", "/var/run", "/run/"))], (
        f"host mounts leaked into the container: {mountpoints}"
    )
    # Namespaces: all of them differ from ours (net because we asked for it).
    theirs, ours = ns_ids(c["pid"]), ns_ids("self")
    for ns in ("mnt", "pid", "uts", "ipc", "net", "cgroup"):
        assert theirs[ns] != ours[ns], f"{ns} namespace is shared with the host"
    # Writes land in the overlay's upper dir, never in the image.
    assert not (image_root / "probe").exists()
    # sh as PID 1 ignores SIGTERM: the stop timeout's SIGKILL ends it, and it counts as exited.
    stopped = api.get(f"/container/{c['id']}/exited")
    assert stopped["state"] == "stopping"
    final = wait_state(stack, f"/container/{c['id']}", {"exited", "dead"},
                       timeout=STOP_TIMEOUT + 20)
    assert final["state"] == "exited" and "pid" not in final
    log = Path(c["logfile"]).read_text()
    assert "SIGKILL" in log
    api.delete(f"/container/{c['id']}")
    api.request("DELETE", "/mount", 200, json={"kind": "overlay", "mount_id": ovl["id"]})


SEED_LOG_LINES = [
    "container created", "starting container", "validating image", "validating init",
    "init: making all mounts private", "init: preparing image", "init: mounting /proc",
    "init: mounting /dev", "init: mounting /dev/shm", "init: mounting /dev/mqueue",
    "init: mounting /dev/pts", "init: mounting /sys", "init: making device file /dev/null",
    "init: making device file /dev/zero", "init: making device file /dev/full",
    "init: making device file /dev/tty", "init: making device file /dev/random",
    "init: making device file /dev/urandom", "init: executing", "container deleted",
]


def test_seed_walkthrough_steps_6_to_9(stack: Stack) -> None:
    api = stack.api
    rbd = api.post("/attach/rbd", stack.rbd_spec())
    mnt = api.post("/mount/rbd", {"id": rbd["id"], "fs_type": "squashfs",
                                  "mount_options": ["ro"]})
    ovl = api.post("/mount/overlay", {"lower": [mnt["id"]]})
    # Step 6: define it, not started; the seed's legacy mount shape {"id", "kind"}.
    c = api.post("/container", {
        "name": "test-container", "mount": {"id": ovl["id"], "kind": "overlay"},
        "command": "/bin/sh -c 'trap \"exit 0\" TERM; while true; do sleep 0.1; done'",
        "state": "created", "systemd": False,
    })
    assert c["state"] == "created" and "pid" not in c
    assert ref(c["mount"]) == {"kind": "overlay", "mount_id": ovl["id"]}
    logfile = Path(c["logfile"])
    assert logfile.parent == stack.server.run_dir / "logs"
    assert logfile.name.startswith(f"{c['id']}-") and logfile.suffix == ".log"
    assert logfile.read_text().endswith(f"container({c['id']}): container created\n")
    assert api.get(f"/mount/overlay/{ovl['id']}")["refs"] == 2
    api.delete(f"/mount/overlay/{ovl['id']}", expect=409)

    # Step 7: start it, see it in the process tree and the list.
    running = api.get(f"/container/{c['id']}/running")
    assert running["state"] == "running"
    pid = running["pid"]
    assert pid in hostview.descendants(stack.server.proc.pid)
    assert [x["name"] for x in api.get("/container")] == ["test-container"]
    assert api.get("/container/byname/test-container")["id"] == c["id"]
    assert api.get(f"/container/{c['id']}/running")["pid"] == pid, "running again is a no-op"

    # Step 8: stop it by name.
    stopping = api.get("/container/byname/test-container/exited")
    assert stopping["state"] in ("stopping", "exited")
    done = wait_state(stack, "/container/byname/test-container", {"exited", "dead"})
    assert done["state"] == "exited"
    assert not os.path.exists(f"/proc/{pid}")
    assert api.get(f"/container/{c['id']}/exited")["state"] == "exited", "no-op when not running"

    # Step 9: tear it all down.
    gone = api.delete(f"/container/{c['id']}")
    assert gone["id"] == c["id"]
    api.get("/container/byname/test-container", expect=404)
    api.delete(f"/mount/overlay/{ovl['id']}")
    api.delete(f"/mount/rbd/{mnt['id']}")
    api.delete(f"/attach/rbd/{rbd['id']}")
    log = logfile.read_text()
    position = 0
    for line in SEED_LOG_LINES:
        found = log.find(line, position)
        assert found >= 0, f"log lacks {line!r} (in order):\n{log}"
        position = found
    stamp = log.splitlines()[0][:19]
    assert time.strptime(stamp, "%Y/%m/%d %H:%M:%S")


def test_main_client_flow(stack: Stack) -> None:
    """One nested POST /container, poll, stop by name, poll, delete by name."""
    api = stack.api
    c = api.post("/container", {
        "name": "kraken-node1", "mount": overlay_spec(stack),
        "command": "/bin/sh -c 'trap \"exit 0\" TERM; while true; do sleep 0.1; done'",
        "state": "running",
    })
    assert c["state"] == "running"
    assert c["mount"]["kind"] == "overlay" and "overlay" in c["mount"], "inline mount embedded"
    listed = api.get("/container")
    assert [x["id"] for x in listed] == [c["id"]] and listed[0]["state"] == "running"
    api.get("/container/byname/kraken-node1/exited")
    wait_state(stack, "/container/byname/kraken-node1", {"exited"})
    api.delete("/container/byname/kraken-node1")
    assert api.get("/container") == [] and api.get("/mount") == []
    assert api.get("/attach/rbd") == [] and stack.sim.mapped() == []
    assert not os.path.exists(f"/proc/{c['pid']}")


def test_exit_status_decides_exited_or_dead(stack: Stack) -> None:
    api = stack.api
    ovl = api.post("/mount", overlay_spec(stack))["overlay"]
    mount = {"kind": "overlay", "mount_id": ovl["id"]}
    ok = api.post("/container", {"mount": mount, "command": "/bin/true", "state": "running"})
    bad = api.post("/container", {"mount": mount, "command": "/bin/sh -c 'exit 3'",
                                  "state": "running"})
    assert wait_state(stack, f"/container/{ok['id']}", {"exited", "dead"})["state"] == "exited"
    assert wait_state(stack, f"/container/{bad['id']}", {"exited", "dead"})["state"] == "dead"
    assert "status 3" in Path(bad["logfile"]).read_text()
    # running again restarts an ended container
    again = api.get(f"/container/{bad['id']}/running")
    assert again["state"] in ("running", "dead")
    assert wait_state(stack, f"/container/{bad['id']}", {"dead"})["state"] == "dead"
    assert Path(bad["logfile"]).read_text().count("starting container") == 2
    for x in (ok, bad):
        api.delete(f"/container/{x['id']}")
    api.delete(f"/mount/overlay/{ovl['id']}")


def test_deleting_a_running_container_stops_it_first(stack: Stack) -> None:
    api = stack.api
    ovl = api.post("/mount", overlay_spec(stack))["overlay"]
    c = api.post("/container", {"mount": {"kind": "overlay", "mount_id": ovl["id"]},
                                "command": "/bin/sleep 1000", "state": "running"})
    pid = c["pid"]
    gone = api.delete(f"/container/{c['id']}")
    assert gone["state"] == "exited"
    assert not os.path.exists(f"/proc/{pid}")
    api.delete(f"/mount/overlay/{ovl['id']}")


def run_on_new_overlay(stack: Stack, command: str) -> dict[str, Any]:
    """A running container on an inline overlay of the cluster's image."""
    return stack.api.post(
        "/container", {"mount": overlay_spec(stack), "state": "running", "command": command}
    )


def test_output_goes_to_the_log(stack: Stack) -> None:
    api = stack.api
    c = run_on_new_overlay(stack, "/bin/sh -c 'echo to-stdout; echo to-stderr >&2; "
                                  "echo to-console > /dev/console'")
    wait_state(stack, f"/container/{c['id']}", {"exited"})
    log = Path(c["logfile"]).read_text()
    for word in ("to-stdout", "to-stderr", "to-console"):
        assert word in log
    api.delete(f"/container/{c['id']}")


def test_event_lines_start_a_line_after_output_left_mid_line(stack: Stack) -> None:
    api = stack.api
    c = run_on_new_overlay(stack, "/bin/sh -c 'printf \"prompt> \"; "
                                  "printf \"console> \" > /dev/console; exec sleep 1000'")
    log = Path(c["logfile"])
    deadline = time.monotonic() + 20
    while "console> " not in log.read_text() or "prompt> " not in log.read_text():
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.02)
    api.delete(f"/container/{c['id']}")
    lines = log.read_text().splitlines()
    assert any(line.endswith("> ") for line in lines), lines  # the output, left as it was
    events = [line for line in lines if f"container({c['id']}):" in line]
    assert len(events) >= 3, lines  # created, starting, stopped
    for line in events:
        assert re.match(r"\d{4}/\d\d/\d\d \d\d:\d\d:\d\d container\(", line), lines
    assert log.read_text().endswith("\n")


BAD: dict[str, tuple[Any, int, str]] = {
    "unknown-mount-id": ({"mount": {"kind": "overlay", "mount_id": 999_999},
                          "command": "/bin/true"}, 404, "999999"),
    "missing-entrypoint": ({"command": "/bin/nope"}, 400, "does not exist"),
    "entrypoint-not-executable": ({"command": "/etc/not-executable"}, 400, "not executable"),
    "entrypoint-a-directory": ({"command": "/etc"}, 400, "not a regular file"),
    "entrypoint-escapes-by-dotdot": ({"command": "/../../../../bin/nope"}, 400,
                                     "does not exist"),
    "bad-initial-state": ({"command": "/bin/true", "state": "exited"}, 400, "state"),
    "bad-namespace": ({"command": "/bin/true", "namespaces": ["mnt", "bogus"]}, 400,
                      "namespaces"),
    "user-namespace": ({"command": "/bin/true", "namespaces": ["user"]}, 400, "user"),
    "empty-command": ({"command": ""}, 400, "command"),
    "blank-command": ({"command": "   "}, 400, "command"),
    "unbalanced-quotes": ({"command": "/bin/sh -c 'echo"}, 400, "command"),
    "bad-name": ({"command": "/bin/true", "name": "a b"}, 400, "name"),
    "no-mount": ({"command": "/bin/true", "mount": None}, 400, "mount"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_container_requests_change_nothing(case: str, stack: Stack) -> None:
    api = stack.api
    ovl = api.post("/mount", overlay_spec(stack))["overlay"]
    named = api.post("/container", {"name": "taken", "command": "/bin/true",
                                    "mount": {"kind": "overlay", "mount_id": ovl["id"]}})
    logs_before = hostview.tree(stack.server.run_dir / "logs")
    refs_before = api.get(f"/mount/overlay/{ovl['id']}")["refs"]
    extra, status, says = BAD[case]
    body = {"mount": {"kind": "overlay", "mount_id": ovl["id"]}, **extra}
    if body.get("mount") is None:
        del body["mount"]
    reply = api.request("POST", "/container", status, json=body).json()
    assert says.lower() in reply["message"].lower(), reply
    assert api.get(f"/mount/overlay/{ovl['id']}")["refs"] == refs_before
    assert [c["id"] for c in api.get("/container")] == [named["id"]]
    assert hostview.tree(stack.server.run_dir / "logs") == logs_before, "a log file was made"
    api.delete(f"/container/{named['id']}")
    api.delete(f"/mount/overlay/{ovl['id']}")


def test_duplicate_name_is_a_conflict(stack: Stack) -> None:
    api = stack.api
    ovl = api.post("/mount", overlay_spec(stack))["overlay"]
    mount = {"kind": "overlay", "mount_id": ovl["id"]}
    first = api.post("/container", {"name": "node7", "command": "/bin/true", "mount": mount})
    mounts_before = api.get("/mount")
    reply = api.request("POST", "/container", 409,
                        json={"name": "node7", "command": "/bin/true", "mount": mount}).json()
    assert "node7" in reply["message"]
    # Inline mounts of a refused container are rolled back.
    api.request("POST", "/container", 409,
                json={"name": "node7", "command": "/bin/true", "mount": overlay_spec(stack)})
    assert api.get("/mount") == mounts_before
    api.delete(f"/container/{first['id']}")
    api.delete(f"/mount/overlay/{ovl['id']}")


def test_time_namespace_takes_the_general_path(stack: Stack) -> None:
    """A time namespace applies only to children, so the helper's spare init can't take it:
    the request goes the two-fork way and still gets everything else."""
    api = stack.api
    c = api.post("/container", {"mount": overlay_spec(stack), "namespaces": ["time", "ipc"],
                                "command": "/bin/sleep 1000", "state": "running"})
    assert os.readlink(f"/proc/{c['pid']}/ns/time") != os.readlink("/proc/self/ns/time")
    assert ns_ids(c["pid"])["pid"] != ns_ids("self")["pid"]
    assert Path(f"/proc/{c['pid']}/comm").read_text().strip() == "sleep"
    api.delete(f"/container/{c['id']}")


@pytest.mark.parametrize(("systemd", "options", "says"), [
    (True, ["ro"], "read-only"),  # a bare squashfs has no /var/lib/journal to mount on
    (False, ["ro", "noexec"], "noexec"),
])
def test_image_that_cannot_run_it_is_refused_at_create(
    stack: Stack, systemd: bool, options: list[str], says: str
) -> None:
    api = stack.api
    mount = api.post("/mount/rbd", {"fs_type": "squashfs", "mount_options": options,
                                    "rbd": stack.rbd_spec(image="base", pool="images")})
    logs_before = hostview.tree(stack.server.run_dir / "logs")
    reply = api.request("POST", "/container", 400, json={
        "mount": {"kind": "rbd", "mount_id": mount["id"]}, "command": "/bin/true",
        "systemd": systemd, "state": "running",
    }).json()
    assert says in reply["message"], reply
    assert api.get("/container") == []
    assert hostview.tree(stack.server.run_dir / "logs") == logs_before
    api.delete(f"/mount/rbd/{mount['id']}")
