# One entry point for people and CI. `make run` and `make test` install what they need on a fresh
# Debian machine (as root): apt packages, a virtualenv in .venv, the project.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
APT_PACKAGES := fuse3 libfuse3-dev pkg-config gcc python3-venv docker-registry systemd openssl
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

bench: venv
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) build *.egg-info

# System install: a private venv under $(PREFIX)/lib/blobmount, console scripts linked into
# $(PREFIX)/bin, the mount(8) helper into /sbin, the unit template into /etc/systemd/system.
PREFIX ?= /usr/local
install: deps
	$(PY) -m venv $(PREFIX)/lib/blobmount/venv
	$(PREFIX)/lib/blobmount/venv/bin/pip install -q .
	ln -sf $(PREFIX)/lib/blobmount/venv/bin/blobmount $(PREFIX)/bin/blobmount
	ln -sf $(PREFIX)/lib/blobmount/venv/bin/mount.fuse.blobmount /sbin/mount.fuse.blobmount
	install -D -m 0644 systemd/blobmount@.service /etc/systemd/system/blobmount@.service
	install -D -m 0644 systemd/mnt-assets.mount $(PREFIX)/share/doc/blobmount/mnt-assets.mount.example
