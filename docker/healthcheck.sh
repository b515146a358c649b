#!/bin/sh
# The sidecar's HEALTHCHECK: healthy only while the mount answers statvfs through the kernel, which
# always reaches the daemon (a plain stat may be answered from the kernel's attribute cache).
#   usage: healthcheck.sh [MOUNTPOINT]        (default $BLOBMOUNT_MOUNTPOINT)
set -eu
mnt=${1:-${BLOBMOUNT_MOUNTPOINT:?healthcheck.sh: no mountpoint (argument or BLOBMOUNT_MOUNTPOINT)}}
mountpoint -q "$mnt" || { echo "healthcheck: $mnt is not mounted" >&2; exit 1; }
timeout -k 2 5 stat -f "$mnt" >/dev/null || { echo "healthcheck: $mnt does not answer" >&2; exit 1; }
