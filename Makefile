# Benchmarks. `make bench` installs what it needs into .venv, runs the whole
# stack in production mode against a scratch database and vhost, and removes
# everything it made, also on Ctrl-C. See docs/performance.md.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: bench profile explain bench-install bench-clean

$(PY):
	$(PYTHON) -m venv $(VENV)

bench-install: $(PY)
	@echo "installing the bench extra into $(VENV) ..." >&2
	@$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[bench]'

# Submit throughput and latency (saturation and half of it), submit-to-alert
# latency, outbox lag, the highest rate sustained with every alert on time, and
# peak RSS, against bench/baseline_server.py.
# Writes bench/results/latest.json and latest.png.
bench: bench-install
	$(PY) -m bench.run $(BENCH_ARGS)

# The same run with py-spy on each service during saturation (or, with
# BENCH_ARGS=--profile-phase=half, during the half-load phase); results and
# profiles go to bench/results/profile/ (latest.json is left alone).
profile: bench-install
	$(PY) -m bench.run --profile $(BENCH_ARGS)
	$(PY) -m bench.profile_summary bench/results/profile/*.txt --top 20

# Query plans of the check-in path's reads at a million rows (a few minutes).
explain: bench-install
	$(PY) -m bench.explain_million $(EXPLAIN_ARGS)

# Remove databases, vhosts and users a killed run left (only when none is running).
bench-clean: $(PY)
	$(PY) -m bench.clean
