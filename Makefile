.PHONY: run test lint bench image compiled stop-dev clean-dev

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

# The gateway's container image, with podman, on a Debian base built once into .dev/image.
image:
	deploy/image/build.sh

# The wheel with the request path compiled to C (mypyc), in build/compiled/dist.
compiled:
	scripts/bootstrap.sh
	scripts/build-compiled.sh

# Stop the dev Postgres and Redis that `make run` and `make test` start (data stays in .dev).
stop-dev:
	scripts/stop-dev.sh

# Stop it and remove .dev: the cluster, the vLLM install, the tiny model, the spool.
clean-dev: stop-dev
	rm -rf .dev
