# syntax=docker/dockerfile:1
#
# Keygate container image: `keygate serve` as a non-root user.
#
#   docker build -t keygate .
#   docker run --rm -p 127.0.0.1:8000:8000 -p 127.0.0.1:8001:8001 -v keygate-data:/data \
#       -e KEYGATE_UPSTREAMS='[{"name": "app", "url": "http://host.docker.internal:8080"}]' keygate
#
# Configuration comes from the environment (KEYGATE_ + the setting's path,
# "__" between parts) and, optionally, from /etc/keygate/keygate.toml (the
# working directory, so a file mounted there is read without KEYGATE_CONFIG).
# The environment wins over the file: the listen addresses and the store URL
# below are environment defaults, so change them with `-e`, not in the file.
# Management commands run in the same image: `docker run ... keygate keys list`.

ARG PYTHON_IMAGE=python:3.11-slim

# -- build: a virtualenv holding the package and its runtime dependencies only
FROM ${PYTHON_IMAGE} AS build
# The compiled build (README, "The compiled build"): the request path compiled
# to C with mypyc, about a quarter less CPU per request. --build-arg
# KEYGATE_COMPILED=false builds the pure-Python package instead (true or false).
ARG KEYGATE_COMPILED=true
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# A C compiler and the C library's headers for mypyc's output (the image's
# Python brings its own headers); the runtime stage below has neither.
RUN if [ "$KEYGATE_COMPILED" = true ]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends gcc libc6-dev \
        && rm -rf /var/lib/apt/lists/*; \
    fi
RUN python -m venv /opt/keygate
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
# A plain (non-editable) install of the project: [project.dependencies] only,
# never the [test] extra. Byte-code is compiled here, since the root
# filesystem may be read-only at run time. The check after it fails the
# build if a compiled build came out as pure Python (-I: the venv's install
# answers, not the .so files the build left in /src).
RUN HATCH_BUILD_HOOK_ENABLE_MYPYC=$KEYGATE_COMPILED /opt/keygate/bin/pip install . \
    && /opt/keygate/bin/keygate --version \
    && if [ "$KEYGATE_COMPILED" = true ]; then \
        /opt/keygate/bin/python -I -c "import gateway.dataplane.http1 as m; assert not m.__file__.endswith('.py'), m.__file__"; \
    fi

# -- runtime: the virtualenv on a fresh slim base, no build tools, no sources
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="keygate" \
      org.opencontainers.image.description="Authenticating reverse proxy for long-lived API keys" \
      org.opencontainers.image.licenses="Apache-2.0"
# Fixed uid/gid 10001, so Kubernetes can check runAsNonRoot and volumes can be
# prepared for it (fsGroup 10001).
RUN groupadd --system --gid 10001 keygate \
    && useradd --system --uid 10001 --gid 10001 --home-dir /data --no-create-home \
       --shell /usr/sbin/nologin keygate \
    && mkdir -p /data /etc/keygate \
    && chown 10001:10001 /data \
    && chmod 0750 /data
COPY --from=build /opt/keygate /opt/keygate
ENV PATH=/opt/keygate/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    KEYGATE_PROXY__LISTEN=0.0.0.0:8000 \
    KEYGATE_ADMIN__LISTEN=0.0.0.0:8001 \
    KEYGATE_STORE__URL=sqlite:////data/keygate.db
WORKDIR /etc/keygate
# The embedded SQLite store (the default above) lives here; point
# KEYGATE_STORE__URL at PostgreSQL for more than one replica.
VOLUME ["/data"]
USER 10001:10001
# 8000: proxy listener (the guarded API). 8001: admin listener (admin API, /ui/,
# /metrics, /healthz, /readyz).
EXPOSE 8000 8001
# No curl in the slim image: Python's urllib asks the admin listener, on the
# port KEYGATE_ADMIN__LISTEN names. urlopen raises on a refused connection or a
# non-2xx answer, which makes the check fail.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('KEYGATE_ADMIN__LISTEN', ':8001').rsplit(':', 1)[1]; urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4)"]
ENTRYPOINT ["keygate"]
CMD ["serve"]
