"""`vsearch model triton-repo`: a Triton Inference Server model repository from a prepared embedding
model (model.onnx + model_card.json), in one of two flavours:

- ``gpu`` (production): Triton's onnxruntime backend (``platform: "onnxruntime_onnx"``) on a GPU
  instance, dynamic batching, the TensorRT execution accelerator (FP16, or INT8 for a quantized
  model) and warm-up requests, so the first caller never pays for engine building.
- ``cpu``: Triton's ``python`` backend running onnxruntime on the same ONNX file (``model.py``). This
  is what the ``tritonserver`` in the ``nvidia-pytriton`` wheel can serve (it ships no onnxruntime
  backend); the Python environment Triton runs the model in needs onnxruntime and numpy<2.

Layout (Triton's)::

    <repo>/<model name>/config.pbtxt
    <repo>/<model name>/model_card.json      (for people; Triton ignores it)
    <repo>/<model name>/<version>/model.onnx (+ model.py for the cpu flavour)

The card's version is written into the config as the parameter ``vsearch_card_version``; the
embedder's Triton backend refuses a model whose version differs from its own card's, since its
preprocessing comes from that card."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

from embedder_svc.model_card import (
    CARD_FILE_NAME,
    CARD_NAME_PARAMETER,
    CARD_VERSION_PARAMETER,
    MODEL_FILE_NAME,
    ModelCard,
    read_model_card,
)

Flavour = Literal["gpu", "cpu"]
FLAVOURS: tuple[Flavour, ...] = ("gpu", "cpu")
CONFIG_FILE_NAME = "config.pbtxt"
PYTHON_MODEL_FILE_NAME = "model.py"
DEFAULT_MAX_BATCH_SIZE = 64
DEFAULT_QUEUE_DELAY_US = 2000
# Triton model names become directory names and URL path segments.
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16"}


class TritonRepoError(Exception):
    """The model directory or the options cannot make a Triton model repository."""


@dataclass(frozen=True)
class TritonRepoOptions:
    flavour: Flavour = "gpu"
    # Default: the card's name (the embedder's EMBEDDER_TRITON__MODEL_NAME defaults to it too).
    model_name: str | None = None
    model_version: int = 1
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    # Default: powers of two from 4 up to max_batch_size, at most the three largest.
    preferred_batch_sizes: tuple[int, ...] | None = None
    max_queue_delay_us: int = DEFAULT_QUEUE_DELAY_US
    instance_count: int = 1
    # gpu flavour: GPU ids for the instance group; empty means every GPU Triton sees.
    gpus: tuple[int, ...] = ()
    # gpu flavour: TensorRT precision. None: INT8 for a quantized model (its card records the
    # quantization), else FP16.
    tensorrt_precision: Literal["FP32", "FP16", "INT8"] | None = None
    tensorrt_workspace_bytes: int = 1 << 30
    # cpu flavour: onnxruntime intra-op threads in the python model (0: onnxruntime chooses).
    cpu_threads: int = 0


@dataclass(frozen=True)
class WrittenRepo:
    repo_dir: Path
    model_name: str
    model_version: int
    config_path: Path
    card: ModelCard


def default_preferred_batch_sizes(max_batch_size: int) -> tuple[int, ...]:
    sizes = [size for size in (4, 8, 16, 32, 64, 128, 256) if size <= max_batch_size]
    return tuple(sizes[-3:]) or (max_batch_size,)


def _quoted(text: str) -> str:
    return json.dumps(text)  # a JSON string is a valid protobuf text-format string


def _dims(values: Sequence[int]) -> str:
    return "[ " + ", ".join(str(value) for value in values) + " ]"


def _io_sections(card: ModelCard) -> str:
    dtype = _TRITON_DTYPES[card.input.dtype]
    return (
        "input [\n"
        "  {\n"
        f"    name: {_quoted(card.input.name)}\n"
        f"    data_type: {dtype}\n"
        f"    dims: {_dims((3, card.input.height, card.input.width))}\n"
        "  }\n"
        "]\n"
        "output [\n"
        "  {\n"
        f"    name: {_quoted(card.output.name)}\n"
        "    data_type: TYPE_FP32\n"
        f"    dims: {_dims((card.output.dimension,))}\n"
        "  }\n"
        "]\n"
    )


def _parameters(values: dict[str, str]) -> str:
    return "".join(
        f"parameters {{\n  key: {_quoted(key)}\n  value {{ string_value: {_quoted(value)} }}\n}}\n"
        for key, value in values.items()
    )


def _dynamic_batching(options: TritonRepoOptions, preferred: tuple[int, ...]) -> str:
    return (
        "dynamic_batching {\n"
        f"  preferred_batch_size: {_dims(preferred)}\n"
        f"  max_queue_delay_microseconds: {options.max_queue_delay_us}\n"
        "}\n"
    )


def _shape_spec(card: ModelCard, batch: int) -> str:
    return f"{card.input.name}:{batch}x3x{card.input.height}x{card.input.width}"


def tensorrt_precision_for(card: ModelCard, requested: str | None) -> str:
    if requested is not None:
        return requested
    return "INT8" if card.quantization is not None else "FP16"


def gpu_config(card: ModelCard, name: str, options: TritonRepoOptions) -> str:
    """config.pbtxt for Triton's onnxruntime backend on GPU with the TensorRT accelerator."""
    preferred = options.preferred_batch_sizes or default_preferred_batch_sizes(options.max_batch_size)
    precision = tensorrt_precision_for(card, options.tensorrt_precision)
    gpus = f"    gpus: {_dims(options.gpus)}\n" if options.gpus else ""
    dtype = _TRITON_DTYPES[card.input.dtype]
    # Warm-up at batch 1 and at the largest batch: TensorRT builds its engine for the shapes it sees.
    warmups = "".join(
        "model_warmup {\n"
        f"  name: \"warmup_batch_{batch}\"\n"
        f"  batch_size: {batch}\n"
        "  inputs {\n"
        f"    key: {_quoted(card.input.name)}\n"
        "    value {\n"
        f"      data_type: {dtype}\n"
        f"      dims: {_dims((3, card.input.height, card.input.width))}\n"
        "      zero_data: true\n"
        "    }\n"
        "  }\n"
        "}\n"
        for batch in sorted({1, options.max_batch_size})
    )
    tensorrt_parameters = {
        "precision_mode": precision,
        "max_workspace_size_bytes": str(options.tensorrt_workspace_bytes),
        # Engines are built once per shape range and kept beside the model (inside the container).
        "trt_engine_cache_enable": "1",
        "trt_engine_cache_path": "/tmp/triton_trt_cache",
        # One optimisation profile over the whole batch range, tuned for the largest preferred
        # batch: no engine rebuild when a batch size first appears.
        "trt_profile_min_shapes": _shape_spec(card, 1),
        "trt_profile_opt_shapes": _shape_spec(card, max(preferred)),
        "trt_profile_max_shapes": _shape_spec(card, options.max_batch_size),
    }
    accelerator_parameters = "".join(
        f"        parameters {{ key: {_quoted(key)} value: {_quoted(value)} }}\n"
        for key, value in tensorrt_parameters.items()
    )
    return (
        f"name: {_quoted(name)}\n"
        "platform: \"onnxruntime_onnx\"\n"
        f"max_batch_size: {options.max_batch_size}\n"
        + _io_sections(card)
        + _dynamic_batching(options, preferred)
        + "instance_group [\n"
        "  {\n"
        "    kind: KIND_GPU\n"
        f"    count: {options.instance_count}\n"
        + gpus
        + "  }\n"
        "]\n"
        "optimization {\n"
        "  execution_accelerators {\n"
        "    gpu_execution_accelerator [\n"
        "      {\n"
        "        name: \"tensorrt\"\n"
        + accelerator_parameters
        + "      }\n"
        "    ]\n"
        "  }\n"
        "}\n"
        + warmups
        + _parameters({CARD_NAME_PARAMETER: card.name, CARD_VERSION_PARAMETER: card.version})
    )


