# Two commands a user needs: `make run` and `make test`. Both set themselves up.
PYTHON ?= $(shell command -v python3.12 || command -v python3.13 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-mitmproxy-range soak demo bench lint lock clean

$(STAMP): pyproject.toml requirements.lock
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 12))' || \
		{ echo "Python >= 3.12 is required (found $$($(PYTHON) --version))"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements.lock -e '.[dev,redis,metrics]'
	@touch $(STAMP)

run: $(STAMP)
	$(BIN)/python scripts/run_local.py $(ARGS)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

lint: $(STAMP)
	$(BIN)/ruff check addon scripts tests
	$(BIN)/ruff format --check addon scripts tests
	$(BIN)/mypy

# Four processes, one test file each at a time: most tests wait on sockets and child
# processes, so this halves the time on two cores.
test: lint
	$(BIN)/python -m pytest -n 4 --dist loadfile

# The end-to-end answer tests on the lowest mitmproxy pyproject.toml allows and on the
# newest it allows, each in a scratch venv (`make test` runs on the locked one only).
RANGE_VENV := .range-venv
MITMPROXY_LOWEST := mitmproxy==12.0.0
MITMPROXY_NEWEST := mitmproxy>=12.0,<13
RANGE_TESTS := tests/e2e/test_e2e_streaming.py tests/e2e/test_e2e_bridge.py tests/e2e/test_e2e_hostile_client.py

test-mitmproxy-range:
	@for spec in '$(MITMPROXY_LOWEST)' '$(MITMPROXY_NEWEST)'; do \
		rm -rf $(RANGE_VENV) && $(PYTHON) -m venv $(RANGE_VENV) && \
		$(RANGE_VENV)/bin/python -m pip install --quiet --upgrade pip && \
		$(RANGE_VENV)/bin/python -m pip install --quiet -e '.[dev]' "$$spec" && \
		echo "== $$spec: $$($(RANGE_VENV)/bin/python -c 'from mitmproxy import version; print(version.MITMPROXY)')" && \
		$(RANGE_VENV)/bin/python -m pytest -q -p no:cacheprovider $(RANGE_TESTS) || { rm -rf $(RANGE_VENV); exit 1; }; \
	done; rm -rf $(RANGE_VENV)

# The slow tests only: soak under injected faults, request floods.
soak: $(STAMP)
	$(BIN)/python -m pytest -m slow

bench: $(STAMP)
	$(BIN)/python scripts/bench.py $(BENCH_ARGS)

# Re-resolve the newest versions the ranges in pyproject.toml allow, in a scratch venv.
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet --upgrade pip
	.lock-venv/bin/python -m pip install --quiet -e '.[dev,redis,metrics]'
	{ head -2 requirements.lock; .lock-venv/bin/python -m pip freeze --exclude-editable; } > requirements.lock.new
	mv requirements.lock.new requirements.lock
	rm -rf .lock-venv

clean:
	rm -rf $(VENV) $(RANGE_VENV) .mypy_cache .pytest_cache .ruff_cache
