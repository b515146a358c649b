# syntax=docker/dockerfile:1
# blobmount sidecar: mounts one blob archive at $BLOBMOUNT_MOUNTPOINT and shares it with the pod or
# host through mount propagation. Every RUN, the ENTRYPOINT and the HEALTHCHECK call scripts in
# docker/. tests/fuse/test_sidecar.py lints this file with hadolint, runs those scripts in a fresh
# venv, and builds and runs the image with podman from a base bootstrapped by mmdebstrap
# (BASE=localhost/debian:bookworm: the same distribution as the default, built locally).
#
# Runs as root inside the container: mounting FUSE needs CAP_SYS_ADMIN and /dev/fuse
# (docker run --device /dev/fuse --cap-add SYS_ADMIN). The non-root variant, where a privileged
# helper opens /dev/fuse and mounts, is described in the README ("Container sidecar").
ARG BASE=debian:bookworm-slim

FROM ${BASE} AS build
# PIP_CERT: a CA bundle for pip in this stage (bind-mounted by the build, e.g. a host's own CAs)
ARG PIP_CERT
WORKDIR /src
COPY . /src
RUN ["/src/docker/build-wheels.sh", "/src", "/wheels"]

FROM ${BASE}
COPY docker/install-runtime.sh docker/entrypoint.sh docker/healthcheck.sh /usr/local/lib/blobmount/
# the wheels are bind-mounted from the build stage, so they never become a layer of this image
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    ["/usr/local/lib/blobmount/install-runtime.sh", "/wheels", "/opt/blobmount"]
ENV PATH=/opt/blobmount/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MALLOC_ARENA_MAX=2 \
    BLOBMOUNT_MOUNTPOINT=/mnt/blob \
    BLOBMOUNT_CACHE_DIR=/var/cache/blobmount
VOLUME ["/var/cache/blobmount"]
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["/usr/local/lib/blobmount/healthcheck.sh"]
ENTRYPOINT ["/usr/local/lib/blobmount/entrypoint.sh"]
