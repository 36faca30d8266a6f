# `make run` serves on the embedded defaults; `make test` runs the whole suite.
# Both install what they need first: a virtualenv in .venv and the pinned npm tools.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
NODE_INSTALLED := node_modules/.installed
PORT ?= 8080

# Postgres runs are included when a server answers on 127.0.0.1:5432 (CI sets this explicitly).
TEST_POSTGRES_URL ?= $(shell pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null && echo postgresql+asyncpg://postgres@127.0.0.1:5432/test)
export TEST_POSTGRES_URL

.PHONY: run test install generate lint-proto release-contracts migrate bench bench-tools pgbouncer loadtest

install: $(INSTALLED) $(NODE_INSTALLED)

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

$(NODE_INSTALLED): package.json package-lock.json
	CI=true npm ci --omit=optional --no-audit --no-fund --loglevel=error
	touch $@

# PgBouncer (Debian package) reproduces Supabase's transaction pooler in the tests.
pgbouncer:
	@command -v pgbouncer >/dev/null 2>&1 || test -x /usr/sbin/pgbouncer || \
		{ test "$$(id -u)" = 0 && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbouncer >/dev/null; } || \
		echo "pgbouncer is not installed and cannot be installed here: its tests will be skipped"

run: install
	$(BIN)/python -m app migrate
	@token=$$($(BIN)/python -m app dev-token --uid alice --email alice@example.com --role admin --lifetime 86400); \
	echo; \
	echo "Development token for uid alice (admin), valid 24 h:"; \
	echo "  export TOKEN=$$token"; \
	echo "Try:"; \
	echo "  curl -H 'content-type: application/json' -H \"authorization: Bearer \$$TOKEN\" -d '{}' http://127.0.0.1:$(PORT)/functions.user.v1.UserService/GetMe"; \
	echo
	$(BIN)/python -m app serve --port $(PORT)

# Contracts must stay compatible with the released ones, kept as a buf image in
# proto/baseline.binpb (`make release-contracts` replaces it after a release).
BREAKING_AGAINST ?= proto/baseline.binpb

test: install pgbouncer
	node_modules/.bin/buf lint
	node_modules/.bin/buf breaking --against $(BREAKING_AGAINST)
	$(BIN)/ruff check app tests scripts loadtests migrations
	$(BIN)/python -m pytest

# Record the current contracts as released: later changes are checked against them.
release-contracts: $(NODE_INSTALLED)
	node_modules/.bin/buf build -o proto/baseline.binpb

generate: install
	$(BIN)/python scripts/generate.py

lint-proto: $(NODE_INSTALLED)
	node_modules/.bin/buf lint

migrate: install
	$(BIN)/python -m app migrate

# wrk and h2load (Debian packages wrk, nghttp2-client) generate the benchmark's load.
bench-tools:
	@command -v wrk >/dev/null 2>&1 && command -v h2load >/dev/null 2>&1 || \
		{ test "$$(id -u)" = 0 && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk nghttp2-client >/dev/null; } || \
		echo "wrk and h2load are missing: apt-get install wrk nghttp2-client"

# uvicorn only: pyvoy 1.3.0 hangs on Connect calls with an empty body (see loadtests/README.md).
bench: install bench-tools
	$(BIN)/python loadtests/bench.py --server uvicorn

LOCUST_USERS ?= 20
LOCUST_TIME ?= 1m
LOAD_HOST ?= http://127.0.0.1:$(PORT)

# Locust against a running server (`make run` in another shell); see loadtests/README.md.
loadtest: install
	$(BIN)/python -m locust -f loadtests/locustfile.py --headless -u $(LOCUST_USERS) \
		-r $(LOCUST_USERS) -t $(LOCUST_TIME) --host $(LOAD_HOST) --only-summary
