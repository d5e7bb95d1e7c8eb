"""The trust model (README, "Security"): the default listener, and the escapes a container of
the `node` profile has and one of the `confined` profile does not.

Each escape is tried for real from inside a container of a real server — a tmpfs mount,
remounting /proc/sys and /sys read-write, mknod of a disk, a user namespace, the "shocker"
open_by_handle_at read of a host file outside the container's root (a static C program built
here with gcc), and the API on the host's 127.0.0.1 — once under `node`, where each works, so
the probes are known to detect what they look for, then under `confined`, where each fails.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import secrets
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import prctl
import pytest

from tests.conftest import Stack
from tests.test_http_layer import free_port, spawn
from tests.test_service import socket_fds

BASE = "/imageapi/v1"
# README, "Security": what a confined container's root keeps (a typical runtime's set less mknod).
CONFINED_CAPS = ["chown", "dac_override", "fowner", "fsetid", "kill", "setgid", "setuid",
                 "setpcap", "setfcap", "net_bind_service", "net_raw", "sys_chroot", "audit_write"]

# -- the default listener ----------------------------------------------------------------------


def tcp_sockets_of(pid: int) -> list[str]:
    """Rows of /proc/net/tcp{,6} whose socket `pid` holds."""
    inodes = set(socket_fds(pid))
    return [line for table in ("/proc/net/tcp", "/proc/net/tcp6")
            for line in Path(table).read_text().splitlines()[1:]
            if int(line.split()[9]) in inodes]  # fmt: skip


def test_no_scheme_serves_the_unix_socket_alone(tmp_path: Path) -> None:
    sock_path = tmp_path / "s.sock"
    proc = spawn(tmp_path, "--socket-path", str(sock_path))
    try:
        proc.wait_for("accepting connections on", count=1)
        assert f"accepting connections on unix:{sock_path}" in proc.log
        assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)
        assert stat.S_IMODE(os.lstat(sock_path).st_mode) == 0o600
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock_path)), timeout=10) as c:
            assert c.get(f"http://imageapi{BASE}/container").json() == []
        assert tcp_sockets_of(proc.popen.pid) == [], "the daemon holds a TCP socket"
        assert "WARNING" not in proc.log, proc.log
    finally:
        code = proc.stop()
    assert code == 0, proc.log
    assert not sock_path.exists()


def test_an_http_listener_warns_that_anyone_local_can_drive_it(tmp_path: Path) -> None:
    port = free_port()
    proc = spawn(tmp_path, "--scheme", "http", "--host", "127.0.0.1", "--port", str(port))
    try:
        proc.wait_for("accepting connections on", count=1)
        warnings = [line for line in proc.log.splitlines() if " WARNING " in line]
        assert len(warnings) == 1, proc.log
        assert f"http://127.0.0.1:{port} is plain http without authentication" in warnings[0]
        assert "any local user" in warnings[0] and "root-equivalent" in warnings[0]
    finally:
        code = proc.stop()
    assert code == 0, proc.log


# -- escapes from inside a container -----------------------------------------------------------

# Opens the inode a file handle (given as TYPE HEX) names on the filesystem of "/": with
# CAP_DAC_READ_SEARCH that is any file of that filesystem, inside the container's root or not.
HANDLE_PROBE_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv) {
    struct file_handle *fh = malloc(sizeof *fh + MAX_HANDLE_SZ);
    int mount_id, root = open("/", O_RDONLY | O_DIRECTORY);
    if (argc != 3 || !fh || root < 0) return 2;
    fh->handle_bytes = MAX_HANDLE_SZ;
    if (name_to_handle_at(root, ".", fh, &mount_id, 0) == 0)
        printf("PROBE name_to_handle_at ok\n");
    else
        printf("PROBE name_to_handle_at denied %s\n", strerror(errno));
    fh->handle_type = atoi(argv[1]);
    fh->handle_bytes = strlen(argv[2]) / 2;
    for (unsigned i = 0; i < fh->handle_bytes; i++)
        sscanf(argv[2] + 2 * i, "%2hhx", &fh->f_handle[i]);
    int fd = open_by_handle_at(root, fh, O_RDONLY);
    if (fd < 0) {
        printf("PROBE open_by_handle_at denied %s\n", strerror(errno));
        return 0;
    }
    char buf[128] = "";
    ssize_t got = read(fd, buf, sizeof buf - 1);
    buf[got > 0 ? got : 0] = 0;
    printf("PROBE open_by_handle_at ok %s\n", buf);
    return 0;
}
"""

