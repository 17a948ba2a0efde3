"""`vsearch model prepare`: a classification ONNX model in, an embedding model out.

The source graph is cut at a feature tensor, float16 is widened to float32, an NHWC input gets a
leading transpose (the card's input is always NCHW), symbolic spatial dimensions are fixed to the
crop, the batch dimension is made dynamic, and a head is appended: pooling (average or GeM, or none
for a tensor that is already a pooled [N, D] vector) -> flatten -> L2 normalisation. The result is
checked with onnx.checker and with onnxruntime (a batch gives the same vectors as its images one by
one), then written as ``model.onnx`` + ``model_card.json``.

The source is a preset (presets.py: checksum, cut and preprocessing known) or any image ONNX model,
described by the caller (`prepare_custom_model`: input, preprocessing, feature tensor, pooling)."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnx.version_converter
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from pydantic import ValidationError

from embedder_svc.model_card import (
    CARD_FILE_NAME,
    MODEL_FILE_NAME,
    InputSpec,
    ModelCard,
    ModelCardError,
    ModelSource,
    OutputSpec,
    Preprocessing,
    read_model_card,
    write_model_card,
)
from service_kit.file_digest import file_sha256
from vsearch_cli.checkout import default_shared_dir
from vsearch_cli.model_tools.presets import DEFAULT_PRESET, PRESETS, InputLayout, ModelPreset, Pooling

logger = logging.getLogger(__name__)

OUTPUT_NAME = "embedding"
BATCH_DIM = "batch"
# Oldest default-domain opset the appended head is written for (Clip takes `min` as an input).
_MIN_OPSET = 11
_UPGRADE_OPSET = 13
_EPSILON = 1e-12
_VERIFY_BATCH = 3
_VERIFY_TOLERANCE = 1e-5
# A feature tensor named like a tensor the head writes is renamed to this prefix + its name.
_SOURCE_PREFIX = "source/"
# Defaults of a custom model's preprocessing: the torchvision ImageNet convention (0..1, ImageNet
# mean/std, shorter side = crop / 0.875).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_RATIO = 0.875


class ModelPrepareError(Exception):
    """The source model cannot be found, fetched or turned into an embedding model."""


class ChecksumMismatchError(ModelPrepareError):
    pass


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "vsearch" / "models"


def _check_sha256(what: str, actual: str, expected: str, hint: str = "") -> None:
    if actual != expected:
        raise ChecksumMismatchError(f"checksum mismatch for {what}: sha256 is {actual}, expected {expected}{hint}")


def download_verified(url: str, destination: Path, sha256: str, timeout_s: float = 60.0) -> Path:
    """Fetches `url` to `destination` only if its sha256 matches; on any failure nothing is left."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    handle, partial_name = tempfile.mkstemp(dir=destination.parent, prefix=destination.name + ".", suffix=".partial")
    partial = Path(partial_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(handle, "wb") as out, urllib.request.urlopen(url, timeout=timeout_s) as response:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        _check_sha256(url, digest.hexdigest(), sha256, " (download discarded)")
        partial.replace(destination)
    except (urllib.error.URLError, OSError) as error:
        partial.unlink(missing_ok=True)
        raise ModelPrepareError(f"cannot download {url}: {error}") from error
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return destination


@dataclass(frozen=True)
class ResolvedSource:
    path: Path
    sha256: str


def resolve_source(
    preset: ModelPreset,
    source: Path | None = None,
    *,
    verify_checksum: bool = True,
    shared_dir: Path | None = None,
    cache_dir: Path | None = None,
) -> ResolvedSource:
    """An explicit file, else the shared copy, else the download cache (fetching it if needed).
    Every file is checked against the preset's sha256 unless `verify_checksum` is False."""
    if source is not None:
        if not source.is_file():
            raise ModelPrepareError(f"source model {source} not found")
        return _verified_local(source, preset, verify_checksum)
    shared = (shared_dir or default_shared_dir()) / "models" / preset.name / preset.file_name
    if shared.is_file():
        return _verified_local(shared, preset, verify_checksum)
    cached = (cache_dir or default_cache_dir()) / preset.file_name
    if cached.is_file():
        sha256 = file_sha256(cached)
        if sha256 == preset.sha256:
            return ResolvedSource(cached, sha256)
        logger.warning("cached %s has the wrong checksum; downloading it again", cached)
        cached.unlink()
    if preset.url is None:
        raise ModelPrepareError(f"{preset.name}: no source file at {shared} and no download URL known")
    logger.info("downloading %s to %s", preset.url, cached)
    download_verified(preset.url, cached, preset.sha256)
    return ResolvedSource(cached, preset.sha256)


def _verified_local(path: Path, preset: ModelPreset, verify_checksum: bool) -> ResolvedSource:
    sha256 = file_sha256(path)
    if verify_checksum:
        hint = f" for preset {preset.name} (a corrupt or different file; skip the check only for a deliberately different model)"
        _check_sha256(str(path), sha256, preset.sha256, hint)
    return ResolvedSource(path, sha256)


# --- graph surgery ----------------------------------------------------------------------------


def _default_opset(model: onnx.ModelProto) -> int:
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            return opset.version
    raise ModelPrepareError("the model imports no default-domain opset")


def cut_at(model: onnx.ModelProto, input_name: str, feature_tensor: str) -> onnx.ModelProto:
    """The subgraph from `input_name` to `feature_tensor`, which becomes the only output."""
    graph = model.graph
    initializers = {tensor.name for tensor in graph.initializer}
    inputs = {value.name: value for value in graph.input if value.name not in initializers}
    if input_name not in inputs:
        raise ModelPrepareError(f"the model has no input {input_name!r} (inputs: {', '.join(inputs)})")
    producer = {name: index for index, node in enumerate(graph.node) for name in node.output if name}
    if feature_tensor not in producer:
        raise ModelPrepareError(f"no node of the model produces the tensor {feature_tensor!r}")
    keep: set[int] = set()
    pending = [feature_tensor]
    while pending:
        name = pending.pop()
        if not name or name == input_name or name in initializers:
            continue
        if name not in producer:
            raise ModelPrepareError(f"{feature_tensor!r} depends on {name!r}, which is not computed from {input_name!r}")
        index = producer[name]
        if index not in keep:
            keep.add(index)
            pending.extend(graph.node[index].input)
    nodes = [graph.node[index] for index in sorted(keep)]  # source order is topological
    used = {name for node in nodes for name in node.input}
    known = {value.name: value for value in [*graph.value_info, *graph.output]}
    output = known.get(feature_tensor) or helper.make_tensor_value_info(feature_tensor, TensorProto.FLOAT, None)
    cut = helper.make_graph(
        nodes,
        graph.name or "embedding",
        [inputs[input_name]],
        [output],
        initializer=[tensor for tensor in graph.initializer if tensor.name in used],
    )
    result = onnx.ModelProto()
    result.CopyFrom(model)
    result.graph.CopyFrom(cut)
    return result


def float16_to_float32(model: onnx.ModelProto) -> bool:
    """Widens every float16 tensor, type and cast in the main graph, in place; True if any was.
    onnxruntime's CPU provider lacks float16 kernels for much of what such models use."""
    changed = False

    def widen_tensor(tensor: onnx.TensorProto) -> None:
        nonlocal changed
        if tensor.data_type == TensorProto.FLOAT16:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float32), tensor.name))
            changed = True

    def widen_type(value: onnx.ValueInfoProto) -> None:
        nonlocal changed
        if value.type.tensor_type.elem_type == TensorProto.FLOAT16:
            value.type.tensor_type.elem_type = TensorProto.FLOAT
            changed = True

    graph = model.graph
    for tensor in graph.initializer:
        widen_tensor(tensor)
    for value in [*graph.input, *graph.output, *graph.value_info]:
        widen_type(value)
    with_subgraphs = []
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR:
                widen_tensor(attribute.t)
            elif attribute.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                with_subgraphs.append(node.name or node.op_type)
            elif node.op_type == "Cast" and attribute.name == "to" and attribute.i == TensorProto.FLOAT16:
                attribute.i = TensorProto.FLOAT
                changed = True
    if changed and with_subgraphs:
        raise ModelPrepareError(f"cannot widen float16 inside subgraphs (nodes {', '.join(with_subgraphs)})")
    return changed


