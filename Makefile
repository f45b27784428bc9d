# bpfailover — every entry point a user or CI needs.
# `make setup` installs what a fresh Debian 12 machine lacks; re-running it is cheap.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
APT_PKGS := python3-bpfcc libbpfcc linux-headers-amd64 iproute2 iperf3 ethtool curl \
            python3-venv python3-yaml kmod procps bpftool iputils-ping systemd \
            prometheus prometheus-node-exporter buildah debootstrap systemd-container
STAMP := $(VENV)/.setup-stamp

.PHONY: setup demo test lint typecheck unit bench bench-quick clean

setup: $(STAMP) bpffs

$(STAMP): pyproject.toml lab/pyproject.toml Makefile requirements.lock
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "setup: installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@test -x $(PY) || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --require-hashes -r requirements.lock
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]' -e ./lab
	@touch $(STAMP)

bpffs:
	@mountpoint -q /sys/fs/bpf || mount -t bpf -o mode=700 bpf /sys/fs/bpf

.PHONY: bpffs

demo: setup
	$(VENV)/bin/failover-lab demo

lint: setup
	$(VENV)/bin/ruff check control lab tests bench
	$(VENV)/bin/ruff format --check control lab tests bench
	$(VENV)/bin/lint-imports

typecheck: setup
	$(VENV)/bin/mypy control/bpfailover lab/bpfailover_lab

test: setup lint typecheck container-image
	$(VENV)/bin/python -m pytest -q tests

# The failoverd image (Dockerfile) built with buildah; the debootstrap base and every layer
# are cached, so a rerun takes about a second. tests/test_container.py runs it in the lab.
container-image: setup
	scripts/container-image localhost/bpfailover:test

.PHONY: container-image

# The Debian package $(DEB_DIR)/bpfailover_<version>_amd64.deb (scripts/build-deb: a private
# venv in /opt/bpfailover made in a cached Debian 12 build root; a minute or two the first
# time).  Install: `apt install ./dist/bpfailover_*.deb` (docs/operators.md, "Install").
DEB_DIR ?= dist
deb: setup
	scripts/build-deb $(DEB_DIR)

.PHONY: deb

bench: setup
	$(PY) -m bench.run

bench-quick: setup
	$(PY) -m bench.run --quick

# Real drivers: kernel net_failover vs bpfailover in a QEMU (TCG) guest, side by side.
# The guest image is cached under /var/cache/bpfailover/pg (BPFAILOVER_PG_CACHE).
proving-ground: setup
	$(PY) -m bench.proving_ground

proving-ground-quick: setup
	$(PY) -m bench.proving_ground --quick

proving-ground-cloud: setup
	$(PY) -m bench.proving_ground.cloud

# The same guest as a libvirt domain of two libvirtds: net_failover.rst's virsh script and
# deploy/libvirt/failover-migrate-libvirt, with `virsh migrate --live` between the two.
proving-ground-libvirt: setup
	$(PY) -m bench.proving_ground.libvirt_run

# The root/netns/BPF test layers inside a guest on Debian 12's kernel KERNEL (6.1 or 6.12):
# bench/proving_ground/guest_tests.py, docs/kernels.md.
KERNEL ?= 6.12
guest-test: setup
	$(PY) -m bench.proving_ground.guest_tests --kernel $(KERNEL) $(GUEST_TEST_ARGS)

.PHONY: proving-ground proving-ground-quick proving-ground-cloud proving-ground-libvirt guest-test

clean:
	-$(VENV)/bin/failover-lab down 2>/dev/null
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# The runtime dependencies, pinned with their hashes (make setup and the Dockerfile install
# from it). Regenerate after changing dependencies in pyproject.toml: `make lock`.
lock: setup
	$(PY) -m pip install -q --disable-pip-version-check pip-tools
	$(VENV)/bin/pip-compile --quiet --generate-hashes --strip-extras --allow-unsafe \
	  --no-emit-index-url --no-emit-find-links --output-file=requirements.lock \
	  pyproject.toml build-requirements.in

.PHONY: lock
