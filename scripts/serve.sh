#!/usr/bin/env bash
# Installs imageapi into ./.venv if needed (Debian 12, as root) and runs the server.
# Arguments go to imageapi-server, e.g. --scheme http --port 8080.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh

if [ ! -x .venv/bin/imageapi-server ]; then
  ensure_venv ""
fi
load_modules rbd overlay squashfs loop
exec .venv/bin/imageapi-server "$@"
