"""The real `imageapi-server` process: listeners, TLS client certificates, the unix socket,
signals, and the error paths of the HTTP layer as a client sees them on the wire.

Needs no privileges: the rbd sysfs and device directories point at empty temporary ones, so
nothing here reaches the kernel.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
import yaml

REPO = Path(__file__).resolve().parent.parent
BASE = "/imageapi/v1"
START_TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Proc:
    popen: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    drained: threading.Event = field(default_factory=threading.Event)  # output fully read

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, count: int = 1, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while self.log.count(text) < count:
            if self.popen.poll() is not None and self.drained.wait(5):
                if self.log.count(text) >= count:
                    return
                raise AssertionError(f"server exited {self.popen.returncode}:\n{self.log}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {text!r}:\n{self.log}")
            time.sleep(0.05)

    def stop(self, timeout: float = 20) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
            raise


def spawn(
    tmp: Path,
    *args: str,
    env: dict[str, str] | None = None,
    wrapper: Sequence[str] = (),
    pass_fds: Sequence[int] = (),
) -> Proc:
    """Start the server with temporary state directories; `args` chooses the listeners;
    `wrapper` runs it under another command, which gets `pass_fds`."""
    (tmp / "dev").mkdir(exist_ok=True)
    command = [
        *wrapper, sys.executable, "-m", "imageapi",
        "--run-dir", str(tmp / "run"),
        # No rbd module here, and krbd's answer is what these tests expect: never the
        # user-space driver, which would try to reach the monitors the requests name.
        "--rbd-sysfs", str(tmp / "no-rbd-sysfs"), "--rbd-driver", "krbd",
        "--dev-dir", str(tmp / "dev"),
        *args,
    ]  # fmt: skip
    return spawn_command(command, env, pass_fds)


def spawn_command(
    command: list[str], env: dict[str, str] | None = None, pass_fds: Sequence[int] = ()
) -> Proc:
    """Run `command` with its output collected line by line in the background."""
    popen = subprocess.Popen(
        command,
        cwd=REPO,
        pass_fds=pass_fds,
        env={**os.environ, "IMAGEAPI_LOGLEVEL": "INFO", **(env or {})},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    proc = Proc(popen)

    def drain() -> None:
        assert popen.stdout is not None
        for line in popen.stdout:
            proc.lines.append(line)
        proc.drained.set()

    threading.Thread(target=drain, daemon=True).start()
    return proc


@dataclass
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client: Path  # certificate and key, signed by `ca`
    stranger: Path  # certificate and key, signed by another CA

    def client_context(self, identity: Path | None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        if identity is not None:
            ctx.load_cert_chain(str(identity))
        return ctx


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    d = tmp_path_factory.mktemp("certs")
    ca, other_ca = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    ca.cert_pem.write_to_path(d / "ca.pem")
    server.cert_chain_pems[0].write_to_path(d / "server.pem")
    server.private_key_pem.write_to_path(d / "server.key")
    ca.issue_cert("client.imageapi.test").private_key_and_cert_chain_pem.write_to_path(
        d / "client.pem"
    )
    other_ca.issue_cert("client.imageapi.test").private_key_and_cert_chain_pem.write_to_path(
        d / "stranger.pem"
    )
    return Certs(d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem",
                 d / "stranger.pem")  # fmt: skip


@dataclass
class Server:
    proc: Proc
    http: str
    https: str
    socket_path: Path
    run_dir: Path
    certs: Certs

    def client(self, listener: str, **kwargs: Any) -> httpx.Client:
        if listener == "http":
            return httpx.Client(base_url=self.http + BASE, timeout=10, **kwargs)
        if listener == "https":
            kwargs.setdefault("verify", self.certs.client_context(self.certs.client))
            return httpx.Client(base_url=self.https + BASE, timeout=10, **kwargs)
        transport = httpx.HTTPTransport(uds=str(self.socket_path))
        return httpx.Client(base_url="http://imageapi" + BASE, transport=transport, timeout=10)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, certs: Certs) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("server")
    port, tls_port = free_port(), free_port()
    sock = tmp / "imageapi.sock"
    proc = spawn(
        tmp,
        "--scheme", "http", "--scheme", "https", "--scheme", "unix",
        "--host", "127.0.0.1", "--port", str(port),
        "--tls-port", str(tls_port),
        "--tls-certificate", str(certs.server_cert), "--tls-key", str(certs.server_key),
        "--tls-ca", str(certs.ca),
        "--socket-path", str(sock),
    )  # fmt: skip
    try:
        proc.wait_for("accepting connections on", count=3)
        yield Server(proc, f"http://127.0.0.1:{port}", f"https://127.0.0.1:{tls_port}", sock,
                     tmp / "run", certs)  # fmt: skip
    finally:
        code = proc.stop()
    assert code == 0, proc.log


def assert_error(response: httpx.Response, status: int, *fragments: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"code", "message"} and body["code"] == status, body
    assert isinstance(body["message"], str) and body["message"]
    for fragment in fragments:
        assert fragment in body["message"], body
    return body


# -- listeners ---------------------------------------------------------------------------------


@pytest.mark.parametrize("listener", ["http", "https", "unix"])
def test_every_listener_serves_the_api(server: Server, listener: str) -> None:
    with server.client(listener) as client:
        r = client.get("/attach/rbd")
        assert r.status_code == 200, r.text
        assert r.json() == []
        assert client.get("/mount").json() == []


def test_one_log_line_per_listener(server: Server) -> None:
    lines = [line for line in server.proc.lines if "accepting connections on" in line]
    assert len(lines) == 3
    assert any(server.http in line for line in lines)
    assert any(server.https in line for line in lines)
    assert any(f"unix:{server.socket_path}" in line for line in lines)


@pytest.mark.parametrize("identity", [None, "stranger"])
def test_https_requires_a_client_certificate_from_the_ca(server: Server, identity: Any) -> None:
    certs = server.certs
    ctx = certs.client_context(None if identity is None else certs.stranger)
    # TLS 1.3 clients may finish their half of the handshake before the server's alert
    # arrives, so the refusal can surface on the first read rather than on connect.
    with pytest.raises(httpx.TransportError), server.client("https", verify=ctx) as client:
        client.get("/attach/rbd")


def test_unix_socket_is_private(server: Server) -> None:
    st = os.lstat(server.socket_path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.geteuid()


def test_run_dir_is_created_private(server: Server) -> None:
    assert stat.S_IMODE(os.stat(server.run_dir).st_mode) == 0o700


# -- errors on the wire ------------------------------------------------------------------------


def test_unknown_route_is_404(server: Server) -> None:
    with server.client("http") as client:
        assert_error(client.get("/no/such/thing"), 404)
        assert_error(client.get("/attach/rbd/12345"), 404)
    with httpx.Client(base_url=server.http) as client:
        assert_error(client.get("/"), 404)


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [("PUT", "/attach/rbd", "GET, HEAD, POST"), ("POST", "/attach/rbd/1", "DELETE, GET, HEAD"),
     ("PATCH", "/mount", "DELETE, GET, HEAD, POST"), ("DELETE", "/mount/rbd", "GET, HEAD, POST"),
     ("POST", "/mount/overlay/1", "DELETE, GET, HEAD")],
)  # fmt: skip
def test_wrong_method_is_405_with_allow(server: Server, method: str, path: str, allow: str) -> None:
    with server.client("http") as client:
        r = client.request(method, path, json={})
    assert_error(r, 405, method)
    assert r.headers["allow"] == allow


def test_bad_bodies_are_400(server: Server) -> None:
    json_type = {"content-type": "application/json"}
    with server.client("http") as client:
        assert_error(
            client.post("/attach/rbd", content=b'{"pool":', headers=json_type), 400, "JSON"
        )
        assert_error(
            client.post("/attach/rbd", content=b'{"pool": "\xc3\x28"}', headers=json_type),
            400,
            "UTF-8",
        )
        assert_error(
            client.post("/attach/rbd", json={"pool": "rbd", "image": "i"}),
            400,
            "'monitors' is a required property",
        )
        assert_error(
            client.post("/mount/rbd", json={"fs_type": "squashfs", "rbd_id": 1, "bogus": 1}),
            400,
            "'bogus' was unexpected",
        )
        assert_error(
            client.post("/attach/rbd", content=b"x=1", headers={"content-type": "text/plain"}),
            415,
        )


def test_spec_and_ui_are_served(server: Server) -> None:
    with server.client("http") as client:
        r = client.get("/swagger.json")
        assert r.status_code == 200
        assert r.json() == yaml.safe_load((REPO / "swagger.yaml").read_text())
        r = client.get("/ui/")
        assert r.status_code == 200 and "text/html" in r.headers["content-type"]
        assert "swagger.json" in r.text
        assert client.get("/ui/swagger-ui-bundle.js").status_code == 200


def test_legacy_shapes_reach_the_handlers(server: Server) -> None:
    with server.client("http") as client:
        # `id` of the seed walkthrough means rbd_id: an unknown one is a 404 naming it.
        assert_error(client.post("/mount/rbd", json={"id": 999, "fs_type": "squashfs"}), 404, "999")
        # A bare integer lower is a mount reference (unknown here, so 404), not a schema error.
        assert_error(client.post("/mount/overlay", json={"lower": [998]}), 404, "998")


def test_secret_stays_out_of_replies_and_debug_log(tmp_path: Path) -> None:
    secret = "AQBaVtRgAAAAABAA7d2vKtXqRk+Cb9Vmq/lmqQ=="
    sock_path = tmp_path / "s.sock"
    proc = spawn(
        tmp_path, "--scheme", "unix", "--socket-path", str(sock_path),
        env={"IMAGEAPI_LOGLEVEL": "DEBUG"},
    )  # fmt: skip
    try:
        proc.wait_for("accepting connections on")
        transport = httpx.HTTPTransport(uds=str(sock_path))
        rbd = {"monitors": ["10.0.0.1"], "pool": "rbd", "image": "img"}
        with httpx.Client(transport=transport, base_url="http://x" + BASE) as client:
            for value in (secret, secret + " trailing"):  # refused by the kernel, by the schema
                r = client.post(
                    "/attach/rbd", json={**rbd, "options": {"name": "a", "secret": value}}
                )
                assert r.status_code >= 400 and secret not in r.text, r.text
    finally:
        assert proc.stop() == 0, proc.log
    proc.drained.wait(5)
    assert "DEBUG" in proc.log
    assert secret not in proc.log


# -- process life ------------------------------------------------------------------------------


def test_sigterm_finishes_in_flight_requests_and_cleans_up(tmp_path: Path) -> None:
    port = free_port()
    sock_path = tmp_path / "api.sock"
    proc = spawn(
        tmp_path, "--scheme", "http", "--scheme", "unix", "--host", "127.0.0.1",
        "--port", str(port), "--socket-path", str(sock_path),
    )  # fmt: skip
    try:
        proc.wait_for("accepting connections on", count=2)
        body = b'{"lower": [997]}'
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            # A request in flight: headers sent, body only half.
            conn.sendall(
                b"POST /imageapi/v1/mount/overlay HTTP/1.1\r\nHost: t\r\n"
                b"Content-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body) + body[:5]
            )
            time.sleep(0.3)
            proc.popen.send_signal(signal.SIGTERM)
            proc.wait_for("SIGTERM")
            time.sleep(0.5)
            assert proc.popen.poll() is None, "exited with a request in flight"
            # New connections are refused once shutdown began.
            with pytest.raises(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
            conn.sendall(body[5:])
            reply = b""
            while chunk := conn.recv(65536):
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 404"), reply
        assert b'"code": 404' in reply
        assert proc.popen.wait(20) == 0, proc.log
    finally:
        code = proc.stop()
    assert code == 0, proc.log
    assert not sock_path.exists(), "the unix socket was left behind"
    assert "Traceback" not in proc.log, proc.log


def test_sigint_exits_zero(tmp_path: Path) -> None:
    proc = spawn(tmp_path, "--scheme", "unix", "--socket-path", str(tmp_path / "s.sock"))
    proc.wait_for("accepting connections on")
    proc.popen.send_signal(signal.SIGINT)
    assert proc.popen.wait(20) == 0, proc.log
    assert not (tmp_path / "s.sock").exists()


def test_stale_socket_is_replaced_and_a_live_one_is_not(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: what a killed server leaves
    os.chmod(path, 0o666)
    first = spawn(tmp_path, "--scheme", "unix", "--socket-path", str(path))
    try:
        first.wait_for("accepting connections on")
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        second = spawn(tmp_path, "--scheme", "unix", "--socket-path", str(path))
        assert second.popen.wait(30) == 1
        second.drained.wait(5)
        assert "another server is listening" in second.log
        transport = httpx.HTTPTransport(uds=str(path))
        with httpx.Client(transport=transport, base_url="http://x" + BASE) as client:
            assert client.get("/attach/rbd").status_code == 200
    finally:
        assert first.stop() == 0, first.log
    assert not path.exists()


def test_bad_tls_files_fail_at_start(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    proc = spawn(
        tmp_path, "--scheme", "https", "--tls-port", str(free_port()),
        "--tls-certificate", str(missing), "--tls-key", str(missing),
    )  # fmt: skip
    assert proc.popen.wait(30) == 1
    proc.drained.wait(5)
    assert "cannot serve" in proc.log, proc.log


def test_https_without_certificate_is_a_usage_error(tmp_path: Path) -> None:
    proc = spawn(tmp_path, "--scheme", "https")
    assert proc.popen.wait(30) == 2
    proc.drained.wait(5)
    assert "--tls-certificate" in proc.log
