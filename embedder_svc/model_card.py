"""The model card: everything needed to turn an image into the tensor a prepared model expects, and
what comes out of it. Written as ``model_card.json`` beside ``model.onnx`` by `vsearch model prepare`;
the embedder's preprocessing is driven by it alone."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

CARD_FILE_NAME = "model_card.json"
MODEL_FILE_NAME = "model.onnx"
# Parameters of a Triton model config (written by `vsearch model triton-repo`) naming the card it was
# made from, so the embedder can refuse a Triton model that does not match its own card.
CARD_NAME_PARAMETER = "vsearch_card_name"
CARD_VERSION_PARAMETER = "vsearch_card_version"


class ModelCardError(Exception):
    """A model directory without a readable, valid card."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelSource(_Frozen):
    """The classification model the embedding model was cut from."""

    file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    url: str | None = None


class InputSpec(_Frozen):
    name: str
    height: int = Field(gt=0)
    width: int = Field(gt=0)
    layout: Literal["NCHW"] = "NCHW"
    dtype: Literal["float32", "float16"] = "float32"


class Preprocessing(_Frozen):
    """Resize the shorter side to `resize_shorter`, center-crop `crop` x `crop`, reorder channels,
    then per channel ``(pixel * pixel_scale - mean) / std``, with mean/std in `channel_order`."""

    resize_shorter: int = Field(gt=0)
    crop: int = Field(gt=0)
    interpolation: Literal["nearest", "bilinear", "bicubic", "lanczos"] = "bilinear"
    channel_order: Literal["RGB", "BGR"]
    pixel_scale: float = Field(gt=0)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @model_validator(mode="after")
    def _check(self) -> Preprocessing:
        if self.crop > self.resize_shorter:
            raise ValueError(f"crop {self.crop} is larger than resize_shorter {self.resize_shorter}")
        if any(value <= 0 for value in self.std):
            raise ValueError("std values must be positive")
        return self

    def summary(self) -> str:
        def numbers(values: tuple[float, ...]) -> str:
            return "[" + ",".join(f"{value:g}" for value in values) + "]"

        scale = "/255" if abs(self.pixel_scale - 1 / 255) < 1e-9 else f"x{self.pixel_scale:g}"
        return (
            f"{self.channel_order} resize {self.resize_shorter} ({self.interpolation}) crop {self.crop} "
            f"{scale} mean {numbers(self.mean)} std {numbers(self.std)}"
        )


class OutputSpec(_Frozen):
    name: str
    dimension: int = Field(gt=0)
    pooling: Literal["avg", "gem"]
    gem_p: float | None = None
    # False: the service normalises the vectors itself.
    l2_normalized: bool


class Quantization(_Frozen):
    """How `vsearch model quantize` made this model from a float one (absent on float models)."""

    method: Literal["static_qdq"] = "static_qdq"
    weight_type: Literal["int8", "uint8"]
    activation_type: Literal["int8", "uint8"]
    per_channel: bool
    calibration_method: Literal["minmax", "entropy", "percentile"]
    calibration_images: int = Field(gt=0)
    # sha256 over the calibration images' bytes, in the order used: the same set gives the same model.
    calibration_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    # The float model it was quantized from.
    float_version: str
    float_model_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    # What the accuracy guard measured (float, int8), on `guard_eval_set`.
    guard_metric: str | None = None
    guard_float: float | None = None
    guard_int8: float | None = None
    guard_eval_set: str | None = None


class PcaReduction(_Frozen):
    """How `vsearch model pca` reduced this model's vectors (absent on unreduced models): the graph
    ends in subtract `mean`, project onto the top `dimension` principal components (each divided by
    the square root of its variance when `whiten`), L2-normalise."""

    source_name: str
    source_version: str
    source_model_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    source_dimension: int = Field(gt=1)
    dimension: int = Field(gt=0)
    whiten: bool
    fit_images: int = Field(gt=1)
    # Where the fit images came from, in words (folder or manifest, sampling).
    fit_set: str
    # Share of the source vectors' variance (about their mean) kept, in all and per component.
    explained_variance_ratio: float = Field(ge=0, le=1)
    component_variance_ratios: list[float]
    # sha256 over the float32 mean and projection the graph holds.
    projection_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    @model_validator(mode="after")
    def _check(self) -> PcaReduction:
        if self.dimension >= self.source_dimension:
            raise ValueError(f"dimension {self.dimension} is not below the source's {self.source_dimension}")
        if len(self.component_variance_ratios) != self.dimension:
            raise ValueError(f"{len(self.component_variance_ratios)} component variance ratios for {self.dimension} components")
        return self