def make_batch_dynamic(model: onnx.ModelProto, input_name: str) -> None:
    """In place. Stale intermediate shapes (with the old fixed batch) are dropped too."""
    (value,) = [value for value in model.graph.input if value.name == input_name]
    dims = value.type.tensor_type.shape.dim
    if len(dims) != 4:
        raise ModelPrepareError(f"input {input_name!r} has {len(dims)} dimensions; expected NCHW")
    dims[0].Clear()
    dims[0].dim_param = BATCH_DIM
    del model.graph.value_info[:]


def _input_dims(model: onnx.ModelProto, input_name: str) -> list[int | str | None]:
    """The declared dimensions of an input: a number, a symbolic name, or None when unknown."""
    (value,) = [value for value in model.graph.input if value.name == input_name]
    return [
        dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or None)
        for dim in value.type.tensor_type.shape.dim
    ]


def guess_layout(model: onnx.ModelProto, input_name: str) -> InputLayout:
    """NHWC when the declared input is [N, H, W, 3] and not [N, 3, H, W]; NCHW otherwise."""
    dims = _input_dims(model, input_name)
    if len(dims) == 4 and dims[3] == 3 and dims[1] != 3:
        return "NHWC"
    return "NCHW"


def nchw_input(model: onnx.ModelProto, input_name: str) -> None:
    """In place: an NHWC input becomes NCHW (same name) followed by a Transpose to what the graph
    read before, so the card's NCHW tensors fit a model exported from an NHWC framework."""
    graph = model.graph
    (value,) = [value for value in graph.input if value.name == input_name]
    dims = value.type.tensor_type.shape.dim
    if len(dims) != 4:
        raise ModelPrepareError(f"input {input_name!r} has {len(dims)} dimensions; expected NHWC")
    internal = f"{input_name}/nhwc"
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name == input_name:
                node.input[index] = internal
    reordered = [onnx.TensorShapeProto.Dimension() for _ in range(4)]
    for target, source in zip(reordered, (dims[0], dims[3], dims[1], dims[2])):
        target.CopyFrom(source)
    del dims[:]
    dims.extend(reordered)
    graph.node.insert(0, helper.make_node("Transpose", [input_name], [internal], name="input/to_nhwc", perm=[0, 2, 3, 1]))


