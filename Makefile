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
# patch: applies patches/pyfuse3-*.patch to the pyfuse3 sdist (libfuse3-dev pkg-config gcc python3-dev build it)
APT_PACKAGES := fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv docker-registry systemd patch \
  squashfuse squashfs-tools httpfs2 nginx-light curl git openssl sqlite3 unzip rsync zstd iproute2 iptables \
  podman buildah runc mmdebstrap uidmap fuse-overlayfs
MNT ?= /tmp/blobmount-sample
SAMPLE_ARCHIVE ?= /tmp/blobmount-sample-archive

.PHONY: run test deps venv gen lint check-gen bench umount clean install pyfuse3

# pyfuse3, patched: its read/flush/release/readdir/releasedir handlers also get the inode
# (Operations.pass_inode), which the kernel's no-open/no-opendir mode needs (fh is 0 there; fs.py).
# Built from the pinned sdist (sha256 checked) with a pinned Cython; offered upstream as it is.
PYFUSE3_VERSION := 3.5.0
PYFUSE3_SHA256 := 88399a9494b88603230bba300f4ba9ad63fece5ed514ca3633d555a0c6a42b24
PYFUSE3_PATCH := patches/pyfuse3-$(PYFUSE3_VERSION)-pass-inode.patch
PYFUSE3_BUILD := build/pyfuse3
PYFUSE3_STAMP := $(VENV)/.pyfuse3-$(PYFUSE3_VERSION)-pass-inode

deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	  if [ -n "$$missing" ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  fi; \
	fi

$(BIN)/python:
	$(PY) -m venv $(VENV)

venv: deps $(BIN)/python $(PYFUSE3_STAMP)
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/python -c "import pyfuse3; assert 'pass_inode' in vars(pyfuse3.Operations), 'pyfuse3 is not the patched build'"

pyfuse3: $(PYFUSE3_STAMP)

$(PYFUSE3_STAMP): $(PYFUSE3_PATCH) patches/pyfuse3-build-constraints.txt | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	rm -rf $(PYFUSE3_BUILD) && mkdir -p $(PYFUSE3_BUILD)
	$(BIN)/pip download -q --no-deps --no-binary :all: pyfuse3==$(PYFUSE3_VERSION) -d $(PYFUSE3_BUILD)
	echo "$(PYFUSE3_SHA256)  $(PYFUSE3_BUILD)/pyfuse3-$(PYFUSE3_VERSION).tar.gz" | sha256sum -c --quiet
	tar -xzf $(PYFUSE3_BUILD)/pyfuse3-$(PYFUSE3_VERSION).tar.gz -C $(PYFUSE3_BUILD)
	patch -s -d $(PYFUSE3_BUILD)/pyfuse3-$(PYFUSE3_VERSION) -p1 < $(PYFUSE3_PATCH)
	PIP_CONSTRAINT="$(CURDIR)/patches/pyfuse3-build-constraints.txt" \
	  $(BIN)/pip install -q --force-reinstall --no-deps $(PYFUSE3_BUILD)/pyfuse3-$(PYFUSE3_VERSION)
	touch $@

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