# $1 $2: a path of the API and its port on the host's 127.0.0.1; $3 $4: the handle of a host
# file outside the root.
PROBE_SH = r"""
say() { echo "PROBE $*"; }
try() {
    name=$1; shift
    if out=$("$@" 2>&1); then say "$name" ok "$out"; else say "$name" denied "$out"; fi
}
grep -E '^(CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs|Seccomp):' /proc/self/status |
    sed 's/^/STATUS /'
try mount-tmpfs mount -t tmpfs probe /mnt
try remount-proc-sys mount -o remount,rw /proc/sys
# domainname belongs to the container's own uts namespace: harmless to write even when it works
try write-proc-sys sh -c 'echo imageapi-probe > /proc/sys/kernel/domainname'
try remount-sys mount -o remount,rw /sys
try mknod mknod /dev/probe-disk b 8 0
try user-namespace unshare -U true
# (busybox's static wget crashes in getaddrinfo; nc gives up when its input ends, hence sleep)
try api sh -c '{ printf "GET %s HTTP/1.0\r\n\r\n" "$1"; sleep 1; } | nc 127.0.0.1 "$2"' - "$1" "$2"
/bin/handle-probe "$3" "$4"
echo PROBE done
"""

PROBES = ("mount-tmpfs", "remount-proc-sys", "write-proc-sys", "remount-sys", "mknod",
          "user-namespace", "api", "name_to_handle_at", "open_by_handle_at")  # fmt: skip


class FileHandle(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int),
                ("f_handle", ctypes.c_ubyte * 128)]  # fmt: skip


def file_handle(path: Path) -> tuple[int, str]:
    """(type, hex bytes) of the handle that names `path` on its filesystem."""
    libc = ctypes.CDLL(None, use_errno=True)
    fh, mount_id = FileHandle(handle_bytes=128), ctypes.c_int()
    at_fdcwd = -100
    if libc.name_to_handle_at(at_fdcwd, os.fsencode(path), ctypes.byref(fh),
                              ctypes.byref(mount_id), 0) != 0:
        err = ctypes.get_errno()
        pytest.skip(f"the test directory's filesystem gives no file handles: {os.strerror(err)}")
    return fh.handle_type, bytes(fh.f_handle[: fh.handle_bytes]).hex()


class ProbeImage:
    def __init__(self, root: Path, secret: str, handle: tuple[int, str]) -> None:
        self.root, self.secret, self.handle = root, secret, handle