def fix_input_size(model: onnx.ModelProto, input_name: str, size: int) -> None:
    """In place: an NCHW input's 3 channels and `size` x `size` pixels, written where the model left
    them symbolic (the embedder always feeds the card's crop, and fixed sizes let onnxruntime and
    the quantizer fold shape computations); a different fixed size or channel count is an error."""
    (value,) = [value for value in model.graph.input if value.name == input_name]
    dims = value.type.tensor_type.shape.dim
    if len(dims) != 4:
        raise ModelPrepareError(f"input {input_name!r} has {len(dims)} dimensions; expected NCHW")
    for dim, wanted, what in ((dims[1], 3, "channels"), (dims[2], size, "height"), (dims[3], size, "width")):
        if dim.HasField("dim_value") and dim.dim_value != wanted:
            detail = f"the model input has {dim.dim_value} {what}" + ("" if what == "channels" else f"; the crop is {size}x{size}")
            raise ModelPrepareError(f"{detail} (input {input_name!r} is {_shape_text(dims)})")
        dim.Clear()
        dim.dim_value = wanted


def _shape_text(dims: object) -> str:
    return "[" + ", ".join(
        str(dim.dim_value) if dim.HasField("dim_value") else (dim.dim_param or "?") for dim in dims  # type: ignore[attr-defined]
    ) + "]"


def rename_tensor(model: onnx.ModelProto, old: str, new: str) -> None:
    """In place: every use of the tensor name `old` (node inputs and outputs, graph outputs, shapes)."""
    graph = model.graph
    for node in graph.node:
        for names in (node.input, node.output):
            for index, name in enumerate(names):
                if name == old:
                    names[index] = new
    for value in [*graph.output, *graph.value_info]:
        if value.name == old:
            value.name = new


