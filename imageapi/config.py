"""Daemon settings: where things live on the host and how long to wait for the kernel.

Everything a test must redirect (the run directory, the rbd sysfs root, the device directory)
is a setting, so a test never touches the host's real `/var/run/imageapi` or `/sys/bus/rbd`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_RUN_DIR = Path("/var/run/imageapi")


@dataclass(frozen=True)
class Settings:
    run_dir: Path = DEFAULT_RUN_DIR
    # None means "<run_dir>/mounts" and "<run_dir>/logs".
    mount_dir: Path | None = None
    log_dir: Path | None = None
    rbd_sysfs: Path = Path("/sys/bus/rbd")
    # auto (krbd when rbd_sysfs exists, else user), krbd, or user (librbd through FUSE).
    rbd_driver: str = "auto"
    dev_dir: Path = Path("/dev")
    # How long to wait for udev (or the simulator) to create /dev/rbdN after a map.
    device_timeout: float = 10.0
    # How long a stopping container gets between its stop signal and SIGKILL.
    stop_timeout: float = 10.0
    # cgroup2 directory holding one cgroup per running container; None: our own cgroup's
    # "imageapi" child.
    cgroup_root: Path | None = None
    # Keep the durable record (`<run_dir>/state.db`); off only for benchmarks: a restart then
    # forgets everything.
    durable: bool = True
    # Seconds recovery may take, for the whole run, before the daemon serves anyway.
    recovery_budget: float = 30.0
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Resolved once: records, mountinfo and the sweeps of recovery must all name a path
        # the same way (/var/run is a symlink to /run; a relative --run-dir is relative).
        for name in ("run_dir", "mount_dir", "log_dir"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(os.path.abspath(value)).resolve())

    @property
    def mounts(self) -> Path:
        return self.mount_dir or self.run_dir / "mounts"

    @property
    def logs(self) -> Path:
        return self.log_dir or self.run_dir / "logs"

    @property
    def state_db(self) -> Path:
        return self.run_dir / "state.db"
