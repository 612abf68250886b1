# Benchmarks (not tests): each starts its servers privately on loopback ports and temp dirs.
PYTHON ?= python

.PHONY: bench bench-policy bench-milter bench-store fuzz

bench: bench-policy bench-milter

# policyd vs postgrey; the table also goes to bench/results/policy.md
bench-policy:
	$(PYTHON) bench/policy_bench.py

bench-milter:
	$(PYTHON) bench/milter_bench.py

# the store alone (SQLite, Redis): greylist lookup + update per request
bench-store:
	$(PYTHON) bench/store_bench.py

# Coverage-guided fuzzing (atheris/libFuzzer, one core) of the policy codec, the socketmap
# codec and milterd's message handling: FUZZ_RUNS inputs or FUZZ_SECONDS per target,
# whichever comes first; fails on any crash or hang (one input over FUZZ_TIMEOUT seconds).
# Crash inputs, the corpus and the log go to bench/results/fuzz/TARGET/.
FUZZ_RUNS ?= 10000000
FUZZ_SECONDS ?= 3600
FUZZ_TIMEOUT ?= 10
FUZZ_TARGETS ?= policy socketmap milter
FUZZ_PYTHON ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,$(PYTHON))
fuzz:
	$(FUZZ_PYTHON) -c 'import atheris' 2>/dev/null || $(FUZZ_PYTHON) -m pip install -q 'atheris==2.3.0'
	$(FUZZ_PYTHON) -m bench.fuzz $(FUZZ_TARGETS) --runs $(FUZZ_RUNS) --seconds $(FUZZ_SECONDS) \
		--timeout $(FUZZ_TIMEOUT)