class ModelCard(_Frozen):
    schema_version: Literal[1] = 1
    name: str
    # Changes whenever the vectors would: derived from the source, cut, pooling and preprocessing.
    version: str
    source: ModelSource
    feature_tensor: str
    input: InputSpec
    preprocessing: Preprocessing
    output: OutputSpec
    # Set on models written by `vsearch model quantize`.
    quantization: Quantization | None = None
    # Set on models written by `vsearch model pca`.
    pca: PcaReduction | None = None

    @model_validator(mode="after")
    def _check(self) -> ModelCard:
        crop = self.preprocessing.crop
        if (self.input.height, self.input.width) != (crop, crop):
            raise ValueError(
                f"preprocessing crops {crop}x{crop} but the model input is {self.input.height}x{self.input.width}"
            )
        if self.output.pooling == "gem" and (self.output.gem_p is None or self.output.gem_p <= 0):
            raise ValueError("gem pooling needs a positive gem_p")
        if self.pca is not None and self.pca.dimension != self.output.dimension:
            raise ValueError(f"the PCA keeps {self.pca.dimension} dimensions but the output has {self.output.dimension}")
        return self

    def preprocessing_summary(self) -> str:
        return f"{self.preprocessing.summary()} {self.input.layout} {self.input.dtype}"

    @staticmethod
    def derive_version(
        source: ModelSource, feature_tensor: str, input_spec: InputSpec, preprocessing: Preprocessing, output: OutputSpec
    ) -> str:
        defining = {
            "source_sha256": source.sha256,
            "feature_tensor": feature_tensor,
            "input": input_spec.model_dump(mode="json"),
            "preprocessing": preprocessing.model_dump(mode="json"),
            "output": output.model_dump(mode="json", exclude={"name"}),
        }
        digest = hashlib.sha256(json.dumps(defining, sort_keys=True).encode()).hexdigest()
        return digest[:12]

    @staticmethod
    def derive_quantized_version(float_version: str, quantization: Quantization, model_sha256: str) -> str:
        """A quantized model's version: the float model's, how it was quantized, and the result."""
        defining = {
            "float_version": float_version,
            "quantization": quantization.model_dump(mode="json", exclude={"guard_metric", "guard_float", "guard_int8", "guard_eval_set"}),
            "model_sha256": model_sha256,
        }
        return hashlib.sha256(json.dumps(defining, sort_keys=True).encode()).hexdigest()[:12]

    @staticmethod
    def derive_pca_version(source_version: str, pca: PcaReduction) -> str:
        """A PCA-reduced model's version: the source model's and the reduction (its projection included)."""
        defining = {"source_version": source_version, "pca": pca.model_dump(mode="json", exclude={"fit_set"})}
        return hashlib.sha256(json.dumps(defining, sort_keys=True).encode()).hexdigest()[:12]

    def to_json(self) -> str:
        # Cards without these keep the form they always had (no "quantization": null, "pca": null).
        exclude = {name for name in ("quantization", "pca") if getattr(self, name) is None}
        return self.model_dump_json(indent=2, exclude=exclude or None) + "\n"


def read_model_card(model_dir: Path) -> ModelCard:
    path = model_dir / CARD_FILE_NAME
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ModelCardError(f"no {CARD_FILE_NAME} in {model_dir} (run `vsearch model prepare --out {model_dir}`)") from None
    except OSError as error:
        raise ModelCardError(f"cannot read {path}: {error}") from None
    try:
        return ModelCard.model_validate_json(text)
    except ValidationError as error:
        raise ModelCardError(f"invalid model card {path}: {error}") from None


def write_model_card(model_dir: Path, card: ModelCard) -> Path:
    """Written through a temporary file, so a reader never sees half a card."""
    path = model_dir / CARD_FILE_NAME
    partial = path.with_name(path.name + ".partial")
    partial.write_text(card.to_json())
    partial.replace(path)
    return path
