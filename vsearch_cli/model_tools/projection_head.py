"""What `vsearch model pca` and `vsearch model adapt` share: embedding images in-process exactly as the
embedder does, appending a linear projection (and L2 normalisation) after a prepared model's output,
and checking that the written graph computes what numpy computed.

The appended nodes are float32 and named `head/<tool>_*`, so `vsearch model quantize` keeps them float
like the rest of the head that `vsearch model prepare` appended."""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from embedder_svc.model_card import MODEL_FILE_NAME, ModelCard, ModelCardError, read_model_card
from embedder_svc.onnx_backend import OnnxRuntimeBackend
from vsearch_cli.model_tools.prepare import BATCH_DIM, ModelPrepareError, l2_normalise_nodes, verify_embedding_model
from vsearch_cli.model_tools.quantize import preprocessed_batches


class HeadError(Exception):
    """The model or the images do not allow the new head; nothing was written."""


# ---- the source model -----------------------------------------------------------------------------


def read_source(model_dir: Path, out_dir: Path) -> tuple[ModelCard, Path]:
    """The card and model file of a prepared model whose vectors a tool appends to."""
    if out_dir.resolve() == model_dir.resolve():
        raise HeadError("--out must differ from the source model's directory")
    try:
        card = read_model_card(model_dir)
    except ModelCardError as error:
        raise HeadError(str(error)) from None
    source_path = model_dir / MODEL_FILE_NAME
    if not source_path.is_file():
        raise HeadError(f"no {MODEL_FILE_NAME} in {model_dir}")
    if not card.output.l2_normalized:
        raise HeadError(f"{model_dir}'s card says its vectors are not L2-normalised in the graph; the new head is "
                        "fitted on, and appended after, unit vectors")
    return card, source_path


# ---- embedding images as the embedder does --------------------------------------------------------


@dataclass
class EmbeddedImages:
    vectors: np.ndarray  # [used, d] of the images that decoded, in the order given
    decoded: np.ndarray  # [n] bool: which of the images given decoded
    # The first preprocessed batch and its vectors: to check a written model against.
    sample_batch: np.ndarray
    sample_vectors: np.ndarray

    @property
    def used(self) -> int:
        return int(self.decoded.sum())

    @property
    def skipped(self) -> int:
        return int(len(self.decoded) - self.decoded.sum())


async def _embed(model_dir: Path, card: ModelCard, paths: Sequence[Path], batch_size: int) -> EmbeddedImages:
    backend = OnnxRuntimeBackend(model_dir / MODEL_FILE_NAME, card.input.name, card.output.name)
    vectors = np.zeros((len(paths), card.output.dimension), dtype=np.float32)
    decoded = np.zeros(len(paths), dtype=bool)
    sample: tuple[np.ndarray, np.ndarray] | None = None
    batches = preprocessed_batches(paths, card, batch_size)
    await backend.load()
    try:
        # Decoding the next batch overlaps the model's run on this one.
        pending = asyncio.ensure_future(asyncio.to_thread(next, batches, None))
        while (item := await pending) is not None:
            pending = asyncio.ensure_future(asyncio.to_thread(next, batches, None))
            indices, batch = item
            output = await backend.infer(batch)
            vectors[indices] = output
            decoded[indices] = True
            if sample is None:
                sample = (batch, output)
    finally:
        await backend.close()
    if sample is None:
        raise HeadError(f"none of the {len(paths)} images could be decoded")
    return EmbeddedImages(vectors[decoded], decoded, *sample)


def embed_images(model_dir: Path, card: ModelCard, paths: Sequence[Path], batch_size: int = 32) -> EmbeddedImages:
    """The model's vectors of `paths`: the embedder's decoder, its card-driven preprocessor and its
    onnxruntime backend, in-process. Images that do not decode are left out (`decoded` says which)."""
    return asyncio.run(_embed(model_dir, card, paths, batch_size))


# ---- the graph ------------------------------------------------------------------------------------