def probe_feature_shape(model: onnx.ModelProto, input_name: str, feature_tensor: str, size: int) -> list[int]:
    """The feature tensor's shape for one size x size image, run on onnxruntime (static shape
    inference cannot always follow the graph, e.g. padding computed from the input's shape)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.append(helper.make_tensor_value_info(feature_tensor, TensorProto.FLOAT, None))
    try:
        session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
        (features,) = session.run([feature_tensor], {input_name: np.zeros((1, 3, size, size), dtype=np.float32)})
    except Exception as error:  # noqa: BLE001 - onnxruntime's errors share no base class
        raise ModelPrepareError(f"onnxruntime cannot run the model up to {feature_tensor!r}: {error}") from error
    return list(np.asarray(features).shape)


def resolve_pooling(pooling: Pooling | None, shape: list[int], feature_tensor: str) -> Pooling:
    """The pooling for a feature tensor of this shape (batch 1): a map [1, C, h, w] is pooled (average
    when not given), a vector [1, D] (or a 1x1 map) is not; a pooling that cannot apply is an error."""
    shape_text = "[N, " + ", ".join(str(dim) for dim in shape[1:]) + "]"
    if len(shape) == 2 or (len(shape) == 4 and shape[2] * shape[3] == 1):
        if pooling in (None, "none"):
            return "none"
        if len(shape) == 2:
            raise ModelPrepareError(
                f"the feature tensor {feature_tensor!r} is already a pooled vector {shape_text}; use --pooling none")
        return pooling
    if len(shape) == 4:
        if pooling == "none":
            raise ModelPrepareError(
                f"the feature tensor {feature_tensor!r} is a {shape[1]}x{shape[2]}x{shape[3]} map {shape_text}, not a "
                f"vector; pool it (--pooling avg or gem) or cut at a pooled tensor")
        return pooling or "avg"
    raise ModelPrepareError(
        f"the feature tensor {feature_tensor!r} has shape {shape_text}; expected a map [N, C, h, w] or a vector [N, D]")


def append_head(model: onnx.ModelProto, feature_tensor: str, pooling: Pooling, gem_p: float) -> None:
    """In place: feature [N, C, h, w] -> pooled -> [N, C] -> L2-normalised, as the only output. With
    pooling "none" the feature is already [N, D] (or [N, D, 1, 1]): flattened and normalised only."""
    graph = model.graph

    def constant(name: str, value: float) -> str:
        graph.initializer.append(numpy_helper.from_array(np.array(value, dtype=np.float32), name))
        return name

    nodes = []
    features = feature_tensor
    if pooling == "gem":
        # GeM: (mean(max(x, eps)^p))^(1/p); eps keeps Pow away from zero and negatives.
        nodes += [
            helper.make_node("Clip", [features, constant("head/gem_eps", 1e-6)], ["head/gem_clipped"], name="head/gem_clip"),
            helper.make_node("Pow", ["head/gem_clipped", constant("head/gem_p", gem_p)], ["head/gem_powered"], name="head/gem_pow"),
        ]
        features = "head/gem_powered"
    pooled = features
    if pooling != "none":
        nodes.append(helper.make_node("GlobalAveragePool", [features], ["head/pooled"], name="head/pool"))
        pooled = "head/pooled"
    if pooling == "gem":
        nodes.append(helper.make_node("Pow", [pooled, constant("head/gem_inv_p", 1.0 / gem_p)], ["head/gem_root"], name="head/gem_root"))
        pooled = "head/gem_root"
    nodes.append(helper.make_node("Flatten", [pooled], ["head/flat"], name="head/flatten", axis=1))
    nodes += l2_normalise_nodes(model, "head/flat", OUTPUT_NAME, "head/")
    graph.node.extend(nodes)
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [BATCH_DIM, None]))


def l2_normalise_nodes(model: onnx.ModelProto, source: str, output: str, prefix: str) -> list[onnx.NodeProto]:
    """Nodes for `output` = `source` [N, D] / max(||row||, eps); their constants are added to the
    graph's initializers, their names start with `prefix`."""
    graph = model.graph
    nodes = []
    if _default_opset(model) >= 18:  # ReduceL2 takes its axes as an input from opset 18
        graph.initializer.append(numpy_helper.from_array(np.array([1], dtype=np.int64), f"{prefix}l2_axes"))
        nodes.append(helper.make_node("ReduceL2", [source, f"{prefix}l2_axes"], [f"{prefix}norm"], name=f"{prefix}l2", keepdims=1))
    else:
        nodes.append(helper.make_node("ReduceL2", [source], [f"{prefix}norm"], name=f"{prefix}l2", axes=[1], keepdims=1))
    graph.initializer.append(numpy_helper.from_array(np.array(_EPSILON, dtype=np.float32), f"{prefix}l2_eps"))
    nodes += [
        # An all-zero vector stays zero instead of becoming NaN.
        helper.make_node("Max", [f"{prefix}norm", f"{prefix}l2_eps"], [f"{prefix}norm_safe"], name=f"{prefix}l2_guard"),
        helper.make_node("Div", [source, f"{prefix}norm_safe"], [output], name=f"{prefix}normalise"),
    ]
    return nodes


