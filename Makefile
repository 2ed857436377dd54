# Developer and CI entry points. `make test` is what CI runs (through .ci/run).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Re-install only when the dependencies change: the stamp is newer than pyproject.toml.
STAMP := $(VENV)/.installed

.PHONY: venv test lint fmt pytest demo bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

pytest: venv
	$(BIN)/pytest

test: lint pytest

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
