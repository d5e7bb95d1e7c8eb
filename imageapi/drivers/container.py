"""Containers: a system image (a mount) booted in its own namespaces.

A container stands on one mount (referenced by id, or defined inline and then owned). Its
process life lives in `imageapi.runtime.lifecycle.Container`; this driver checks requests,
builds that object and maps the API's state requests onto it.
"""

from __future__ import annotations

import logging
import os
import re
import select
import shlex
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

from imageapi.drivers import checks
from imageapi.drivers.base import Driver, Need, Node, Record, Spec, State
from imageapi.drivers.generic import generic_need
from imageapi.errors import BadRequest
from imageapi.journal import Intent
from imageapi.kernel import seccomp
from imageapi.kernel.ns import NAMESPACE_FLAGS
from imageapi.runtime.cgroups import CgroupTree
from imageapi.runtime.client import Helper
from imageapi.runtime.lifecycle import ALWAYS, Container, Plan
from imageapi.runtime.logfile import ContainerLog

# Bounded so that a request costs little to split and always fits the helper's messages.
MAX_COMMAND = 16384  # bytes, UTF-8
# C0 controls and DEL, but tab and newline (whitespace to the shell-like split). NUL can never
# reach execve; the others are no part of a command line.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
CREATE_STATES = ("created", "running")
TARGET_STATES = ("running", "exited")
UNSUPPORTED_NAMESPACES = {"user": "user namespaces are not supported (mounting needs real root)"}
PROFILES = ("node", "confined")  # what the container's root may do: README, "Security"

log = logging.getLogger(__name__)