def _upgrade_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    if _default_opset(model) >= _MIN_OPSET:
        return model
    try:
        return onnx.version_converter.convert_version(model, _UPGRADE_OPSET)
    except Exception as error:  # noqa: BLE001 - the converter raises assorted errors
        raise ModelPrepareError(f"cannot convert the model to opset {_UPGRADE_OPSET}: {error}") from error


def _set_ir_version(model: onnx.ModelProto) -> None:
    """Old IR (< 4) wants initializers listed as graph inputs, which the cut graph no longer does."""
    needed = helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    model.ir_version = max(model.ir_version, needed, 4)


def build_embedding_model(
    source: onnx.ModelProto,
    input_name: str,
    feature_tensor: str,
    pooling: Pooling | None,
    gem_p: float,
    size: int,
    layout: InputLayout = "NCHW",
) -> tuple[onnx.ModelProto, Pooling]:
    """The embedding model, and the pooling it got (`pooling` None: chosen from the feature's shape)."""
    model = cut_at(source, input_name, feature_tensor)
    float16_to_float32(model)
    _set_ir_version(model)
    model = _upgrade_opset(model)
    _set_ir_version(model)
    if layout == "NHWC":
        nchw_input(model, input_name)
    fix_input_size(model, input_name, size)
    make_batch_dynamic(model, input_name)
    features = feature_tensor
    if features == OUTPUT_NAME or features.startswith(("head/", _SOURCE_PREFIX)):
        # E.g. EfficientNet-Lite2's pooled "embedding": the head's output takes that name.
        features = _SOURCE_PREFIX + feature_tensor
        rename_tensor(model, feature_tensor, features)
    pooling = resolve_pooling(pooling, probe_feature_shape(model, input_name, features, size), feature_tensor)
    append_head(model, features, pooling, gem_p)
    model.producer_name = "vsearch model prepare"
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as error:
        raise ModelPrepareError(f"the embedding model does not pass onnx.checker: {error}") from error
    return model, pooling


def verify_embedding_model(model: onnx.ModelProto, input_name: str, height: int, width: int) -> int:
    """Runs the model on onnxruntime CPU: a batch must give the same unit vectors as its images
    one at a time. Returns the embedding dimension."""
    try:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as error:  # noqa: BLE001 - onnxruntime's errors share no base class
        raise ModelPrepareError(f"onnxruntime cannot load the embedding model: {error}") from error
    batch = np.random.default_rng(0).standard_normal((_VERIFY_BATCH, 3, height, width)).astype(np.float32)
    (together,) = session.run([OUTPUT_NAME], {input_name: batch})
    alone = np.concatenate([session.run([OUTPUT_NAME], {input_name: batch[i : i + 1]})[0] for i in range(_VERIFY_BATCH)])
    if together.ndim != 2 or together.shape[0] != _VERIFY_BATCH:
        raise ModelPrepareError(f"embedding output has shape {list(together.shape)}; expected [{_VERIFY_BATCH}, D]")
    difference = float(np.abs(together - alone).max())
    if difference > _VERIFY_TOLERANCE:
        raise ModelPrepareError(f"batch and single-image embeddings differ by {difference:.2e}; the batch dimension is not truly dynamic")
    norms = np.linalg.norm(together, axis=1)
    if not np.allclose(norms, 1.0, atol=1e-4):
        raise ModelPrepareError(f"embeddings are not unit length (norms {norms.tolist()})")
    return int(together.shape[1])


