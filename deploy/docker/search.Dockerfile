# syntax=docker/dockerfile:1.7
# search_svc: gRPC vsearch.v1.VectorSearch on :50053, in front of a Milvus server (standalone or
# cluster: SEARCH_BACKEND=milvus, SEARCH_MILVUS__URI=http://host:19530), or with an in-process FAISS
# index over files under SEARCH_FAISS__DATA_DIR (one replica, on a volume). Milvus Lite (.db files)
# is not in this image.
# From the repository root:
#   docker build -f deploy/docker/search.Dockerfile -t vsearch/search:0.1.0 .

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

# ---- the runtime virtualenv: only search_svc's locked dependencies, and no pip in it --------------
FROM ${PYTHON_IMAGE} AS venv
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY deploy/docker/requirements/search.lock /tmp/requirements.lock
COPY --from=wheel /dist/ /tmp/dist/
# The import at the end fails the build when the lock misses something the service imports.
RUN python -m venv --without-pip /opt/venv \
 && pip --python /opt/venv/bin/python install --require-hashes --no-deps -r /tmp/requirements.lock \
 && pip --python /opt/venv/bin/python install --no-deps /tmp/dist/vsearch-*.whl \
 && /opt/venv/bin/python -c "import search_svc.server, pymilvus, faiss"

# ---- runtime ---------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 vsearch \
 && useradd --system --uid 10001 --gid vsearch --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin vsearch
COPY --from=venv /opt/venv /opt/venv
COPY deploy/docker/healthcheck.py /opt/vsearch/healthcheck.py
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SEARCH_HOST=0.0.0.0 \
    SEARCH_PORT=50053
USER 10001:10001
EXPOSE 50053
# SERVING once Milvus answered and the collection is loaded; NOT_SERVING again while draining.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "/opt/vsearch/healthcheck.py", "SEARCH_PORT", "50053"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "search_svc"]
