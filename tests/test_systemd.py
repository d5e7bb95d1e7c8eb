"""A real systemd boots in a container: a debootstrapped Debian (systemd, dbus) from a squashfs
on an rbd, under an overlay, until `systemctl is-system-running` says `running`; then it
halts cleanly on request and leaves no trace in the host's cgroup tree."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Stack
from tests.krbdsim.harness import add_image

BOOT_TIMEOUT = 90.0
HALT_TIMEOUT = 30.0


@pytest.fixture(scope="module")
def stop_timeout() -> float:
    return HALT_TIMEOUT


@pytest.fixture(scope="module")
def systemd_rbd(cluster: Any, systemd_squashfs: Path) -> str:
    add_image(cluster, "rbd", "debian-systemd", systemd_squashfs)
    return "debian-systemd"


def inside(pid: int, *command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nsenter", "-t", str(pid), "-a", *command], capture_output=True,
                          text=True, timeout=30)


def test_systemd_boots_to_running_and_halts_cleanly(
    stack: Stack, systemd_rbd: str, cgroup_root: Path
) -> None:
    api = stack.api
    c = api.post("/container", {
        "name": "debian1", "systemd": True, "command": "/usr/lib/systemd/systemd",
        "state": "running",
        "mount": {"kind": "overlay", "overlay": {"lower": [{"kind": "rbd", "rbd": {
            "fs_type": "squashfs", "mount_options": ["ro"],
            "rbd": stack.rbd_spec(image=systemd_rbd)}}]}},
    })
    pid = c["pid"]
    cgroup = cgroup_root / f"container-{c['id']}"
    try:
        deadline = time.monotonic() + BOOT_TIMEOUT
        state = ""
        while time.monotonic() < deadline:
            state = inside(pid, "systemctl", "is-system-running").stdout.strip()
            if state in ("running", "degraded"):
                break
            time.sleep(0.5)
        failed = inside(pid, "systemctl", "--failed", "--no-legend", "--plain").stdout
        assert state == "running", (
            f"systemd says {state!r}; failed units:\n{failed}\n"
            f"log:\n{Path(c['logfile']).read_text()[-4000:]}"
        )
        assert failed.strip() == ""
        # systemd sets the hostname from the image's /etc/hostname, in its own uts namespace.
        assert inside(pid, "hostname").stdout.strip() not in ("", subprocess.run(
            ["hostname"], capture_output=True, text=True).stdout.strip())
        # systemd manages only the container's own cgroup: its scopes are below it.
        assert (cgroup / "init.scope").is_dir()
        assert str(pid) in (cgroup / "init.scope" / "cgroup.procs").read_text().split()
    finally:
        stopping = api.get(f"/container/{c['id']}/exited")
    assert stopping["state"] in ("stopping", "exited")
    deadline = time.monotonic() + HALT_TIMEOUT + 10
    while api.get(f"/container/{c['id']}")["state"] == "stopping":
        assert time.monotonic() < deadline, "systemd did not halt"
        time.sleep(0.2)
    final = api.get(f"/container/{c['id']}")
    log = Path(c["logfile"]).read_text()
    assert final["state"] == "exited", log[-3000:]
    assert "stop timeout" not in log, "systemd had to be killed: it did not halt in time"
    assert "stopping container (SIGRTMIN+3)" in log
    assert not cgroup.exists(), "the container's cgroup outlived it"
    api.delete("/container/byname/debian1")