def prepare_model(
    out_dir: Path,
    *,
    preset: str = DEFAULT_PRESET,
    source: Path | None = None,
    feature_tensor: str | None = None,
    pooling: Pooling | None = None,
    gem_p: float = 3.0,
    verify_checksum: bool = True,
    shared_dir: Path | None = None,
    cache_dir: Path | None = None,
) -> ModelCard:
    """Writes `out_dir`/model.onnx and `out_dir`/model_card.json; returns the card.

    `feature_tensor` and `pooling` default to the preset's; the preprocessing always comes from the
    preset (it belongs to the source model)."""
    if preset not in PRESETS:
        raise ModelPrepareError(f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    spec = PRESETS[preset]
    if feature_tensor and pooling is None and feature_tensor != spec.feature_tensor:
        pooling_choice: Pooling | None = None  # another cut: pooled or not as its shape says
    else:
        pooling_choice = pooling or spec.pooling
    _check_gem(pooling_choice, gem_p)
    resolved = resolve_source(spec, source, verify_checksum=verify_checksum, shared_dir=shared_dir, cache_dir=cache_dir)
    return _prepare(out_dir, spec, resolved, _load(resolved.path), feature_tensor or spec.feature_tensor,
                    pooling_choice, gem_p, shared_dir=shared_dir, cache_dir=cache_dir)


def _check_gem(pooling: Pooling | None, gem_p: float) -> None:
    if pooling == "gem" and gem_p <= 0:
        raise ModelPrepareError(f"GeM needs a positive p, got {gem_p}")


def _load(path: Path) -> onnx.ModelProto:
    try:
        return onnx.load(str(path))
    except Exception as error:  # noqa: BLE001 - protobuf decode errors vary
        raise ModelPrepareError(f"cannot read {path} as an ONNX model: {error}") from error


def _prepare(
    out_dir: Path, spec: ModelPreset, resolved: ResolvedSource, source_model: onnx.ModelProto, feature_tensor: str,
    pooling: Pooling | None, gem_p: float, *, shared_dir: Path | None = None, cache_dir: Path | None = None,
) -> ModelCard:
    size = spec.preprocessing.crop
    model, pooling = build_embedding_model(
        source_model, spec.input_name, feature_tensor, pooling, gem_p, size, spec.input_layout)
    dimension = verify_embedding_model(model, spec.input_name, size, size)
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = dimension

    card = _make_card(spec, resolved, feature_tensor, pooling, gem_p, dimension)
    # Search by words, where the source kept a classifier that is affine on these features (else the card
    # stays as it is, and the reason is logged). Imported here: text_search imports this module.
    from vsearch_cli.model_tools.text_search import add_text_search

    card = add_text_search(card, source_model, out_dir, input_name=spec.input_name, input_layout=spec.input_layout,
                           shared_dir=shared_dir or default_shared_dir(), cache_dir=cache_dir)
    write_prepared(out_dir, model, card)
    logger.info("prepared %s (%d-d, %s pooling) in %s", card.name, dimension, pooling, out_dir)
    return card


def _graph_inputs(model: onnx.ModelProto) -> list[str]:
    initializers = {tensor.name for tensor in model.graph.initializer}
    return [value.name for value in model.graph.input if value.name not in initializers]


_NAME_CHARACTERS = re.compile(r"[^A-Za-z0-9_.-]+")


def prepare_custom_model(
    out_dir: Path,
    source: Path,
    *,
    name: str | None = None,
    input_name: str | None = None,
    input_size: int | None = None,
    input_layout: InputLayout | Literal["auto"] = "auto",
    resize_shorter: int | None = None,
    interpolation: str = "bilinear",
    channel_order: str = "RGB",
    pixel_scale: float = 1 / 255,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
    feature_tensor: str | None = None,
    pooling: Pooling | None = None,
    gem_p: float = 3.0,
) -> ModelCard:
    """Any image ONNX model, no preset: the caller says how images become its input. Defaults: the
    model's only input, its declared square size, NCHW unless it is declared [N, H, W, 3], its only
    output as the feature tensor, pooling from the feature's shape (a map is averaged, a vector is
    left as it is), shorter side = size / 0.875, bilinear, RGB, 0..1 with ImageNet mean/std. The card
    records the source's sha256 (no checksum is expected) and the preprocessing given."""
    if not source.is_file():
        raise ModelPrepareError(f"source model {source} not found")
    _check_gem(pooling, gem_p)
    source_model = _load(source)
    inputs = _graph_inputs(source_model)
    if input_name is None:
        if len(inputs) != 1:
            raise ModelPrepareError(f"the model has {len(inputs)} inputs ({', '.join(inputs)}); name one with --input-name")
        input_name = inputs[0]
    elif input_name not in inputs:
        raise ModelPrepareError(f"the model has no input {input_name!r} (inputs: {', '.join(inputs)})")
    layout: InputLayout = guess_layout(source_model, input_name) if input_layout == "auto" else input_layout
    dims = _input_dims(source_model, input_name)
    if len(dims) != 4:
        raise ModelPrepareError(f"input {input_name!r} has {len(dims)} dimensions; expected an image batch (NCHW or NHWC)")
    height, width = (dims[2], dims[3]) if layout == "NCHW" else (dims[1], dims[2])
    if input_size is None:
        if not isinstance(height, int) or not isinstance(width, int) or height != width:
            raise ModelPrepareError(
                f"input {input_name!r} is declared {dims} ({layout}): give its square size with --input-size")
        input_size = height
    if feature_tensor is None:
        outputs = [value.name for value in source_model.graph.output]
        if len(outputs) != 1:
            raise ModelPrepareError(
                f"the model has {len(outputs)} outputs ({', '.join(outputs)}); name the feature tensor with --feature-tensor")
        feature_tensor = outputs[0]
    try:
        preprocessing = Preprocessing(
            resize_shorter=resize_shorter or round(input_size / RESIZE_RATIO), crop=input_size,
            interpolation=interpolation, channel_order=channel_order, pixel_scale=pixel_scale, mean=mean, std=std,
        )
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, item['loc'])) or 'preprocessing'}: {item['msg']}" for item in error.errors())
        raise ModelPrepareError(f"invalid preprocessing: {problems}") from None
    card_name = name or _NAME_CHARACTERS.sub("-", source.stem).strip("-.") or "model"
    resolved = ResolvedSource(source, file_sha256(source))
    spec = ModelPreset(
        name=card_name, file_name=source.name, sha256=resolved.sha256, url=None, input_name=input_name,
        feature_tensor=feature_tensor, pooling=pooling or "avg", preprocessing=preprocessing, input_layout=layout,
    )
    return _prepare(out_dir, spec, resolved, source_model, feature_tensor, pooling, gem_p)


