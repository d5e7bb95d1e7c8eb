"""The daemon's state: settings, the drivers of every kind, and the object graph over them."""

from __future__ import annotations

import logging
import os
import threading

from imageapi.config import Settings
from imageapi.drivers.bind_mount import BindMount
from imageapi.drivers.container import ContainerDriver
from imageapi.drivers.loopback_attach import LoopbackAttach
from imageapi.drivers.overlay_mount import OverlayMount
from imageapi.drivers.rbd_attach import RbdAttach
from imageapi.drivers.rbd_mount import LoopbackMount, RbdMount
from imageapi.graph import Registry
from imageapi.runtime import cgroups
from imageapi.runtime.client import Helper

log = logging.getLogger(__name__)


class Service:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        for path in (settings.run_dir, settings.mounts, settings.logs):
            os.makedirs(path, mode=0o700, exist_ok=True)
        cgroup_root = settings.cgroup_root or cgroups.default_root()
        if cgroup_root is None:
            log.warning("no cgroup2 hierarchy: containers get no cgroup of their own")
        self.cgroups = cgroups.CgroupTree(cgroup_root) if cgroup_root else None
        self._helper: Helper | None = None
        self._helper_lock = threading.Lock()
        self.helper()  # pre-start it: the first container should not wait for it
        self.registry = Registry(
            [
                RbdAttach(settings.rbd_sysfs, settings.dev_dir, settings.device_timeout),
                LoopbackAttach(),
                RbdMount(settings.mounts),
                LoopbackMount(settings.mounts),
                BindMount(settings.mounts),
                OverlayMount(settings.mounts),
                ContainerDriver(settings.logs, self.helper, self.cgroups, settings.stop_timeout),
            ]
        )

    def helper(self) -> Helper:
        """The container helper process, (re)started when needed."""
        with self._helper_lock:
            if self._helper is None or not self._helper.alive():
                if self._helper is not None:
                    log.error("the container helper died; starting a new one")
                self._helper = Helper()
            return self._helper

    def close(self) -> None:
        """On daemon exit: end the helper; running containers and mounts are left alone."""
        with self._helper_lock:
            if self._helper is not None:
                self._helper.close()
                self._helper = None
        if self.cgroups is not None:
            self.cgroups.close()
