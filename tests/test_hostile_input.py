"""Input that cost a 500 or unbounded work: huge ids, NUL bytes and huge commands.

Each is the client's fault: a 400 with a message, little work for the daemon, nothing
changed (the `stack` fixture compares the registry, the mounts and the run dir).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from tests.apiclient import BASE, spec
from tests.conftest import Stack

HUGE_ID = "9" * 5000


def id_routes() -> list[tuple[str, str]]:
    routes = []
    for template, item in spec()["paths"].items():
        if "{id}" not in template:
            continue
        for method in item:
            if method in ("get", "put", "post", "delete", "patch"):
                path = template.replace("{id}", HUGE_ID).replace("{state}", "running")
                routes.append((method.upper(), path))
    return routes


@pytest.fixture
def overlay(stack: Stack) -> Iterator[dict[str, Any]]:
    mount = stack.api.post("/mount", {"kind": "overlay", "overlay": {"lower": [{
        "kind": "rbd", "rbd": {"fs_type": "squashfs", "mount_options": ["ro"],
                               "rbd": stack.rbd_spec()}}]}})
    yield {"kind": "overlay", "mount_id": mount["mount_id"]}
    stack.api.delete(f"/mount/overlay/{mount['mount_id']}")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize(("method", "path"), id_routes(), ids=lambda v: v[:40])
def test_a_5000_digit_id_is_a_400(method: str, path: str, stack: Stack) -> None:
    body = {} if method in ("POST", "PUT") else None
    reply = stack.api.request(method, path, json=body)
    assert reply.status_code == 400, reply.text
    assert "5000 digits is not an id" in reply.json()["message"]
    longest = max(len(line) for line in stack.server.log_text().splitlines())
    assert longest < 1000, "a client's path was written whole into the log"


def test_the_id_guard_leaves_long_names_alone(stack: Stack) -> None:
    # 64 digits is a valid container name; it is simply not there.
    reply = stack.api.request("GET", "/container/byname/" + "1" * 64)
    assert reply.status_code == 404, reply.text


@pytest.mark.parametrize(("command", "says"), [
    ("/bin/sh\x00 -c true", "control character '\\x00'"),
    ("/bin/echo \x1b[2J", "control character '\\x1b'"),
    ("/bin/echo " + "x" * 140_000, "140010 characters long; at most 16384"),
    ("/bin/echo " + "x" * 250_000, "at most 16384"),
    ("/bin/echo " + "é" * 8200, "at most 16384"),  # 16,400 bytes in 8,210 characters
])
def test_a_bad_command_is_a_400(command: str, says: str, stack: Stack,
                                overlay: dict[str, Any]) -> None:
    reply = stack.api.request("POST", "/container", json={
        "mount": overlay, "command": command, "state": "running"})
    assert reply.status_code == 400, reply.text
    assert says in reply.json()["message"]


def test_a_huge_command_costs_little(stack: Stack, overlay: dict[str, Any]) -> None:
    # 900 KB of words: it used to cost the daemon 20 s of CPU before failing.
    pid = stack.server.proc.pid
    before = cpu_seconds(pid)
    reply = stack.api.request("POST", "/container", json={
        "mount": overlay, "command": "/bin/echo " + "a " * 450_000})
    assert reply.status_code == 400, reply.text
    assert cpu_seconds(pid) - before < 2.0


def test_the_longest_command_allowed_runs(stack: Stack, overlay: dict[str, Any]) -> None:
    command = "/bin/echo " + "y" * (16384 - len("/bin/echo "))
    c = stack.api.post("/container", {"mount": overlay, "command": command,
                                      "state": "running"})
    assert c["command"] == command
    gone = stack.api.delete(f"/container/{c['id']}")
    assert gone["state"] in ("exited", "dead")


def test_base_path_is_what_the_tests_use() -> None:
    assert spec()["basePath"] == BASE
