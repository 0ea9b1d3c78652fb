# Kemari Suite. The two commands of the quick start are `make demo` and `make test`;
# each runs the (idempotent) setup first.
VENV := .venv
BIN := $(VENV)/bin
PYTEST_WORKERS ?= 2

.PHONY: setup demo test lint unit integration e2e bench image clean

setup:
	@bash scripts/setup.sh

image: setup
	@$(BIN)/kemari image build

demo: setup
	@$(BIN)/kemari demo

lint: setup
	$(BIN)/ruff check kemari_suite tests benchmarks
	$(BIN)/ruff format --check kemari_suite tests benchmarks
	$(BIN)/mypy
	$(BIN)/lint-imports

test: setup lint image
	$(BIN)/pytest -n $(PYTEST_WORKERS) -m "not slow" tests

unit: setup
	$(BIN)/pytest -n $(PYTEST_WORKERS) tests/unit

KILLS ?= 20
e2e: setup image
	rm -f benchmarks/results/failover-campaign.jsonl
	KEMARI_KILLS_PER_POINT=$(KILLS) KEMARI_RECORD=$(CURDIR)/benchmarks/results/failover-campaign.jsonl \
		$(BIN)/pytest -n $(PYTEST_WORKERS) -m "slow or e2e" tests/e2e tests/klab; \
		rc=$$?; $(BIN)/python benchmarks/summarize_campaign.py \
		benchmarks/results/failover-campaign.jsonl benchmarks/results/failover-campaign \
		--min-trials $$((25 * $(KILLS))) || rc=1; \
		$(BIN)/kemari bench service --kills 10 --soak-minutes 30 -o benchmarks/results || rc=1; \
		$(BIN)/kemari klab power-loss --backend builtin --trials $(KILLS) -o benchmarks/results/klab || rc=1; \
		$(BIN)/kemari klab power-loss --backend drbd --trials $(KILLS) -o benchmarks/results/klab || rc=1; \
		$(BIN)/kemari klab power-loss --backend iscsi --trials $(KILLS) -o benchmarks/results/klab || rc=1; \
		$(BIN)/kemari klab sizing --sizes 128,1024 -o benchmarks/results/klab || rc=1; exit $$rc

# The benchmark results kept under benchmarks/results (a quiet machine, about 40 min):
# the interval sweep, the lmbench/IOzone suite, the latency comparison, and four VMs on one
# pair against each alone (exits 1 when a VM is outside its bound: make goes on). The service
# benchmark with its kills and soak runs in `make e2e`.
bench: setup image
	$(BIN)/kemari bench interval -o benchmarks/results/interval
	$(BIN)/kemari bench -o benchmarks/results/suite --json
	$(BIN)/kemari bench latency --out benchmarks/results
	-$(BIN)/kemari bench multivm -o benchmarks/results

clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache .import_linter_cache .hypothesis build *.egg-info
