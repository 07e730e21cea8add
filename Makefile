# dbre: the commands a newcomer runs. Every target works on a fresh clone.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench lint typecheck clean serve

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	@command -v sqldiff >/dev/null 2>&1 || echo "note: sqldiff not found (apt-get install sqlite3-tools); tests that use it fall back to a row comparison"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m dbre.demo

lint: $(STAMP)
	$(BIN)/ruff check dbre tasks flows deployments tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy dbre

test: $(STAMP) lint typecheck
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# the history (S3, 5 vs 200 snapshots), churn (24 rounds, repack off/on), memory (1 and 8 GiB) and PITR
# (replication vs Litestream 0.5.17) and S3 restore (1 GiB from moto_server vs local) parts too;
# BENCH_ARGS= for the core only
BENCH_ARGS ?= --history --churn --memory --pitr --s3
bench: $(STAMP)
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# A local Prefect server (UI at http://127.0.0.1:$(PREFECT_PORT)) serving every deployment from one
# process, no work pool; Ctrl-C stops both. DBRE_POLICY names the policy file the flows use.
PREFECT_PORT ?= 4200
serve: $(STAMP)
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/python deployments/serve.py --start-server --port $(PREFECT_PORT)
