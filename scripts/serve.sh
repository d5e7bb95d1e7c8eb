#!/usr/bin/env bash
# Runs imageapi on a Debian 12 machine, as root: on first use installs what it needs (into
# ./.venv) and builds an example system image to try it on; then starts the server.
# Arguments go to imageapi-server, e.g. --scheme http --port 8080 (without --scheme it serves
# only the root-only unix socket /var/run/imageapi.sock; README.md, "Security").
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh

if [ ! -x .venv/bin/imageapi-server ]; then
  ensure_venv ""
fi
# The user-space rbd driver (kernels without krbd): Ceph's Python bindings, FUSE.
ensure_debs python3-rados python3-rbd fuse3
example_dir=${IMAGEAPI_EXAMPLE_DIR:-/var/lib/imageapi/examples}
ensure_example_image "$example_dir"
echo "example image: $example_dir/busybox.sqsh" >&2
load_modules rbd overlay squashfs loop fuse
exec .venv/bin/imageapi-server "$@"