def _make_card(
    spec: ModelPreset, resolved: ResolvedSource, feature_tensor: str, pooling: Pooling, gem_p: float, dimension: int
) -> ModelCard:
    source = ModelSource(file=resolved.path.name, sha256=resolved.sha256, url=spec.url)
    size = spec.preprocessing.crop
    input_spec = InputSpec(name=spec.input_name, height=size, width=size, layout="NCHW", dtype="float32")
    preprocessing: Preprocessing = spec.preprocessing
    output = OutputSpec(
        name=OUTPUT_NAME, dimension=dimension, pooling=pooling,
        gem_p=gem_p if pooling == "gem" else None, l2_normalized=True,
    )
    return ModelCard(
        name=spec.name,
        version=ModelCard.derive_version(source, feature_tensor, input_spec, preprocessing, output),
        source=source,
        feature_tensor=feature_tensor,
        input=input_spec,
        preprocessing=preprocessing,
        output=output,
    )


def write_prepared(out_dir: Path, model: onnx.ModelProto, card: ModelCard) -> None:
    """The card goes last: a directory with a card always has the matching model."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CARD_FILE_NAME).unlink(missing_ok=True)
    model_path = out_dir / MODEL_FILE_NAME
    partial = model_path.with_name(model_path.name + ".partial")
    partial.write_bytes(model.SerializeToString())
    partial.replace(model_path)
    write_model_card(out_dir, card)


def ensure_model(preset: str, models_dir: Path, *, shared_dir: Path | None = None, cache_dir: Path | None = None) -> Path:
    """`models_dir`/`preset`, prepared with the preset's defaults unless it already holds that
    preset's model. Returns the directory to give the embedder as EMBEDDER_MODEL_DIR. A model prepared
    before search by words existed (a preset that has it, a card without it) is prepared again, so an
    upgraded checkout's `vsearch up` does not keep refusing words."""
    target = models_dir / preset
    try:
        card = read_model_card(target)
        if card.name == preset and (target / MODEL_FILE_NAME).is_file():
            if card.text is not None or preset not in PRESETS or not PRESETS[preset].searchable_by_words:
                return target
            logger.info("%s was prepared without search by words: preparing it again", target)
    except ModelCardError:
        pass
    prepare_model(target, preset=preset, shared_dir=shared_dir, cache_dir=cache_dir)
    return target
