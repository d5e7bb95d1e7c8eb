#!/usr/bin/env bash
# Runs the whole test suite from a fresh Debian 12 machine, as root: installs the Debian and
# Python packages the tests need, lints, then runs pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_packages=(
  squashfs-tools fuse3 libfuse3-3 util-linux busybox-static kmod
  gcc libcap-dev python3-venv python3-dev
)
missing=()
for pkg in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The kernel features the tests use; built in on some kernels, so failures are not fatal here
# (the tests themselves check what they need).
for module in loop squashfs overlay fuse; do modprobe -q "$module" 2>/dev/null || true; done

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip >/dev/null
.venv/bin/pip install -q -e '.[test]'

.venv/bin/ruff check imageapi tests bench
exec .venv/bin/python -m pytest "$@"
