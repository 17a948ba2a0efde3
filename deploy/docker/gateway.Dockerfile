# syntax=docker/dockerfile:1.7
# The gateway: gRPC vsearch.v1.VisualSearch on :50051 and HTTP/JSON on :8080 (both check API keys once
# keys are configured), and with GATEWAY_INTERNAL_PORT=50061 the internal gRPC listener (no keys). From
# the repository root:
#   docker build -f deploy/docker/gateway.Dockerfile -t vsearch/gateway:0.1.0 .

# Pinned by tag and by the digest of its multi-arch index; all stages share it.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d

# ---- the vsearch wheel (setuptools stays in this stage) -------------------------------------------
FROM ${PYTHON_IMAGE} AS wheel
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY deploy/docker/requirements/build.lock /tmp/build.lock
RUN python -m venv /opt/build \
 && /opt/build/bin/pip install --require-hashes --no-deps -r /tmp/build.lock
COPY pyproject.toml README.md ./
COPY vsearch/ vsearch/
COPY vsearch_cli/ vsearch_cli/
COPY service_kit/ service_kit/
COPY embedder_svc/ embedder_svc/
COPY search_svc/ search_svc/
COPY gateway/ gateway/
RUN /opt/build/bin/pip wheel --no-deps --no-build-isolation --wheel-dir /dist .

# ---- the runtime virtualenv: only the gateway's locked dependencies, and no pip in it -------------
FROM ${PYTHON_IMAGE} AS venv
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY deploy/docker/requirements/gateway.lock /tmp/requirements.lock
COPY --from=wheel /dist/ /tmp/dist/
# The import at the end fails the build when the lock misses something the service imports.
RUN python -m venv --without-pip /opt/venv \
 && pip --python /opt/venv/bin/python install --require-hashes --no-deps -r /tmp/requirements.lock \
 && pip --python /opt/venv/bin/python install --no-deps /tmp/dist/vsearch-*.whl \
 && /opt/venv/bin/python -c "import gateway.server"

# ---- runtime ---------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 vsearch \
 && useradd --system --uid 10001 --gid vsearch --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin vsearch
COPY --from=venv /opt/venv /opt/venv
COPY deploy/docker/healthcheck.py /opt/vsearch/healthcheck.py
# A container must listen on every interface; the ports are the settings' defaults, named here so
# the health check and `docker run -p` agree with them.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    GATEWAY_HOST=0.0.0.0 \
    GATEWAY_PORT=50051 \
    GATEWAY_HTTP_HOST=0.0.0.0 \
    GATEWAY_HTTP_PORT=8080
USER 10001:10001
EXPOSE 50051 8080 50061
# SERVING once the embedder and search_svc have answered; NOT_SERVING again while draining.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "/opt/vsearch/healthcheck.py", "GATEWAY_PORT", "50051"]
# SIGTERM starts the drain (GATEWAY_DRAIN_SECONDS, then GATEWAY_GRACE_SECONDS for in-flight calls).
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "gateway"]
