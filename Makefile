# dbre: the commands a newcomer runs. Every target works on a fresh clone.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install pyc demo test test-all torture bench lint typecheck clean serve

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	@command -v sqldiff >/dev/null 2>&1 || echo "note: sqldiff not found (apt-get install sqlite3-tools); tests that use it fall back to a row comparison"
	touch $(STAMP)

install: $(STAMP) pyc

# Byte-compile the project's own modules (an editable install leaves none, and with PYTHONDONTWRITEBYTECODE
# set, as on this CI machine, Python never writes them): every `dbre` process, every flow run and every
# test's subprocess then loads them instead of compiling ~0.2 s of source (`dbre backup` 0.71 -> 0.49 s).
# compileall rewrites only what changed; Python ignores a stale file.
pyc: $(STAMP)
	$(BIN)/python -m compileall -q -j 0 dbre tasks flows deployments benchmarks >/dev/null

demo: $(STAMP) pyc
	$(BIN)/python -m dbre.demo

lint: $(STAMP)
	$(BIN)/ruff check dbre tasks flows deployments tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy dbre

# make test: the suite on TEST_WORKERS processes (pytest-xdist; tests/conftest.py keeps a module with a
# module-scoped fixture on one of them), without the long variants (marked slow); make test-all runs
# those too. TEST_WORKERS=0 runs in this process; PYTEST_ARGS adds options, e.g. PYTEST_ARGS='-k s3'.
TEST_WORKERS ?= 3
PYTEST_RUN = $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup
test: $(STAMP) lint typecheck pyc
	$(PYTEST_RUN) $(PYTEST_ARGS)

test-all: $(STAMP) lint typecheck pyc
	$(PYTEST_RUN) --runslow $(PYTEST_ARGS)

# the long torture run: 2000 kill -9 trials (make test runs 200 of them, tests/torture)
TORTURE_TRIALS ?= 2000
torture: $(STAMP) pyc
	DBRE_TORTURE_TRIALS=$(TORTURE_TRIALS) $(BIN)/python -m pytest -q -p no:cacheprovider tests/torture

# the history (S3, 5 vs 200 snapshots), churn (24 rounds, repack off/on), memory (1 and 8 GiB), the ratios at
# 8 GiB (--large, ~35 GB free) and PITR
# (replication vs Litestream 0.5.17), S3 restore (1 GiB from moto_server vs local) and dbre sql (a point
# query in place on S3) parts too;
# BENCH_ARGS= for the core only
BENCH_ARGS ?= --history --churn --memory --large --pitr --s3 --sql
bench: $(STAMP) pyc
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# A local Prefect server (UI at http://127.0.0.1:$(PREFECT_PORT)) serving every deployment from one
# process, no work pool; Ctrl-C stops both. DBRE_POLICY names the policy file the flows use.
PREFECT_PORT ?= 4200
serve: $(STAMP) pyc
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/python deployments/serve.py --start-server --port $(PREFECT_PORT)
