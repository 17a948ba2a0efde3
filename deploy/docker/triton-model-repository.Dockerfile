# syntax=docker/dockerfile:1.7
# The Triton model repository for the GPU flavour, as an image that copies it out: run it as an init
# step with a volume at /target, then start the official Triton image on that volume
# (nvcr.io/nvidia/tritonserver, see docker-compose.yml and deploy/k8s/components/triton).
# It holds <model>/config.pbtxt (onnxruntime backend, dynamic batching, TensorRT FP16/INT8, warm-up),
# <model>/model_card.json and <model>/1/model.onnx for the preset below, written by
# `vsearch model triton-repo --flavour gpu` from the model `vsearch model prepare` makes the same way
# as in embedder.Dockerfile, so the embedder's card and Triton's model agree when both images come
# from one commit. From the repository root:
#   docker build -f deploy/docker/triton-model-repository.Dockerfile -t vsearch/triton-model-repository:0.1.0 .
# Like the embedder build, this downloads the source model unless --build-context model-sources=DIR.

# Pinned by tag and by the digest of its multi-arch index; all stages share it.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d
# A preset of `vsearch model prepare`, as in embedder.Dockerfile (efficientnet-lite2 has no download URL:
# it needs --build-context model-sources=DIR).
ARG MODEL_PRESET=mobilenetv2-12-int8

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

# ---- prepare the model, then lay out the repository ------------------------------------------------
FROM ${PYTHON_IMAGE} AS repository
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
RUN /opt/prepare/bin/vsearch model triton-repo --flavour gpu \
      --model-dir "/models/${MODEL_PRESET}" --out /model-repository

# ---- runtime: the repository and `cp` ---------------------------------------------------------------
FROM ${PYTHON_IMAGE}
# A fresh named Docker volume mounted at /target takes its owner, so the copy may write into it.
RUN groupadd --system --gid 10001 vsearch \
 && useradd --system --uid 10001 --gid vsearch --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin vsearch \
 && install -d -o 10001 -g 10001 /target
COPY --from=repository /model-repository /model-repository
USER 10001:10001
# Runs once and exits; there is nothing to probe.
HEALTHCHECK NONE
ENTRYPOINT ["cp", "-R", "/model-repository/.", "/target/"]
