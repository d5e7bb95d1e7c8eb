# Sourced by the other scripts: install what imageapi needs on a Debian 12 machine, as root.

# ensure_debs PKG...: install the Debian packages that are not installed yet.
ensure_debs() {
  local missing=() pkg
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
      || missing+=("$pkg")
  done
  if ((${#missing[@]})); then
    echo "installing Debian packages: ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

# ensure_venv EXTRAS: a ./.venv with imageapi installed in editable mode (EXTRAS e.g. "[test]").
ensure_venv() {
  # python-prctl compiles against libcap.
  ensure_debs gcc libcap-dev python3-venv python3-dev
  if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
  fi
  .venv/bin/pip install -q --upgrade pip >/dev/null
  .venv/bin/pip install -q -e ".$1"
}

# load_modules MODULE...: best effort; built-in features need no module.
load_modules() {
  local module
  for module in "$@"; do modprobe -q "$module" 2>/dev/null || true; done
}