def cpu_config(card: ModelCard, name: str, options: TritonRepoOptions) -> str:
    """config.pbtxt for Triton's python backend running model.py (onnxruntime CPU)."""
    preferred = options.preferred_batch_sizes or default_preferred_batch_sizes(options.max_batch_size)
    return (
        f"name: {_quoted(name)}\n"
        "backend: \"python\"\n"
        f"max_batch_size: {options.max_batch_size}\n"
        + _io_sections(card)
        + _dynamic_batching(options, preferred)
        + "instance_group [\n"
        "  {\n"
        "    kind: KIND_CPU\n"
        f"    count: {options.instance_count}\n"
        "  }\n"
        "]\n"
        + _parameters({
            CARD_NAME_PARAMETER: card.name,
            CARD_VERSION_PARAMETER: card.version,
            "intra_op_threads": str(options.cpu_threads),
        })
    )


# Runs inside Triton's python backend stub, with the Python environment Triton was started with
# (it needs numpy<2 and onnxruntime), not the embedder's.
PYTHON_MODEL_SOURCE = '''\
"""vsearch embedding model for Triton's python backend: onnxruntime (CPU) on the model.onnx beside
this file. Written by `vsearch model triton-repo --flavour cpu`. Triton's dynamic batcher hands
execute() several requests at once; they run as one onnxruntime batch."""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(parameters.get("intra_op_threads", "0"))
        self.session = ort.InferenceSession(
            os.path.join(version_dir, "model.onnx"), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        self.input_dtype = pb_utils.triton_string_to_numpy(config["input"][0]["data_type"])

    def execute(self, requests):
        batches = [pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy() for request in requests]
        try:
            stacked = np.concatenate(batches).astype(self.input_dtype, copy=False)
            (output,) = self.session.run([self.output_name], {self.input_name: stacked})
            output = np.ascontiguousarray(output, dtype=np.float32)
        except Exception as error:  # one failed run fails every request in it
            message = f"onnxruntime failed on a batch of {sum(len(batch) for batch in batches)}: {error}"
            return [pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))
                    for _ in requests]
        responses, start = [], 0
        for batch in batches:
            rows = output[start:start + len(batch)]
            start += len(batch)
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(self.output_name, rows)]))
        return responses

    def finalize(self):
        self.session = None
'''


