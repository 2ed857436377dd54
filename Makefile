# Developer and CI entry points. `make test` is what CI runs (through .ci/run).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Re-install only when the dependencies change: the stamp is newer than pyproject.toml.
STAMP := $(VENV)/.installed

.PHONY: venv test lint fmt pytest demo bench clean system-packages

venv: $(STAMP)

# uv when it can be had (seconds), pip otherwise; either way it says what it is doing.
$(STAMP): pyproject.toml
	@.ci/venv $(PYTHON) $(VENV)
	@touch $@

# The Debian packages the tests need (.ci/system-packages), before any venv work: root
# installs the missing ones (apt-get's output shown); anyone else gets one line naming them
# and the command that installs them, and make stops there.
system-packages:
ifeq ($(shell id -u),0)
	@.ci/system-packages
else
	$(eval MISSING := $(shell .ci/system-packages 2>&1))$(if $(MISSING),$(error $(MISSING)))
endif

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

# One worker per core (pytest-xdist): each starts its own Redis, Prometheus and nginx on free
# ports. `.venv/bin/pytest FILE` alone runs in one process, for reading a failure.
pytest: system-packages venv
	$(BIN)/pytest -n auto

test: system-packages
	@$(MAKE) --no-print-directory lint pytest

fmt: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The real control loop (engine, resolver, Redis sink and journal on an embedded Redis)
# against a simulated fleet: a runaway tenant, then a 5x burst; about a minute, then the
# scorecard and the path of the PNG. Nothing needs to be running.
demo: venv
	$(BIN)/governor simulate demo --policies policies --live --pace 0.35 --out sim-out/demo

bench: venv
	@set -e; for script in benchmarks/*.py; do \
		echo "== $$script"; \
		$(BIN)/python "$$script"; \
	done

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
