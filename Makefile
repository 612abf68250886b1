# Benchmarks (not tests): each starts its servers privately on loopback ports.
PYTHON ?= python

.PHONY: bench bench-policy bench-milter

bench: bench-policy bench-milter

bench-policy:
	$(PYTHON) bench/policy_bench.py

bench-milter:
	$(PYTHON) bench/milter_bench.py
