"""The daemon's state: settings, the drivers of every kind, and the object graph over them."""

from __future__ import annotations

import os

from imageapi.config import Settings
from imageapi.drivers.overlay_mount import OverlayMount
from imageapi.drivers.rbd_attach import RbdAttach
from imageapi.drivers.rbd_mount import RbdMount
from imageapi.graph import Registry


class Service:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        for path in (settings.run_dir, settings.mounts, settings.logs):
            os.makedirs(path, mode=0o700, exist_ok=True)
        self.registry = Registry(
            [
                RbdAttach(settings.rbd_sysfs, settings.dev_dir, settings.device_timeout),
                RbdMount(settings.mounts),
                OverlayMount(settings.mounts),
            ]
        )
