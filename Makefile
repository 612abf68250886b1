# Benchmarks (not tests): each starts its servers privately on loopback ports and temp dirs.
PYTHON ?= python

.PHONY: bench bench-policy bench-milter bench-store

bench: bench-policy bench-milter

# policyd vs postgrey; the table also goes to bench/results/policy.md
bench-policy:
	$(PYTHON) bench/policy_bench.py

bench-milter:
	$(PYTHON) bench/milter_bench.py

# the store alone (SQLite, Redis): greylist lookup + update per request
bench-store:
	$(PYTHON) bench/store_bench.py
