# `make dev` runs the service on its embedded default; `make test` builds .venv from
# pyproject.toml and runs the linters and the suite.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: dev test lint system cluster-test bench mutants clean

$(STAMP): pyproject.toml client/pyproject.toml client/hatch_build.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ./client -e '.[dev]'
	touch $(STAMP)

dev: $(STAMP)
	$(BIN)/sealstream serve

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-logo --no-cache

# Debian packages the tests run for real: redis-server (started by the tests on free
# ports), docker-compose (validates docker-compose.yml; no Docker engine is needed) and
# promtool, from prometheus (checks the alert rules and the dashboard's queries) and
# haproxy (the load balancer of docker-compose.yml, run in front of two API servers),
# redis-sentinel (the jobs' Redis failover) and nftables (packet loss in the cluster test).
system:
	@command -v redis-server >/dev/null || { echo "redis-server is missing: apt-get install redis-server"; exit 1; }
	@command -v docker-compose >/dev/null || apt-get install -y --no-install-recommends docker-compose \
		|| { apt-get update && apt-get install -y --no-install-recommends docker-compose; } \
		|| { echo "docker-compose is missing: apt-get install docker-compose"; exit 1; }
	@command -v promtool >/dev/null || apt-get install -y --no-install-recommends prometheus \
		|| { apt-get update && apt-get install -y --no-install-recommends prometheus; } \
		|| { echo "promtool is missing: apt-get install prometheus"; exit 1; }
	@command -v haproxy >/dev/null || apt-get install -y --no-install-recommends haproxy \
		|| { apt-get update && apt-get install -y --no-install-recommends haproxy; } \
		|| { echo "haproxy is missing: apt-get install haproxy"; exit 1; }
	@command -v redis-sentinel >/dev/null || apt-get install -y --no-install-recommends redis-sentinel \
		|| { apt-get update && apt-get install -y --no-install-recommends redis-sentinel; } \
		|| { echo "redis-sentinel is missing: apt-get install redis-sentinel"; exit 1; }
	@command -v nft >/dev/null || apt-get install -y --no-install-recommends nftables \
		|| { apt-get update && apt-get install -y --no-install-recommends nftables; } \
		|| { echo "nft is missing: apt-get install nftables"; exit 1; }

# worksteal: a worker that runs out of tests takes half of what the other has still to run.
test: lint system
	$(BIN)/pytest -n 2 --dist worksteal

# The production topology in network namespaces, and a chaos run across it (needs root;
# about five minutes): tests/test_cluster.py. CLUSTER_SEED and CLUSTER_SECONDS change the
# chaos run's seed and length.
cluster-test: $(STAMP) system
	nice -n 10 $(BIN)/pytest -m cluster -p no:randomly -s tests/test_cluster.py

# age (Debian) is what bench/stream.py compares one stream with: a user encrypting on
# their own machine instead.
bench: $(STAMP)
	@command -v age >/dev/null || apt-get install -y --no-install-recommends age \
		|| { apt-get update && apt-get install -y --no-install-recommends age; } \
		|| { echo "age is missing: apt-get install age"; exit 1; }
	$(BIN)/python bench/format.py
	$(BIN)/python bench/stream.py
	$(BIN)/python bench/verify.py
	$(BIN)/python bench/archives.py
	$(BIN)/python bench/reencrypt.py
	$(BIN)/python bench/signing.py
	$(BIN)/python bench/slowclients.py
	$(BIN)/python bench/audit_cost.py
	$(BIN)/python bench/fanout.py

# Disables each guard that trust rests on, one at a time; every one must make tests fail.
mutants: $(STAMP)
	$(BIN)/python tools/mutants.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .hypothesis
