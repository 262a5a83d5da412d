# The gateway's image: Debian bookworm's Python 3.11, the exact dependencies of requirements.lock
# in a virtualenv, run as an unprivileged user. Build it with `make image` (deploy/image/build.sh),
# or anywhere with `docker build .` / `podman build .`.
#
# BASE_IMAGE is any Debian bookworm image. deploy/image/base.sh makes one from Debian's packages
# alone (debootstrap, python3 and python3-venv included), for machines without an image registry.
ARG BASE_IMAGE=docker.io/library/debian:bookworm-slim

FROM ${BASE_IMAGE} AS python
# Python from Debian, unless the base has it already. Versions are those of the base's release.
# hadolint ignore=DL3008
RUN if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi

# -- build: the virtualenv, from the lock alone ---------------------------------------------------
FROM python AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=120
WORKDIR /src
# The dependencies first, in a layer of their own: changing the code does not reinstall them.
# A TLS-intercepting proxy's CA can be passed as the build secret pip-ca.
COPY requirements.lock deploy/image/build-requirements.lock ./
RUN --mount=type=secret,id=pip-ca \
    if [ -f /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi \
    && python3 -m venv /opt/build \
    && /opt/build/bin/pip install --no-cache-dir -r build-requirements.lock \
    && python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --no-deps -r requirements.lock
COPY pyproject.toml README.md ./
COPY src ./src
RUN /opt/build/bin/pip wheel --no-cache-dir --no-deps --no-build-isolation --wheel-dir /tmp/wheels . \
    && /opt/venv/bin/pip install --no-cache-dir --no-deps --no-index /tmp/wheels/*.whl \
    && /opt/venv/bin/pip check \
    && /opt/venv/bin/pip uninstall --yes --quiet pip setuptools

# -- runtime ------------------------------------------------------------------------------------
FROM python AS runtime
LABEL org.opencontainers.image.title="inference-gateway" \
      org.opencontainers.image.description="OpenAI-compatible gateway in front of vLLM that meters every token into Postgres"
RUN groupadd --gid 10001 gateway \
    && useradd --no-log-init --uid 10001 --gid 10001 --create-home \
        --home-dir /var/lib/inference-gateway --shell /bin/false gateway \
    && install -d -o gateway -g gateway -m 0750 /var/lib/inference-gateway/spool
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    WEBSERVER_HOST=0.0.0.0 \
    WEBSERVER_PORT=8080 \
    SPOOL_DIR=/var/lib/inference-gateway/spool
# The spool holds usage records Postgres does not have yet: give it a volume that outlives the
# container (a named volume, a Kubernetes PersistentVolumeClaim), never the container's own layer.
WORKDIR /var/lib/inference-gateway
USER 10001:10001
EXPOSE 8080
# SIGTERM: stop accepting, finish in-flight requests, drain the spool into Postgres, exit.
STOPSIGNAL SIGTERM
ENTRYPOINT ["inference-gateway"]
CMD ["serve"]