def _check_options(options: TritonRepoOptions) -> None:
    if options.flavour not in FLAVOURS:
        raise TritonRepoError(f"unknown flavour {options.flavour!r} (use {' or '.join(FLAVOURS)})")
    if options.max_batch_size < 1:
        raise TritonRepoError("max_batch_size must be at least 1")
    if options.model_version < 1:
        raise TritonRepoError("the model version must be a positive integer")
    if options.instance_count < 1:
        raise TritonRepoError("the instance count must be at least 1")
    if options.max_queue_delay_us < 0:
        raise TritonRepoError("the max queue delay cannot be negative")
    bad = [size for size in (options.preferred_batch_sizes or ()) if not 1 <= size <= options.max_batch_size]
    if bad:
        raise TritonRepoError(f"preferred batch sizes {bad} are outside 1..{options.max_batch_size}")


def write_triton_repo(model_dir: Path, repo_dir: Path, options: TritonRepoOptions = TritonRepoOptions()) -> WrittenRepo:
    """Writes (or replaces) one model in the repository `repo_dir`; other models there are left alone."""
    _check_options(options)
    card = read_model_card(model_dir)
    source = model_dir / MODEL_FILE_NAME
    if not source.is_file():
        raise TritonRepoError(f"no {MODEL_FILE_NAME} in {model_dir}")
    name = options.model_name or card.name
    if not _MODEL_NAME.match(name):
        raise TritonRepoError(f"{name!r} cannot be a Triton model name (letters, digits, '_', '.', '-')")
    model_root = repo_dir / name
    # Replace this model's directory as a whole: a stale version or config must not survive.
    staging = repo_dir / f".{name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / str(options.model_version)).mkdir(parents=True)
    shutil.copyfile(source, staging / str(options.model_version) / MODEL_FILE_NAME)
    shutil.copyfile(model_dir / CARD_FILE_NAME, staging / CARD_FILE_NAME)
    if options.flavour == "gpu":
        config = gpu_config(card, name, options)
    else:
        config = cpu_config(card, name, options)
        (staging / str(options.model_version) / PYTHON_MODEL_FILE_NAME).write_text(PYTHON_MODEL_SOURCE)
    (staging / CONFIG_FILE_NAME).write_text(config)
    if model_root.exists():
        shutil.rmtree(model_root)
    staging.replace(model_root)
    return WrittenRepo(repo_dir, name, options.model_version, model_root / CONFIG_FILE_NAME, card)
