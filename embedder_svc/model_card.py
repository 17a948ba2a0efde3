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
    # "none": the feature tensor is already a pooled [N, D] vector (e.g. EfficientNet-Lite2's "embedding").
    pooling: Literal["avg", "gem", "none"]
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


class TextTokenizer(_Frozen):
    """How text becomes token ids (with the `tokenizers` package): `wordpiece` reads a BERT-style
    vocab.txt (one token per line, id = line number - 1); `tokenizer_json` a Hugging Face tokenizer.json
    (CLIP's byte-level BPE and any other). `file` is relative to the model directory."""

    kind: Literal["wordpiece", "tokenizer_json"]
    file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    # wordpiece only (a tokenizer.json carries its own normalisation).
    lowercase: bool = True
    # Longer texts are cut to this many tokens (special tokens included).
    max_length: int = Field(gt=1)
    # Pad every text to max_length (exports with a fixed sequence length, e.g. CLIP's 77), not just to
    # the longest of its batch.
    pad_to_max_length: bool = False
    pad_id: int = Field(0, ge=0)


class TextEncoderSpec(_Frozen):
    """An ONNX text encoder: `input_ids` (and `attention_mask`, `token_type_ids` when it takes them),
    int64 [N, L], in; `output` out, pooled by `pooling` ("mean" over the attention mask or "cls" for
    [N, L, E]; "none" when it is already [N, E]). `file` is relative to the model directory, or to the
    installed distribution `package` (a runtime dependency that ships the weights)."""

    file: str
    package: str | None = None
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    output: str
    pooling: Literal["mean", "cls", "none"]
    dimension: int = Field(gt=0)


class ClassifierText(_Frozen):
    """Text search through a classifier's classes (`TextSearch.kind` "classifier"): the text's sentence
    embedding is compared with the class names' (cosine); below `min_similarity` nothing matches; else
    the `top_k` classes, weighted by softmax(similarity / temperature), give the query vector as the
    weighted sum of their rows of `file` (the classifier's weight rows, centred, in the image space)."""

    # .npz: class_names [K] str, class_embeddings [K, E] float32 (unit rows), query_rows [K, D] float32;
    # with synonyms, also synonyms [M] str, synonym_classes [M] int (each one's class) and
    # synonym_embeddings [M, E] float32 (unit rows).
    file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    classes: int = Field(gt=1)
    # Where the class names came from, for people ("imagenet-simple-labels.json sha256 ...").
    label_set: str
    temperature: float = Field(gt=0)
    top_k: int = Field(ge=1)
    min_similarity: float = Field(ge=-1, le=1)
    # How min_similarity was chosen, and what it gave, for people.
    threshold_rule: str = ""
    # A class's synonyms (other names of it, in `file`) count toward its similarity where the text is at
    # least this similar to one: a text that says a synonym ("puma" for the class "cougar") is taken for
    # its class, and one only partly like it is not. None: the file has no synonyms.
    synonym_min_similarity: float | None = Field(None, ge=-1, le=1)
    # ... and at least this much more similar to it than to any class's own name: a synonym that is a rare
    # sense of the text's words ("cat bear", the red panda's, against "wild cat", a name's 0.71 from
    # "tiger cat") does not take a text the names already answer.
    synonym_margin: float = Field(0.0, ge=0, le=2)


class TextProjection(_Frozen):
    """A linear map applied last to every text query vector: `file` (.npz, `matrix` [D, source_dimension]
    float32) maps a query made for the source model's space into this model's (written by `vsearch model
    pca`: the components, scaled by the square root of their variance when whitened)."""

    file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    source_dimension: int = Field(gt=0)


class TextSearch(_Frozen):
    """Search by words (absent: the model cannot). "dual_encoder": `encoder` puts text straight into the
    image space (CLIP-style); "classifier": `encoder` is a sentence encoder and `classifier` maps its
    vectors to the image space through the classifier's classes. Its files live beside the model; the
    embedder checks their sha256 and, when anything is off, serves images and refuses words, saying why."""

    kind: Literal["dual_encoder", "classifier"]
    # Of the query vectors made: the model's output dimension.
    dimension: int = Field(gt=0)
    tokenizer: TextTokenizer
    encoder: TextEncoderSpec
    classifier: ClassifierText | None = None
    projection: TextProjection | None = None

    @model_validator(mode="after")
    def _check(self) -> TextSearch:
        if (self.kind == "classifier") != (self.classifier is not None):
            raise ValueError("a classifier section is needed for, and only for, kind classifier")
        if self.projection is not None:
            before = self.projection.source_dimension
        elif self.kind == "dual_encoder":
            before = self.encoder.dimension
        else:
            before = self.dimension
        if self.projection is None and before != self.dimension:
            raise ValueError(f"text vectors have {before} dimensions but the text section says {self.dimension}")
        return self


