# One entry point per job. Everything installs into a virtualenv cached outside the repo
# (~/.cache/costwarden/venv); the control-plane binaries are built once into
# ~/.cache/costwarden/k8s-v1.34.4 by the test fixture or the demo.

CACHE ?= $(HOME)/.cache/costwarden
VENV ?= $(CACHE)/venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-16)

# Every recipe finds the venv's tools (costwarden, hadolint, ruff...) first.
export PATH := $(abspath $(VENV))/bin:$(PATH)
# The suite runs with nothing on PATH but the venv's bin and the system's own directories,
# as on a fresh machine: a test that finds a tool only through a developer's PATH fails
# here, not on the next newcomer's machine. Go is needed once, to build the control plane:
# the caller's go is passed by its path (COSTWARDEN_GO), nothing else of its directory.
SYSTEM_PATH := /usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
SUITE := env PATH="$(abspath $(VENV))/bin:$(SYSTEM_PATH)" COSTWARDEN_GO="$(shell command -v go)"

.PHONY: install system-tools test lint unit integration faults soak demo bench bench-reservation \
	bench-overspend crds clean-cache

$(STAMP): pyproject.toml
	@mkdir -p $(CACHE)
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

install: $(STAMP) system-tools
	@# The editable install points at this checkout; re-link it when run from another clone.
	@$(PY) -c 'import costwarden, pathlib, sys; sys.exit(0 if pathlib.Path(costwarden.__file__).resolve().is_relative_to(pathlib.Path("operator").resolve()) else 1)' \
		|| $(PY) -m pip install --quiet --no-deps -e .

# The process kubelet (tests, demo) runs pods in network and mount namespaces: it needs
# `ip` (iproute2) and `unshare`/`nsenter` (util-linux), and root. CI is a fresh Debian as root.
system-tools:
	@command -v ip >/dev/null && command -v nsenter >/dev/null && command -v unshare >/dev/null \
		|| { if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && apt-get install -y -qq iproute2 util-linux; \
		else echo "install iproute2 and util-linux (ip, unshare, nsenter) for the process kubelet" >&2; fi; }

## make test: everything CI runs (lint, unit, integration on a real control plane, e2e).
test: install lint
	$(SUITE) $(PY) -m pytest tests

LINTED := $(wildcard operator tests benchmarks)

lint: install
	$(PY) -m ruff check $(LINTED)
	$(PY) -m ruff format --check $(LINTED)
	$(PY) -m mypy

unit: install
	$(SUITE) $(PY) -m pytest tests/unit

integration: install
	$(SUITE) $(PY) -m pytest tests/integration tests/e2e

## make faults: the whole fault suite, the slow cases too (a 60 s API-server outage, 2 min
## of a misbehaving upstream).
faults: install
	$(SUITE) COSTWARDEN_LONG_FAULTS=1 $(PY) -m pytest tests/faults -s

## make soak: 100 kill -9 restarts of the operator and the gateway under load (~25 min).
soak: install
	$(SUITE) COSTWARDEN_SOAK=1 $(PY) -m pytest tests/faults -s -k soak --timeout 7200

## make demo: the local demo (control plane, operator, gateway, a budget, an agent stopped).
demo: install
	$(VENV)/bin/costwarden demo

bench: install
	$(PY) -m benchmarks.gateway
	$(PY) -m benchmarks.operator_scale

## make bench-reservation: what reserving before forwarding adds (issue #12; benchmarks/README.md).
bench-reservation: install
	$(PY) benchmarks/reservation.py

## make bench-overspend: spend at the cap under 100 concurrent calls, costwarden vs LiteLLM.
bench-overspend: install
	$(PY) benchmarks/overspend.py

## make crds: regenerate crds/ and the chart's copies from the pydantic models.
crds: install
	$(PY) -m costwarden.api.crd --write

clean-cache:
	rm -rf $(CACHE)
