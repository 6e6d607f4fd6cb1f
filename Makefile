# Everything a fresh machine needs, from nothing but Python 3.11.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= conf/aggregator.toml

.PHONY: run test lint rules check-config clean image image-test podman-deps base-image fluentd-deps \
        prometheus-deps

# The stamp files make the install step re-run whenever pyproject.toml changes.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.installed

run: $(VENV)/.installed
	$(BIN)/aggregator run -c $(CONFIG)

test: lint rules fluentd-deps
	$(BIN)/python -m pytest

# Debian's prometheus package: promtool for the alert rules' unit tests, and the prometheus
# binary that tests/deploy/test_monitoring.py runs against a live service.
prometheus-deps:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null \
	  || { $(SUDO) apt-get update -q && \
	       $(SUDO) apt-get install -y -q --no-install-recommends prometheus; }

rules: prometheus-deps
	promtool check rules deploy/prometheus/alerts.yml
	promtool test rules deploy/prometheus/alerts_test.yml

# Fluentd itself, for the tests that run the same fluent.conf through it and through us
# (tests/integration/test_fluentd_diff.py): where the peer build is beside this checkout, its
# Debian packages are installed once; elsewhere those tests skip.
FLUENTD_PEER ?= $(firstword $(wildcard ../shared/peers/fluentd ../../shared/peers/fluentd) \
                  ../shared/peers/fluentd)
fluentd-deps:
	@[ ! -x $(FLUENTD_PEER)/bin/fluentd ] || $(FLUENTD_PEER)/bin/fluentd --version >/dev/null 2>&1 \
	  || $(SUDO) sh $(FLUENTD_PEER)/install-deps.sh

lint: $(VENV)/.installed-test
	$(BIN)/ruff check aggregator emulator tests benchmarks
	$(BIN)/mypy aggregator emulator benchmarks
	$(BIN)/hadolint Dockerfile
	$(BIN)/cfn-lint deploy/cloudformation/*.yaml

check-config: $(VENV)/.installed
	$(BIN)/aggregator check -c $(CONFIG)

clean:
	rm -rf $(VENV) data .pytest_cache .mypy_cache .ruff_cache

# --- the container image, built and run with Debian's podman (no Docker daemon needed) -------
IMAGE      ?= localhost/aggregator:test
BASE_IMAGE ?= localhost/debian-python:bookworm
SUDO       := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# crun fails on some kernels where runc works; podman's default ulimits may exceed the host's.
PODMAN     := podman --runtime runc
LIMITS     := --ulimit nofile=1024:1024 --ulimit nproc=1000:1000
# A host CA bundle, when there is one, lets pip inside the build reach the package index
# through a TLS-inspecting proxy; elsewhere the build needs nothing from the host.
CA_BUNDLE  := /etc/ssl/certs/ca-certificates.crt
CA_MOUNT   := $(if $(wildcard $(CA_BUNDLE)),-v $(CA_BUNDLE):$(CA_BUNDLE):ro)

podman-deps:
	@command -v podman >/dev/null && command -v runc >/dev/null && command -v debootstrap >/dev/null \
	  || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q podman runc debootstrap; }

# A Debian base with Python, made from Debian's packages (no registry pull), built once.
base-image: podman-deps
	@$(PODMAN) image exists $(BASE_IMAGE) || { \
	  rootfs=$$(mktemp -d) && \
	  $(SUDO) debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
	    bookworm $$rootfs >/dev/null && \
	  $(SUDO) tar -C $$rootfs -c . | $(PODMAN) import - $(BASE_IMAGE) && \
	  $(SUDO) rm -rf $$rootfs; }

image: base-image
	$(PODMAN) build --format docker --network host $(LIMITS) $(CA_MOUNT) \
	  --build-arg BASE=$(BASE_IMAGE) -t $(IMAGE) .

image-test: $(VENV)/.installed-test image
	AGGREGATOR_IMAGE=$(IMAGE) $(BIN)/python -m pytest -m image tests/image -v -s
	@$(PODMAN) image inspect $(IMAGE) --format 'image size: {{.Size}} bytes'

