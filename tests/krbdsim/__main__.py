"""`python -m tests.krbdsim --sysfs MOUNTPOINT --devdir DIR --cluster DIR [--no-single-major]`

Runs in the foreground, prints `ready` on stdout once the mount is live, and on SIGTERM/SIGINT
unmounts, reports (on stderr) and detaches any device still mapped, and exits 0.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .fusefs import serve
from .sim import Simulator


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.krbdsim",
        description="Simulate the kernel rbd driver's /sys/bus/rbd over FUSE with loop devices.",
    )
    parser.add_argument("--sysfs", required=True, type=Path, help="where to mount the bus dir")
    parser.add_argument("--devdir", required=True, type=Path, help="where rbd<N> nodes go")
    parser.add_argument("--cluster", required=True, type=Path, help="simulated cluster dir")
    parser.add_argument(
        "--no-single-major",
        dest="single_major",
        action="store_false",
        help="behave as rbd loaded with single_major=N (plain add/remove only)",
    )
    args = parser.parse_args(argv)
    for what, path in (("--sysfs", args.sysfs), ("--devdir", args.devdir)):
        if not path.is_dir():
            parser.error(f"{what} {path}: not a directory")
    if not (args.cluster / "cluster.json").is_file():
        parser.error(f"--cluster {args.cluster}: no cluster.json")

    sysfs = args.sysfs.resolve()
    sim = Simulator(args.cluster.resolve(), args.devdir.resolve(), args.single_major)
    status = 0
    try:
        serve(sim, str(sysfs))
    except RuntimeError as exc:
        print(f"krbdsim: libfuse failed (fuse_main status {exc})", file=sys.stderr, flush=True)
        status = 1
    finally:
        # Runs after libfuse has unmounted (or failed to mount): never leave loops behind.
        sim.shutdown()
    return status


if __name__ == "__main__":
    sys.exit(main())
