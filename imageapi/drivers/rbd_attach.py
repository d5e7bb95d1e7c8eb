"""Attach (map) a Ceph RBD image: the `attach/rbd` kind, over one of two drivers.

- `krbd` (`rbd_krbd`): the kernel's rbd module, through /sys/bus/rbd.
- `user` (`rbd_user`): librbd in user space behind a FUSE file, with a loop device over it,
  for kernels without krbd (nor nbd nor ublk) but with FUSE and loop devices.

The daemon's `--rbd-driver` (auto: krbd when the rbd sysfs directory exists, else user)
chooses the driver of new attachments; an attachment made by the other one (the daemon
restarted with another setting) is still found again, shown and detached by its own, which
its record names. The API is the same for both: `device_file` is the block device to mount,
`device_id` identifies the mapping (rbdN's N, or loopN's).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from imageapi.drivers.base import Node, Spec, State
from imageapi.drivers.rbd_krbd import KrbdAttach
from imageapi.drivers.rbd_spec import RbdBase
from imageapi.drivers.rbd_user import UserRbdAttach
from imageapi.journal import Intent, Journal, NoJournal

DRIVERS = ("krbd", "user")


def choose(setting: str, rbd_sysfs: Path) -> tuple[str, str]:
    """The driver for `--rbd-driver SETTING`, and why (for the startup log)."""
    if setting != "auto":
        return setting, f"--rbd-driver {setting}"
    if rbd_sysfs.exists():
        return "krbd", f"auto: {rbd_sysfs} exists"
    return "user", f"auto: {rbd_sysfs} does not exist (no krbd)"


class RbdAttach(RbdBase):
    def __init__(self, krbd: KrbdAttach, user: UserRbdAttach, active: str) -> None:
        self.drivers: dict[str, RbdBase] = {"krbd": krbd, "user": user}
        if active not in self.drivers:
            raise ValueError(f"unknown rbd driver {active!r}")
        self.active = active
        self._journal: Journal = NoJournal()

    # The registry hands these to the driver it knows: the two that do the work need them.
    @property  # type: ignore[override]
    def journal(self) -> Journal:
        return self._journal

    @journal.setter
    def journal(self, journal: Journal) -> None:
        self._journal = journal
        for driver in self.drivers.values():
            driver.journal = journal

    def _of(self, node: Node) -> RbdBase:
        # Records from before there were two drivers are krbd's.
        return self.drivers[node.record.get("driver", "krbd")]

    @property
    def user(self) -> UserRbdAttach:
        return self.drivers["user"]  # type: ignore[return-value]

    @property
    def krbd(self) -> KrbdAttach:
        return self.drivers["krbd"]  # type: ignore[return-value]

    def normalize(self, spec: Spec) -> Spec:
        out = super().normalize(spec)
        if self.active == "user":
            self.user.check_options(out)
        return out

    def check_available(self, spec: Spec) -> None:
        self.drivers[self.active].check_available(spec)

    def build(self, node: Node) -> State:
        return {**self.drivers[self.active].build(node), "driver": self.active}

    def destroy(self, node: Node, force: bool = False) -> None:
        self._of(node).destroy(node, force)

    def adopt(self, node: Node) -> str | None:
        return self._of(node).adopt(node)

    def known(self, node: Node) -> None:
        self._of(node).known(node)

    def undo(self, intent: Intent, held: Callable[[str, Any], bool]) -> str | None:
        for driver in self.drivers.values():
            done = driver.undo(intent, held)
            if done:
                return done
        return None

    def sweep_orphans(self, recorded: set[str], unmounted: list[str]) -> list[str]:
        return [*self.krbd.sweep_orphans(recorded, unmounted),
                *self.user.sweep_orphans(recorded, unmounted)]
