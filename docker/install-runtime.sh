#!/bin/sh
# Runtime stage of the sidecar image (Dockerfile) and of tests/fuse/test_sidecar.py: fuse3 (for
# fusermount3, which unmounts cleanly), Debian's python3 and a private virtualenv in PREFIX holding
# blobmount, installed offline from the wheels build-wheels.sh made.
#   usage: install-runtime.sh WHEELS_DIR PREFIX        (PYTHON overrides the interpreter)
set -eu
wheels=${1:?usage: install-runtime.sh WHEELS_DIR PREFIX}
prefix=${2:?usage: install-runtime.sh WHEELS_DIR PREFIX}
python=${PYTHON:-python3}

need=""
for pkg in fuse3 libfuse3-3 python3 python3-venv; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need="$need $pkg"
done
if [ -n "$need" ]; then
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        echo "install-runtime.sh: missing runtime packages:$need" >&2
        exit 1
    fi
    apt-get update -qq
    # shellcheck disable=SC2086  # word splitting of the package list is intended
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $need
    rm -rf /var/lib/apt/lists/*
fi

"$python" -m venv "$prefix"
"$prefix/bin/pip" install --quiet --no-cache-dir --no-index --find-links "$wheels" blobmount
"$prefix/bin/blobmount" --version
