"""README's "Try it on one machine" walkthrough, run as written.

The server is started by README's first command (scripts/serve.sh), with only a free port, a
private run directory, cgroup root and example directory added so the test never touches the
host's real ones. Every other command is run as printed (less `sudo`: we are root), and its
output is compared with the README's: JSON field by field (paths and pids that change from run
to run excepted), text line by line.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import hostview
from tests.conftest import REPO, free_port, need_privileges, purge

SECTION = "## Try it on one machine"
FIRST = "sudo ./scripts/serve.sh --scheme http --port 8080 &"
VOLATILE = {"mountpoint", "upperdir", "workdir", "device_file", "logfile", "pid"}


def walkthrough() -> list[tuple[str, list[str]]]:
    """(command, expected output lines) for each `$ ` line of the section's code blocks."""
    text = (REPO / "README.md").read_text()
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    steps: list[tuple[str, list[str]]] = []
    for line in section.splitlines():
        if line.startswith("    $ "):
            steps.append((line[6:], []))
        elif line.startswith("    ") and steps:
            steps[-1][1].append(line[4:])
        elif line.strip() and steps:
            steps.append(("", []))  # prose ends a block
    return [s for s in steps if s[0]]


def same_json(expected: Any, actual: Any, where: str = "") -> None:
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and expected.keys() == actual.keys(), (where, actual)
        for key, value in expected.items():
            if key in VOLATILE:
                assert type(actual[key]) is type(value), (where + key, actual[key])
            else:
                same_json(value, actual[key], f"{where}{key}.")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), (where, actual)
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            same_json(e, a, f"{where}[{i}].")
    else:
        assert actual == expected, (where, actual, expected)


def test_readme_walkthrough_runs_as_written(tmp_path: Path, cgroup_root: Path) -> None:
    need_privileges()
    for tool in ("curl", "jq", "nsenter"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool}")
    steps = walkthrough()
    assert steps and steps[0][0] == FIRST, "README's walkthrough must start the server first"
    port = free_port()
    run_dir, examples = tmp_path / "run", tmp_path / "examples"
    swaps = {
        "http://localhost:8080": f"http://127.0.0.1:{port}",
        "/var/lib/imageapi/examples": str(examples),
        "/var/run/imageapi": str(run_dir),
    }

    def swap(text: str) -> str:
        for old, new in swaps.items():
            text = text.replace(old, new)
        return text

    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            ["bash", "scripts/serve.sh", "--scheme", "http", "--host", "127.0.0.1",
             "--port", str(port), "--run-dir", str(run_dir), "--cgroup-root", str(cgroup_root)],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "IMAGEAPI_EXAMPLE_DIR": str(examples)},
        )
    try:
        deadline = time.monotonic() + 120  # the first run builds the example image
        while True:
            assert server.poll() is None, log.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/imageapi/v1/container").is_success:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        assert swap(steps[0][1][0]) in log.read_text()

        for command, expected_lines in steps[1:]:
            command = swap(re.sub(r"(^|\$\()sudo ", r"\1", command))
            done = subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=REPO,
                                  capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, (command, done.stdout, done.stderr)
            expected = swap("\n".join(expected_lines)).strip()
            actual = done.stdout.strip()
            if expected.startswith(("{", "[")):
                same_json(json.loads(expected), json.loads(actual), f"{command}: ")
            else:
                # Text: every line the README shows, but a `sleep 1` the shell may be between.
                wanted = [x for x in expected.splitlines() if "sleep 1" not in x]
                got = actual.splitlines()
                missing = [x for x in wanted if x not in got]
                assert not missing and (expected == "") == (actual == ""), (command, actual)
    finally:
        # A failed step leaves its objects: remove them (the daemon leaves them on SIGTERM).
        purged = purge(f"http://127.0.0.1:{port}") if server.poll() is None else []
        server.send_signal(signal.SIGTERM)
        code = server.wait(30)
    assert code == 0, log.read_text()
    assert not purged, f"the walkthrough left objects behind: {purged}"
    assert hostview.tree(run_dir / "mounts") == set()
    assert not [b for b in hostview.loop_devices().values() if b.startswith(str(examples))]
