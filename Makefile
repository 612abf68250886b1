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

# The fault harness of issue #14 (bench/chaos/): a private Postfix + Dovecot + policyd +
# milterd + NSD (+ Redis/Sentinel) in a network namespace of its own, mail from outside
# addresses and logged-in users while the parts are killed, frozen and stopped. Run as root.
# Exit status 1 when a message is lost, duplicated or accepted from a forbidden sender.
CHAOS_PYTHON ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,$(PYTHON))
MESSAGES ?= 10000
SESSIONS ?= 10
CHAOS_STORE ?= both
SOAK_MINUTES ?= 30
SOAK_RATE ?= 5
CHAOS_ARGS ?=
# New messages are spread over this many seconds (5 fault cycles), so the faults repeat.
CHAOS_SECONDS ?= 900

.PHONY: chaos chaos-ci soak

chaos:
	$(CHAOS_PYTHON) -m bench.chaos run --messages $(MESSAGES) --sessions $(SESSIONS) --store $(CHAOS_STORE) --min-duration $(CHAOS_SECONDS) --quiet $(CHAOS_ARGS)

# CI-sized: about 1,000 messages (500 per store), one cycle of every fault (3 min) each.
chaos-ci:
	$(CHAOS_PYTHON) -m bench.chaos run --messages 500 --sessions $(SESSIONS) --store both --cycles 1 --drain 300 --quiet

soak:
	$(CHAOS_PYTHON) -m bench.chaos soak --minutes $(SOAK_MINUTES) --rate $(SOAK_RATE) $(CHAOS_ARGS)

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

# Many SMTP sessions at once through the whole gateway (bench/concurrency.py): Postfix's
# smtp-source to port 25 and an asyncio client pool (port 25, and 587 with STARTTLS + AUTH)
# from outside addresses of a network namespace, against a private Postfix + Dovecot +
# policyd + milterd at the shipped limits. Prints accepted / delivered / refused by a limit /
# errors and session p50/p99; exit status 1 on any error, loss or duplicate. Run as root.
CONCURRENCY_PYTHON ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,$(PYTHON))
CONCURRENCY_SESSIONS ?= 200
CONCURRENCY_MESSAGES ?= 400
CONCURRENCY_ARGS ?=

.PHONY: concurrency

concurrency:
	$(CONCURRENCY_PYTHON) bench/concurrency.py --sessions $(CONCURRENCY_SESSIONS) \
		--messages $(CONCURRENCY_MESSAGES) $(CONCURRENCY_ARGS)