@pytest.fixture(scope="module")
def probe_image(image_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> ProbeImage:
    """The test image plus the probes, to be bind-mounted as a container's root; beside it (on
    the same filesystem, outside the root) a file with a secret."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("needs gcc (and a static libc, libc6-dev) for the open_by_handle_at probe")
    base = tmp_path_factory.mktemp("probe-image")
    root = base / "root"
    shutil.copytree(image_tree, root, symlinks=True)
    (root / "mnt").mkdir(exist_ok=True)
    (root / "probe.sh").write_text(PROBE_SH)
    source = base / "handle-probe.c"
    source.write_text(HANDLE_PROBE_C)
    built = subprocess.run([gcc, "-static", "-O2", "-o", str(root / "bin/handle-probe"),
                            str(source)], capture_output=True, text=True)
    assert built.returncode == 0, f"gcc -static failed: {built.stderr}"
    secret = base / "host-secret"
    token = secrets.token_hex(16)
    secret.write_text(token)
    return ProbeImage(root, token, file_handle(secret))


def wait_ended(stack: Stack, cid: int, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (view := stack.api.get(f"/container/{cid}"))["state"] not in ("exited", "dead"):
        assert time.monotonic() < deadline, f"container {cid} still {view['state']}"
        time.sleep(0.05)
    return view


def run_probes(stack: Stack, image: ProbeImage, **fields: Any) -> tuple[dict, dict, dict]:
    """Run the probes in a new container; (its view, {probe: (verdict, text)}, /proc status)."""
    port = stack.server.url.rsplit(":", 1)[1]
    kind, handle = image.handle
    c = stack.api.post("/container", {
        "mount": {"kind": "bind", "bind": {"path": str(image.root)}},
        "command": f"/bin/sh /probe.sh {BASE}/container {port} {kind} {handle}",
        "state": "running",
        **fields,
    })  # fmt: skip
    try:
        ended = wait_ended(stack, c["id"])
        log = Path(c["logfile"]).read_text(errors="replace")
        assert ended["state"] == "exited", log
    finally:
        stack.api.delete(f"/container/{c['id']}")
    assert "PROBE done" in log, log
    results: dict[str, tuple[str, str]] = {}
    status: dict[str, str] = {}
    for line in log.splitlines():
        if m := re.match(r"PROBE (\S+) (ok|denied) ?(.*)", line):
            results[m[1]] = (m[2], m[3])
        elif m := re.match(r"STATUS (\w+):\s+(\S+)", line):
            status[m[1]] = m[2]
    assert set(results) == set(PROBES), log
    return c, results, status


def cap_mask(names: list[str]) -> int:
    return sum(1 << getattr(prctl, f"CAP_{name.upper()}") for name in names)


def test_node_profile_keeps_the_escapes(stack: Stack, probe_image: ProbeImage) -> None:
    """What the README says the node profile can do, it can: so the probes below see it."""
    c, results, status = run_probes(stack, probe_image)
    assert c["profile"] == "node" and c["namespaces"] is None
    denied = {name: text for name, (verdict, text) in results.items() if verdict != "ok"}
    assert denied == {}, denied
    assert probe_image.secret in results["open_by_handle_at"][1], "no host file read"
    assert results["api"][1].startswith("HTTP/1.1 200 OK"), results["api"]
    bounding = int(status["CapBnd"], 16)
    for cap in ("sys_admin", "dac_read_search", "mknod", "sys_ptrace", "net_admin"):
        assert bounding & cap_mask([cap]), f"node profile lost {cap}"
    assert status["Seccomp"] == "0" and status["NoNewPrivs"] == "0"


def test_confined_profile_blocks_the_escapes(stack: Stack, probe_image: ProbeImage) -> None:
    c, results, status = run_probes(stack, probe_image, profile="confined")
    assert c["profile"] == "confined"
    assert c["namespaces"] == ["net"], "a confined container gets a network namespace"
    allowed = {name: text for name, (verdict, text) in results.items() if verdict != "denied"}
    assert allowed == {}, allowed
    for name in ("mount-tmpfs", "remount-proc-sys", "remount-sys", "mknod", "user-namespace"):
        # EPERM, whatever the tool makes of it (busybox mount: "permission denied")
        assert re.search("not permitted|permission denied", results[name][1]), (name, results)
    assert "Operation not permitted" in results["open_by_handle_at"][1]
    assert "Operation not permitted" in results["name_to_handle_at"][1]
    assert "Read-only file system" in results["write-proc-sys"][1]
    assert "Connection refused" in results["api"][1], results["api"]
    assert probe_image.secret not in repr(results)
    # Exactly the documented capabilities, nothing inheritable, no new privileges, a filter.
    assert int(status["CapBnd"], 16) == cap_mask(CONFINED_CAPS), status
    assert int(status["CapEff"], 16) == cap_mask(CONFINED_CAPS), status
    assert int(status["CapInh"], 16) == 0 and int(status["CapAmb"], 16) == 0, status
    assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2", status


def test_confined_on_the_general_start_path(stack: Stack, probe_image: ProbeImage) -> None:
    """A time namespace is not given to a spare: the two-fork start confines just the same."""
    c, results, status = run_probes(stack, probe_image, profile="confined",
                                    namespaces=["time"])
    assert c["namespaces"] == ["time", "net"]
    assert {verdict for verdict, _ in results.values()} == {"denied"}, results
    assert int(status["CapBnd"], 16) == cap_mask(CONFINED_CAPS)
    assert status["Seccomp"] == "2"


@pytest.mark.parametrize(
    ("extra", "says"),
    [({"profile": "confined", "systemd": True}, "cannot run systemd"),
     ({"profile": "jail"}, "profile"),
     ({"profile": None}, "profile"),
     ({"profile": ["confined"]}, "profile")],
)  # fmt: skip
def test_bad_profiles_change_nothing(
    stack: Stack, probe_image: ProbeImage, extra: dict[str, Any], says: str
) -> None:
    logs_before = set(os.listdir(stack.server.run_dir / "logs"))
    body = {"mount": {"kind": "bind", "bind": {"path": str(probe_image.root)}},
            "command": "/bin/true", **extra}  # fmt: skip
    error = stack.api.post("/container", body, expect=400)
    assert says in error["message"], error
    assert stack.api.get("/container") == [] and stack.api.get("/mount") == []
    assert set(os.listdir(stack.server.run_dir / "logs")) == logs_before


# -- the filter itself, in a forked child of this process --------------------------------------
# (imageapi.kernel.seccomp is imported in each test, so that the tests above run, and fail on
# their own, against a tree without it.)


def in_filtered_child(body: str) -> tuple[int, str]:
    """Run `body` (Python, with `libc`, `errno_of` and `out` in scope) in a forked child under
    the deny-list; (wait status, what it wrote to `out`)."""
    from imageapi.kernel import seccomp

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(read)
            libc = ctypes.CDLL(None, use_errno=True)
            libc.syscall.restype = ctypes.c_long

            def errno_of(result: int) -> str:
                return "ok" if result >= 0 else errno.errorcode[ctypes.get_errno()]

            out: list[str] = []
            seccomp.install(seccomp.deny_list())
            exec(body, {"libc": libc, "errno_of": errno_of, "out": out, "os": os})
            os.write(write, "\n".join(out).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        text = f.read()
    return os.waitpid(pid, 0)[1], text


def test_every_denied_syscall_fails_with_eperm() -> None:
    from imageapi.kernel import seccomp

    if not seccomp.supported():
        pytest.skip(f"no deny-list for {os.uname().machine}")
    numbers = seccomp.ARCHES[os.uname().machine][1]
    denied = [n for n in seccomp.DENIED if n in numbers]
    body = "\n".join(
        # Bogus arguments: nothing may happen if a call got through; it would fail otherwise.
        f"out.append('{name} ' + errno_of(libc.syscall({numbers[name]}, -1, 0, 0, 0, 0, 0)))"
        for name in denied
    )
    body += f"""
out.append('clone3 ' + errno_of(libc.syscall({numbers['clone3']}, 0, 0)))
out.append('clone-newuser ' + errno_of(libc.syscall({numbers['clone']}, 0x10000000 | 17,
                                                    0, 0, 0, 0)))
out.append('getpid ' + errno_of(libc.getpid()))
fd = os.open('/proc/self/status', os.O_RDONLY)
out.append('nnp ' + [x for x in os.read(fd, 4096).decode().splitlines()
                     if x.startswith('NoNewPrivs')][0].split()[1])
"""
    status, text = in_filtered_child(body)
    assert os.WIFEXITED(status), status
    got = dict(line.split(" ", 1) for line in text.splitlines())
    assert got == {**{name: "EPERM" for name in denied}, "clone3": "ENOSYS",
                   "clone-newuser": "EPERM", "getpid": "ok", "nnp": "1"}  # fmt: skip


def test_a_foreign_abi_syscall_kills_the_process() -> None:
    if os.uname().machine != "x86_64":
        pytest.skip("x32 syscall numbers exist on x86_64 only")
    # getpid (39) by its x32 number: the filter's numbers are the native ones, so it dies.
    status, text = in_filtered_child("libc.syscall(0x40000000 | 39)\nout.append('survived')")
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSYS, (status, text)


HEADERS = {"x86_64": Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h"),
           "aarch64": Path("/usr/include/asm-generic/unistd.h")}  # fmt: skip


@pytest.mark.parametrize("machine", sorted(HEADERS))
def test_syscall_numbers_match_the_kernel_headers(machine: str) -> None:
    from imageapi.kernel import seccomp

    header = HEADERS[machine]
    if not header.exists():
        pytest.skip(f"needs {header} (linux-libc-dev)")
    known = {m[1]: int(m[2]) for m in re.finditer(r"#define __NR(?:3264)?_(\w+)\s+(\d+)\b",
                                                 header.read_text())}  # fmt: skip
    numbers = seccomp.ARCHES[machine][1]
    checked = {name: nr for name, nr in numbers.items() if name in known}
    assert checked == {name: known[name] for name in checked}
    # Only syscalls newer than the headers may be missing from them.
    assert set(numbers) - set(known) <= {"open_tree_attr"}, set(numbers) - set(known)
    assert set(seccomp.DENIED) - set(numbers) <= {"iopl", "ioperm", "uselib"}


def test_deny_list_is_valid_bpf() -> None:
    from imageapi.kernel import seccomp

    for machine in seccomp.ARCHES:
        program = seccomp.deny_list(machine)
        assert len(program) % 8 == 0 and 0 < len(program) // 8 < 4096
    with pytest.raises(OSError) as err:
        seccomp.deny_list("riscv64")
    assert err.value.errno == errno.ENOSYS
    assert not seccomp.supported("riscv64")