def append_projection(
    model: onnx.ModelProto, output_name: str, prefix: str, mean: np.ndarray, projection: np.ndarray,
    blend: float | None = None,
) -> int:
    """In place: the graph's only output `output_name` [N, d] (unit rows) becomes, under the same name,
    z = L2((x - mean) @ projection), [N, D]; with `blend` w in (0, 1), the concatenation
    [sqrt(1 - w) x, sqrt(w) z], [N, d + D], normalised again, so that the cosine of two vectors is
    (1 - w) times their source cosine plus w times their projected one. Returns the output dimension."""
    graph = model.graph
    outputs = [value.name for value in graph.output]
    if outputs != [output_name]:
        raise HeadError(f"expected the model's only output to be {output_name!r}, found {outputs}")
    if blend is not None and not 0.0 < blend < 1.0:
        raise HeadError(f"the blend weight must be between 0 and 1 (exclusive), got {blend}")
    source = f"{prefix}input"
    for node in graph.node:
        for names in (node.input, node.output):
            for index, name in enumerate(names):
                if name == output_name:
                    names[index] = source
    mean_name, projection_name = f"{prefix}mean", f"{prefix}projection"
    graph.initializer.extend([
        numpy_helper.from_array(np.asarray(mean, dtype=np.float32), mean_name),
        numpy_helper.from_array(np.asarray(projection, dtype=np.float32), projection_name),
    ])
    nodes = [
        helper.make_node("Sub", [source, mean_name], [f"{prefix}centred"], name=f"{prefix}centre"),
        helper.make_node("MatMul", [f"{prefix}centred", projection_name], [f"{prefix}projected"],
                         name=f"{prefix}project"),
    ]
    dimension = int(projection.shape[1])
    if blend is None:
        nodes += l2_normalise_nodes(model, f"{prefix}projected", output_name, prefix)
    else:
        graph.initializer.extend([
            numpy_helper.from_array(np.array(np.sqrt(1.0 - blend), dtype=np.float32), f"{prefix}source_weight"),
            numpy_helper.from_array(np.array(np.sqrt(blend), dtype=np.float32), f"{prefix}projected_weight"),
        ])
        nodes += l2_normalise_nodes(model, f"{prefix}projected", f"{prefix}projected_unit", f"{prefix}projected_")
        nodes += [
            helper.make_node("Mul", [source, f"{prefix}source_weight"], [f"{prefix}source_part"],
                             name=f"{prefix}weigh_source"),
            helper.make_node("Mul", [f"{prefix}projected_unit", f"{prefix}projected_weight"],
                             [f"{prefix}projected_part"], name=f"{prefix}weigh_projected"),
            helper.make_node("Concat", [f"{prefix}source_part", f"{prefix}projected_part"], [f"{prefix}joined"],
                             name=f"{prefix}join", axis=1),
        ]
        nodes += l2_normalise_nodes(model, f"{prefix}joined", output_name, prefix)
        dimension += int(projection.shape[0])
    graph.node.extend(nodes)
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [BATCH_DIM, dimension]))
    return dimension


def initializers_sha256(model: onnx.ModelProto, names: Sequence[str]) -> str:
    """sha256 over the named initializers' raw float32 bytes, in order."""
    tensors = {tensor.name: tensor for tensor in model.graph.initializer}
    digest = hashlib.sha256()
    for name in names:
        digest.update(np.ascontiguousarray(numpy_helper.to_array(tensors[name]), dtype=np.float32).tobytes())
    return digest.hexdigest()


def check_written_model(
    model: onnx.ModelProto, card: ModelCard, sample_batch: np.ndarray, expected: np.ndarray, tolerance: float = 1e-4,
) -> None:
    """The extended graph is valid ONNX, gives vectors of `expected`'s dimension, and reproduces
    `expected` (numpy's result for `sample_batch`) within `tolerance`."""
    try:
        onnx.checker.check_model(model)
        dimension = verify_embedding_model(model, card.input.name, card.input.height, card.input.width)
    except (onnx.checker.ValidationError, ModelPrepareError) as error:
        raise HeadError(f"the new model fails verification: {error}") from error
    if dimension != expected.shape[1]:
        raise HeadError(f"the new model gives {dimension}-d vectors, expected {expected.shape[1]}")
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (written,) = session.run([card.output.name], {card.input.name: sample_batch})
    difference = float(np.abs(written - expected).max())
    if difference > tolerance:
        raise HeadError(f"the new model differs from the numpy computation by {difference:.2e}")
