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

# ensure_example_image DIR: DIR/busybox.sqsh, a tiny system image (Debian's busybox-static with
# every applet linked) to try imageapi on without any cluster.
ensure_example_image() {
  local dir=$1 image=$1/busybox.sqsh tree applet
  [ -f "$image" ] && return 0
  ensure_debs squashfs-tools busybox-static
  mkdir -p "$dir"
  tree=$(mktemp -d)
  mkdir -p "$tree"/{bin,dev,etc,proc,root,run,sys,tmp,var/tmp}
  cp /bin/busybox "$tree/bin/busybox"
  for applet in $(/bin/busybox --list); do
    [ "$applet" = busybox ] || ln -s busybox "$tree/bin/$applet"
  done
  printf 'NAME="imageapi example (busybox)"\nID=imageapi-example\n' > "$tree/etc/os-release"
  printf 'root:x:0:0:root:/root:/bin/sh\n' > "$tree/etc/passwd"
  printf 'root:x:0:\n' > "$tree/etc/group"
  mksquashfs "$tree" "$image.tmp" -noappend -quiet -all-root >/dev/null
  mv "$image.tmp" "$image"
  rm -rf "$tree"
}