class ContainerDriver(Driver):
    collection = "container"
    kind = "container"
    noun = "container"
    claimed_as = "taken"
    shows_refs = False
    always_adopt = True

    def __init__(
        self,
        log_dir: Path,
        helper: Callable[[], Helper],
        cgroups: CgroupTree | None,
        stop_timeout: float,
    ) -> None:
        self.log_dir = log_dir
        self.helper = helper
        self.cgroups = cgroups
        self.stop_timeout = stop_timeout
        self.adopted: set[int] = set()  # ids of the containers found in the record
        self._killed: set[int] = set()  # orphans killed at recovery
        self.deferred: list[Callable[[], None]] = []  # acks, once recovery has recorded all

    def normalize(self, spec: Spec) -> Spec:
        out: Spec = {"mount": spec.get("mount")}
        generic_need(out["mount"], "mount")
        command = spec.get("command")
        if not isinstance(command, str) or not command.strip():
            raise BadRequest("command: required, the entrypoint and its arguments")
        _check_command(command)
        try:
            argv = shlex.split(command)
        except ValueError as exc:
            raise BadRequest(f"command: cannot be split like a shell line: {exc}") from None
        if not argv:
            raise BadRequest("command: is empty")
        out["command"] = command
        out["argv"] = argv
        name = spec.get("name")
        if name not in (None, ""):
            out["name"] = checks.plain_name(name, "name", max_len=64)
            if out["name"].startswith((".", "-")) or ":" in out["name"] or "+" in out["name"]:
                raise BadRequest(f"name: {name!r} is not a valid container name")
        systemd = spec.get("systemd", False)
        if not isinstance(systemd, bool):
            raise BadRequest("systemd: must be true or false")
        out["systemd"] = systemd
        state = spec.get("state", "created")
        if state not in CREATE_STATES:
            raise BadRequest(f"state: a new container is 'created' or 'running', not {state!r}")
        out["state"] = state  # what to build: "running" starts it as part of the create
        namespaces = spec.get("namespaces")
        if namespaces is not None:
            if not isinstance(namespaces, list):
                raise BadRequest("namespaces: must be an array of namespace names")
            for ns in namespaces:
                if ns not in NAMESPACE_FLAGS:
                    known = ", ".join(sorted(NAMESPACE_FLAGS))
                    raise BadRequest(f"namespaces: unknown namespace {ns!r} (known: {known})")
                if ns in UNSUPPORTED_NAMESPACES:
                    raise BadRequest(f"namespaces: {UNSUPPORTED_NAMESPACES[ns]}")
        out["namespaces"] = namespaces
        out["profile"], out["namespaces"] = _profile(spec.get("profile", "node"), systemd,
                                                     namespaces)
        return out

    def needs(self, spec: Spec) -> list[Need]:
        return [generic_need(spec["mount"], "mount")]

    def claim(self, spec: Spec) -> Hashable | None:
        return self.name_claim(spec["name"]) if "name" in spec else None

    def name_claim(self, name: str) -> Hashable:
        return ("container-name", name)

    def describe_claim(self, claim: Hashable) -> str:
        return f"the name {claim[1]!r}"  # type: ignore[index]

    def _container(self, node: Node) -> Container:
        spec = node.spec
        mount = node.needs[0][1]
        extra = [ns for ns in spec["namespaces"] or [] if ns not in ALWAYS]
        plan = Plan(
            cid=node.id,
            root=mount.record["mountpoint"],
            argv=spec["argv"],
            exe=spec["argv"][0],
            hostname=spec.get("name") or f"container-{node.id}",
            systemd=spec["systemd"],
            namespaces=extra,
            profile=spec.get("profile", "node"),
        )
        log_path = node.record.get("log")
        container = Container(
            plan,
            helper=self.helper,
            cgroups=self.cgroups,
            log_file=ContainerLog(self.log_dir, node.id, Path(log_path) if log_path else None),
            stop_timeout=self.stop_timeout,
            on_change=lambda event: self.on_change(node, event),
            step=lambda effect, **detail: self.step(node.id, effect, **detail),
        )
        node.live["container"] = container
        return container

    def build(self, node: Node) -> State:
        container = self._container(node)
        container.check(quiet=True)  # refuse now what a start would refuse
        container.log.event("container created")
        if node.spec.get("state") == "running":
            # One operation of the graph: the container is committed running, or not at all
            # (a failed start undoes its own work; the graph releases its inline mount).
            container.start()
        return container.record()

    def record_of(self, node: Node) -> Record:
        container: Container | None = node.live.get("container")
        return container.record() if container is not None else node.record

    def known(self, node: Node) -> None:
        self.adopted.add(node.id)  # recorded: never an orphan, whatever its state

    def adopt(self, node: Node) -> str | None:
        self.adopted.add(node.id)
        self._container(node).adopt(node.record, self.helper(), self.deferred.append)
        return None  # a container is never gone: one whose process ended is exited or dead

    def undo(self, intent: Intent, held: Callable[[str, Any], bool]) -> str | None:
        if intent.effect == "spawn":
            greeting = self.helper().greeting
            cid = intent.node_id
            if cid in greeting.running or cid in greeting.starting:
                self._kill_orphan(cid)
                return f"killed its init (container {cid})"
        if intent.effect == "cgroup" and intent.outcome and self.cgroups is not None:
            path = Path(intent.outcome.get("path", ""))
            if path.is_dir() and not held("cgroup", str(path)):
                self.cgroups.remove(path)
                return f"removed cgroup {path}"
        return None

    def sweep_orphans(self, recorded: set[str]) -> list[str]:
        """Containers the helper runs for ids no record knows, and cgroups under our root that
        no container records: what a crash left of a start that was never committed."""
        done = []
        helper = self.helper()
        for cid in sorted({*helper.greeting.running, *helper.greeting.starting}):
            if cid not in self.adopted and cid not in self._killed:
                self._kill_orphan(cid)
                done.append(f"container process of unknown container {cid} (killed)")
        for cid in sorted(set(helper.greeting.ended) - self.adopted):
            ended = helper.greeting.ended[cid]
            self.deferred.append(lambda c=cid, p=ended["pid"]: helper.ack(c, p))
        if self.cgroups is not None and self.cgroups.root.is_dir():
            for path in sorted(self.cgroups.root.iterdir()):
                if path.is_dir() and str(path) not in recorded:
                    try:
                        self.cgroups.remove(path)
                        done.append(f"cgroup {path}")
                    except OSError as exc:
                        log.error("cannot remove cgroup %s: %s", path, exc)
        return done

    def _kill_orphan(self, cid: int, patience: float = 5.0) -> None:
        """SIGKILL (through the helper) a container no record knows, and wait for it to end:
        what it holds must be free before recovery tears down what it stood on."""
        helper = self.helper()
        pid = helper.greeting.running.get(cid)
        try:
            pidfd = os.pidfd_open(pid) if pid is not None else None
        except ProcessLookupError:
            pidfd = None
        helper.kill(cid)
        self._killed.add(cid)
        if pidfd is not None:
            poller = select.poll()  # readable once it has ended
            poller.register(pidfd, select.POLLIN)
            poller.poll(int(patience * 1000))
            os.close(pidfd)

    def change(self, node: Node, target: str) -> None:
        container: Container = node.live["container"]
        if target == "running":
            container.start()
        elif target == "exited":
            container.stop(wait=False)
        else:
            allowed = " or ".join(TARGET_STATES)
            raise BadRequest(f"state: a container can be asked to be {allowed}, not {target!r}")

    def destroy(self, node: Node, force: bool = False) -> None:
        container: Container | None = node.live.get("container")
        if container is not None:
            container.remove(kill=force)

    def render(self, node: Node, embed: Callable[[Node], dict[str, Any]]) -> dict[str, Any]:
        spec = node.spec
        container: Container = node.live["container"]
        mount = node.needs[0][1]
        ref: dict[str, Any] = {"kind": mount.kind, "mount_id": mount.id}
        if node.owns(mount):
            ref[mount.kind] = embed(mount)
        view: dict[str, Any] = {"id": node.id}
        if "name" in spec:
            view["name"] = spec["name"]
        view.update(
            command=spec["command"],
            mount=ref,
            systemd=spec["systemd"],
            namespaces=spec["namespaces"],
            profile=spec.get("profile", "node"),
            state=container.state,
            logfile=str(container.log.path),
        )
        if container.pid is not None:
            view["pid"] = container.pid
        return view


def _profile(
    profile: Any, systemd: bool, namespaces: list[str] | None
) -> tuple[str, list[str] | None]:
    """The profile, and the namespaces it implies: a confined container always has a network
    namespace of its own, since on the host's its 127.0.0.1 is the one this API listens on."""
    if profile not in PROFILES:
        raise BadRequest(f"profile: {profile!r} is not a profile (known: {', '.join(PROFILES)})")
    if profile == "node":
        return profile, namespaces
    if systemd:
        raise BadRequest("profile: a confined container cannot run systemd, which needs "
                         "CAP_SYS_ADMIN and mount(2); use the node profile")
    if not seccomp.supported():
        raise BadRequest("profile: confined containers need a seccomp deny-list for this "
                         "architecture, and there is none (x86_64 and aarch64 have one)")
    if namespaces is None or "net" not in namespaces:
        namespaces = [*(namespaces or []), "net"]
    return profile, namespaces


def _check_command(command: str) -> None:
    try:
        size = len(command.encode("utf-8"))
    except UnicodeEncodeError:
        raise BadRequest("command: not valid UTF-8 (a lone surrogate)") from None
    if size > MAX_COMMAND:
        raise BadRequest(f"command: {size} bytes long; at most {MAX_COMMAND} are allowed")
    bad = _CONTROL.search(command)
    if bad:
        raise BadRequest(
            f"command: control character {bad.group()!r} at offset {bad.start()}; "
            "a command line holds none but tab and newline"
        )
