#!/usr/bin/env bash
# Runs the whole test suite from a fresh Debian 12 machine, as root: installs the Debian and
# Python packages the tests need, lints, then runs pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh

# debootstrap: the systemd test image; systemd-container: nspawn, the benchmark's peer;
# systemd: systemd-analyze checks the unit offline; curl, jq: README's walkthrough, run as written.
# ceph-mon, ceph-osd, ceph-common: the live cluster the user-space rbd driver is tested against
# (tests/cephcluster.py starts and stops it); python3-rados, python3-rbd: that driver's bindings.
ensure_debs squashfs-tools fuse3 libfuse3-3 util-linux busybox-static kmod debootstrap e2fsprogs \
  systemd-container systemd curl jq ceph-mon ceph-osd ceph-common python3-rados python3-rbd
load_modules loop squashfs overlay fuse
ensure_venv "[test]"

.venv/bin/ruff check imageapi tests bench
exec .venv/bin/python -m pytest "$@"