class Adaptation(_Frozen):
    """How `vsearch model adapt` fitted this model to a catalog's labels (absent on other models): the graph
    ends in z = L2((x - mean) @ projection) after the source's unit vector x (a regularised LDA, fine-tuned
    by a metric-learning loss with method "lda_metric_blend"), then,
    with 0 < blend < 1, L2([sqrt(1 - blend) x, sqrt(blend) z]), so that the cosine of two vectors is
    (1 - blend) x their source cosine + blend x their projected one."""

    # "lda_metric_blend": the LDA projection fine-tuned by a metric-learning loss for `fine_tune_epochs`.
    method: Literal["lda_blend", "lda_metric_blend"] = "lda_blend"
    fine_tune_epochs: int = Field(0, ge=0)
    source_name: str
    source_version: str
    source_model_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    source_dimension: int = Field(gt=0)
    # Of the projected part z, and of the whole output.
    projection_dimension: int = Field(gt=0)
    dimension: int = Field(gt=0)
    # Within-label scatter shrunk towards the identity by this share; the cosine's share given to z.
    shrinkage: float = Field(gt=0, le=1)
    blend: float = Field(gt=0, le=1)
    labels_file: str
    labels_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    # The labels fitted on.
    classes: list[str]
    fit_images: int = Field(gt=1)
    # The fit rows and the held-out rows, in words.
    fit_set: str
    # The fit's figures: the internal validation's and the guard's (before/after), mAP@100 and the like.
    metrics: dict[str, float]
    # sha256 over the float32 mean and projection the graph holds.
    projection_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    @model_validator(mode="after")
    def _check(self) -> Adaptation:
        expected = self.projection_dimension + (self.source_dimension if self.blend < 1 else 0)
        if self.dimension != expected:
            raise ValueError(f"an adaptation with blend {self.blend} of a {self.source_dimension}-d source and a "
                             f"{self.projection_dimension}-d projection gives {expected}-d vectors, not {self.dimension}")
        return self


class Calibration(_Frozen):
    """The probability that a hit is relevant (has the query's label) given its cosine score and rank r
    (1-based): piecewise-linear through the knots at score - rank_scale * ln(r), constant beyond the
    ends (InfoResponse.calibration). Written by `vsearch model calibrate` or `vsearch model adapt`."""

    method: Literal["isotonic"] = "isotonic"
    score_knots: list[float] = Field(min_length=1)
    probability_knots: list[float] = Field(min_length=1)
    rank_scale: float = Field(0.0, ge=0)
    # How it was fitted and on what, for people (InfoResponse.calibration.description).
    description: str
    # The version of the vectors it was fitted on (the card's version before the calibration was added).
    uncalibrated_version: str
    labels_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    pairs: int = Field(gt=0)
    # Neighbours per query in the fit.
    k: int = Field(gt=0)
    # Expected calibration error (10 bins) on images the fit did not see.
    held_out_ece: float | None = Field(None, ge=0, le=1)

    @model_validator(mode="after")
    def _check(self) -> Calibration:
        if len(self.score_knots) != len(self.probability_knots):
            raise ValueError(f"{len(self.score_knots)} score knots but {len(self.probability_knots)} probabilities")
        if any(later <= earlier for earlier, later in zip(self.score_knots, self.score_knots[1:])):
            raise ValueError("score knots must increase strictly")
        if any(not 0.0 <= value <= 1.0 for value in self.probability_knots):
            raise ValueError("probabilities must be within [0, 1]")
        if any(later < earlier for earlier, later in zip(self.probability_knots, self.probability_knots[1:])):
            raise ValueError("probabilities must not decrease as the score grows")
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
    # Set on models that can search by words (see TextSearch).
    text: TextSearch | None = None
    # Set on models written by `vsearch model adapt`.
    adaptation: Adaptation | None = None
    # Set on models whose scores are calibrated (`vsearch model calibrate`, `vsearch model adapt`).
    calibration: Calibration | None = None

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
        # (A PCA applied after the adaptation changes the output's dimension: its record says so.)
        if self.adaptation is not None and self.pca is None and self.adaptation.dimension != self.output.dimension:
            raise ValueError(f"the adaptation gives {self.adaptation.dimension}-d vectors but the output has "
                             f"{self.output.dimension}")
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

    @staticmethod
    def derive_adapted_version(source_version: str, adaptation: Adaptation) -> str:
        """An adapted model's version: the source model's and the adaptation (its projection included)."""
        defining = {"source_version": source_version,
                    "adaptation": adaptation.model_dump(mode="json", exclude={"fit_set", "metrics"})}
        return hashlib.sha256(json.dumps(defining, sort_keys=True).encode()).hexdigest()[:12]

    @staticmethod
    def derive_calibrated_version(uncalibrated_version: str, calibration: Calibration) -> str:
        """A calibrated model's version: its vectors' and the calibration (responses change with it, and
        cached results are keyed by the version)."""
        defining = {"uncalibrated_version": uncalibrated_version,
                    "calibration": calibration.model_dump(mode="json", include={"score_knots", "probability_knots", "rank_scale"})}
        return hashlib.sha256(json.dumps(defining, sort_keys=True).encode()).hexdigest()[:12]

    def to_json(self) -> str:
        # Cards without these keep the form they always had (no "quantization": null, "pca": null).
        exclude = {name for name in ("quantization", "pca", "text", "adaptation", "calibration")
                   if getattr(self, name) is None}
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
