.PHONY: run test lint bench clean-dev

# Postgres, a model backend (BACKEND=sim or vllm) and the gateway on :8080.
run:
	scripts/run.sh

# The whole suite: unit, integration (real Postgres), fault tests and the real-vLLM suite.
test:
	scripts/test.sh $(PYTEST_ARGS)

lint:
	scripts/bootstrap.sh
	.venv/bin/ruff check src tests bench
	.venv/bin/mypy src

bench:
	scripts/bench.sh

clean-dev:
	-/usr/lib/postgresql/15/bin/pg_ctl -D .dev/pg/data stop -m fast
	rm -rf .dev
