#!/bin/sh
# Builder stage of the sidecar image (Dockerfile) and of tests/fuse/test_sidecar.py: build the
# blobmount wheel and wheels of all its dependencies into WHEELS, so the runtime stage installs
# offline and needs no compiler. pyfuse3 ships no binary wheel: it is compiled here against
# libfuse3-dev. pip runs in a throwaway venv, so a plain Debian python3 (no pip) is enough.
#   usage: build-wheels.sh SRC_DIR WHEELS_DIR        (PYTHON overrides the interpreter)
set -eu
src=${1:?usage: build-wheels.sh SRC_DIR WHEELS_DIR}
wheels=${2:?usage: build-wheels.sh SRC_DIR WHEELS_DIR}
python=${PYTHON:-python3}

# Build-time packages, installed only where missing (as root with apt: the image, a Debian host).
need=""
for pkg in python3 python3-venv python3-dev gcc libc6-dev libfuse3-dev pkg-config; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need="$need $pkg"
done
if [ -n "$need" ]; then
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        echo "build-wheels.sh: missing build packages:$need" >&2
        exit 1
    fi
    apt-get update -qq
    # shellcheck disable=SC2086  # word splitting of the package list is intended
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $need
    rm -rf /var/lib/apt/lists/*
fi

mkdir -p "$wheels"
venv=$(mktemp -d)
trap 'rm -rf "$venv"' EXIT
"$python" -m venv "$venv"
"$venv/bin/pip" wheel --quiet --no-cache-dir --wheel-dir "$wheels" "$src"
ls "$wheels"
