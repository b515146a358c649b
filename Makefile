# One entry point for people and CI. `make run` and `make test` install what they need on a fresh
# Debian machine (as root): apt packages, a virtualenv in .venv, the project.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# squashfuse squashfs-tools httpfs2 nginx-light curl git: the peers of the benchmark smoke test (< 2 MB);
# openssl: the test token issuer signs JWTs with its CLI (no crypto dependency); zstd: bench.create_throughput's tar peer
# git sqlite3 unzip rsync (and gcc, tar): the programs tests/fuse/test_real_programs.py runs on a mount
# iproute2 iptables: bench/netshape, the shaped namespace of the benchmark (tests/bench/test_netshape.py)
# podman buildah runc mmdebstrap uidmap fuse-overlayfs: tests/fuse/test_sidecar.py builds and runs the image
APT_PACKAGES := fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv docker-registry systemd \
  squashfuse squashfs-tools httpfs2 nginx-light curl git openssl sqlite3 unzip rsync zstd iproute2 iptables \
  podman buildah runc mmdebstrap uidmap fuse-overlayfs
MNT ?= /tmp/blobmount-sample
SAMPLE_ARCHIVE ?= /tmp/blobmount-sample-archive

.PHONY: run test deps venv gen lint check-gen bench umount clean install

deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	  if [ -n "$$missing" ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  fi; \
	fi

$(BIN)/python:
	$(PY) -m venv $(VENV)

venv: deps $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'

# Builds a sample archive from examples/sample and mounts it (embedded default, no registry needed).
run: venv
	$(BIN)/blobmount create examples/sample $(SAMPLE_ARCHIVE)
	@mkdir -p $(MNT)
	@if mountpoint -q $(MNT); then fusermount3 -u $(MNT); fi
	$(BIN)/blobmount $(SAMPLE_ARCHIVE) $(MNT)
	@echo "--- mounted at $(MNT):"; find $(MNT) | sort; echo "--- $(MNT)/README.txt:"; cat $(MNT)/README.txt
	@echo "--- unmount with: fusermount3 -u $(MNT)   (or: make umount)"

umount:
	fusermount3 -u $(MNT)

test: venv
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

gen:
	$(BIN)/flatc --python --gen-onefile -o blobmount/index/_fb schema/index.fbs

# The whole benchmark suite (as root): installs its peers (apt, the `bench` extra), builds the
# datasets into bench/.cache, writes bench/results/<date>.{json,md} and plots. BENCH_ARGS=--quick etc.
bench: venv
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info

# System install: a private venv under $(PREFIX)/lib/blobmount, console scripts linked into
# $(PREFIX)/bin, the mount(8) helper into $(SBINDIR), the unit template into $(UNITDIR) (its
# ExecStart pointed at $(PREFIX)/bin). tests/unit/test_make_install.py installs into temp dirs.
PREFIX ?= /usr/local
SBINDIR ?= /sbin
UNITDIR ?= /etc/systemd/system
install: deps
	$(PY) -m venv $(PREFIX)/lib/blobmount/venv
	$(PREFIX)/lib/blobmount/venv/bin/pip install -q .
	install -d $(PREFIX)/bin $(SBINDIR)
	ln -sf $(PREFIX)/lib/blobmount/venv/bin/blobmount $(PREFIX)/bin/blobmount
	ln -sf $(PREFIX)/lib/blobmount/venv/bin/mount.fuse.blobmount $(SBINDIR)/mount.fuse.blobmount
	install -d $(UNITDIR)
	sed 's|/usr/local/bin/blobmount|$(PREFIX)/bin/blobmount|' systemd/blobmount@.service > $(UNITDIR)/blobmount@.service
	chmod 0644 $(UNITDIR)/blobmount@.service
	install -D -m 0644 systemd/mnt-assets.mount $(PREFIX)/share/doc/blobmount/mnt-assets.mount.example
