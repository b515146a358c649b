#!/bin/sh
# The sidecar's ENTRYPOINT: blobmount in the foreground, configured by BLOBMOUNT_* variables
# (BLOBMOUNT_SOURCE, BLOBMOUNT_MOUNTPOINT, BLOBMOUNT_CACHE_SIZE, ...) and/or by the container's
# arguments, which are blobmount flags (flags win over variables). exec: blobmount itself receives
# SIGTERM from the container runtime, unmounts and exits 0.
set -eu
if [ -n "${BLOBMOUNT_MOUNTPOINT:-}" ]; then
    mkdir -p "$BLOBMOUNT_MOUNTPOINT"
fi
exec blobmount mount --foreground "$@"
