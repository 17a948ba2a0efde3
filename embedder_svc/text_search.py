"""Search by words: a text -> a query vector in the image embedding space, as the model card's `text`
section says (`embedder_svc.model_card.TextSearch`).

- **dual_encoder** (CLIP-style): the card's text encoder ONNX puts the text straight into the image
  space.
- **classifier** (a backbone that kept its classifier, e.g. ImageNet MobileNetV2): a sentence encoder
  embeds the text; its cosine similarity to each class name's embedding (computed once, when the model
  was prepared; a class with synonyms takes the best of its name's and of those synonyms the text is at
  least `synonym_min_similarity` like: `class_similarities`) gives an affinity over the classes: nothing
  when the best is below the card's `min_similarity` (the text names nothing the model knows), else
  softmax(similarity / temperature) over the `top_k` best. The classifier is linear on the pooled features the image vectors are made of
  (logits = W f + b), so the affinity-weighted sum of its (centred) weight rows is a direction in the
  image space along which images of those classes lie: the query vector.

Everything here is blocking (tokenizer, onnxruntime); `TextSearchService` runs it on its own thread."""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import re
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from embedder_svc.model_card import ClassifierText, ModelCard, TextEncoderSpec, TextSearch, TextTokenizer
from service_kit.file_digest import file_sha256

logger = logging.getLogger(__name__)

# A text longer than this (in characters, after normalisation) is refused; the tokenizer would cut it
# to the card's max_length tokens anyway.
MAX_TEXT_CHARS = 2000
_WHITESPACE = re.compile(r"\s+")
# Classes named in `understood_as`: at most this many, each with at least this weight.
_UNDERSTOOD_CLASSES = 5
_UNDERSTOOD_MIN_WEIGHT = 0.05


class TextSearchUnavailable(Exception):
    """The model cannot search by words: no `text` section, or its files are missing or do not match."""


def normalise_text(text: str) -> str:
    """Unicode NFKC, runs of whitespace as one space, trimmed: what is embedded (and what the gateway's
    cache key is made of)."""
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFKC", text)).strip()


def resolve_text_file(model_dir: Path, file: str, package: str | None = None) -> Path:
    """A text file of the card: relative to the model directory, or inside an installed distribution."""
    if package is None:
        return model_dir / file
    try:
        distribution = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise TextSearchUnavailable(f"the package {package!r} that ships the text encoder is not installed") from None
    return Path(str(distribution.locate_file(file)))


def checked_file(path: Path, sha256: str, what: str) -> Path:
    if not path.is_file():
        raise TextSearchUnavailable(f"{what} {path} is missing")
    actual = file_sha256(path)
    if actual != sha256:
        raise TextSearchUnavailable(f"{what} {path} has sha256 {actual}, the card says {sha256}")
    return path


class Tokenizer:
    """Texts -> (input_ids, attention_mask), int64 [N, L], padded to the longest (or to max_length)."""

    def __init__(self, spec: TextTokenizer, path: Path) -> None:
        import tokenizers

        if spec.kind == "wordpiece":
            tokenizer = tokenizers.BertWordPieceTokenizer(str(path), lowercase=spec.lowercase)
        else:
            tokenizer = tokenizers.Tokenizer.from_file(str(path))
        tokenizer.enable_truncation(spec.max_length)
        pad_token = tokenizer.id_to_token(spec.pad_id) or "[PAD]"
        tokenizer.enable_padding(
            pad_id=spec.pad_id, pad_token=pad_token, length=spec.max_length if spec.pad_to_max_length else None
        )
        self._tokenizer = tokenizer

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        encoded = self._tokenizer.encode_batch(texts)
        ids = np.array([item.ids for item in encoded], dtype=np.int64)
        mask = np.array([item.attention_mask for item in encoded], dtype=np.int64)
        return ids, mask


class TextEncoder:
    """Tokenizer + ONNX text encoder + pooling: texts -> L2-normalised vectors [N, E]."""

    def __init__(self, tokenizer: Tokenizer, spec: TextEncoderSpec, path: Path, threads: int = 1) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self._session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        except Exception as error:  # noqa: BLE001 - onnxruntime's errors share no base class
            raise TextSearchUnavailable(f"onnxruntime cannot load the text encoder {path}: {error}") from error
        self._inputs = {node.name: node.type for node in self._session.get_inputs()}
        unknown = set(self._inputs) - {"input_ids", "attention_mask", "token_type_ids"}
        if "input_ids" not in self._inputs or unknown:
            raise TextSearchUnavailable(
                f"the text encoder {path} takes inputs {sorted(self._inputs)}; expected input_ids "
                "(and optionally attention_mask, token_type_ids)"
            )
        outputs = [node.name for node in self._session.get_outputs()]
        if spec.output not in outputs:
            raise TextSearchUnavailable(f"the text encoder {path} has outputs {outputs}, not {spec.output!r}")
        self._tokenizer = tokenizer
        self._spec = spec

    @property
    def dimension(self) -> int:
        return self._spec.dimension

    def __call__(self, texts: list[str]) -> np.ndarray:
        ids, mask = self._tokenizer(texts)
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        feeds = {
            name: feeds[name].astype(np.int32) if kind == "tensor(int32)" else feeds[name]
            for name, kind in self._inputs.items()
        }
        (output,) = self._session.run([self._spec.output], feeds)
        output = np.asarray(output, dtype=np.float32)
        if self._spec.pooling == "mean":
            weights = mask[:, :, None].astype(np.float32)
            output = (output * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1.0)
        elif self._spec.pooling == "cls":
            output = output[:, 0]
        if output.ndim != 2 or output.shape[1] != self._spec.dimension:
            raise TextSearchUnavailable(
                f"the text encoder gives shape {list(output.shape)}; the card says {self._spec.dimension} values"
            )
        return output / np.maximum(np.linalg.norm(output, axis=1, keepdims=True), 1e-12)


def load_text_encoder(model_dir: Path, text: TextSearch, threads: int = 1) -> TextEncoder:
    tokenizer_path = checked_file(model_dir / text.tokenizer.file, text.tokenizer.sha256, "the tokenizer file")
    encoder_path = checked_file(
        resolve_text_file(model_dir, text.encoder.file, text.encoder.package), text.encoder.sha256, "the text encoder"
    )
    return TextEncoder(Tokenizer(text.tokenizer, tokenizer_path), text.encoder, encoder_path, threads)


@dataclass(frozen=True)
class TextQuery:
    """One text's outcome: its query vector, or, when it matches nothing the model knows, why."""

    vector: np.ndarray | None
    # What it was understood as, for people: the classes and their weights ("" for a dual encoder).
    understood_as: str = ""
    no_match: str = ""


@dataclass(frozen=True)
class ClassSynonyms:
    """Other names of the classes (WordNet's, for ImageNet's), embedded as the class names are."""

    names: list[str]
    classes: np.ndarray  # [M] int: each synonym's class
    embeddings: np.ndarray  # [M, E] unit rows
    # A synonym counts only where the text is at least this similar to it, and this much more than to
    # any class's name.
    min_similarity: float
    margin: float = 0.0


def class_similarities(
    texts: np.ndarray, class_embeddings: np.ndarray, synonyms: ClassSynonyms | None = None,
) -> np.ndarray:
    """[N, K] similarity of each text embedding (unit rows [N, E]) to each class: to its name, or to
    one of its synonyms where the text is at least the synonyms' min_similarity like it and their margin
    more like it than like any class's name. The gates keep what a synonym adds to texts that say it:
    one only partly like the text, or a rare sense of words a name already answers ("cat bear", the red
    panda's, against "wild cat"), would otherwise pull it to a wrong class."""
    similarity = texts @ class_embeddings.T
    if synonyms is not None and len(synonyms.names):
        to_synonyms = texts @ synonyms.embeddings.T
        needed = np.maximum(synonyms.min_similarity, similarity.max(axis=1, keepdims=True) + synonyms.margin)
        to_synonyms[to_synonyms < needed] = -1.0
        np.maximum.at(similarity.T, synonyms.classes, to_synonyms.T)
    return similarity


def softmax(values: np.ndarray) -> np.ndarray:
    shifted = np.exp(values - values.max())
    return shifted / shifted.sum()


class TextSearcher:
    """The card's text section, loaded: texts -> `TextQuery`s (blocking)."""

    def __init__(self, model_dir: Path, card: ModelCard, threads: int = 1) -> None:
        text = card.text
        if text is None:
            raise TextSearchUnavailable("its model card has no text section")
        if text.dimension != card.output.dimension:
            raise TextSearchUnavailable(
                f"its text section makes {text.dimension}-d query vectors but the model's are "
                f"{card.output.dimension}-d (the model was changed after its text files were made)"
            )
        self.kind = text.kind
        self.text = text
        self.synonyms: ClassSynonyms | None = None
        self.encoder = load_text_encoder(model_dir, text, threads)
        self.projection: np.ndarray | None = None
        if text.projection is not None:
            path = checked_file(model_dir / text.projection.file, text.projection.sha256, "the text projection")
            with np.load(path) as stored:
                self.projection = np.asarray(stored["matrix"], dtype=np.float32)
            if self.projection.shape != (text.dimension, text.projection.source_dimension):
                raise TextSearchUnavailable(f"the text projection has shape {list(self.projection.shape)}")
        if text.classifier is not None:
            spec = text.classifier
            path = checked_file(model_dir / spec.file, spec.sha256, "the class file")
            with np.load(path) as stored:
                self.class_names = [str(name) for name in stored["class_names"]]
                self.class_embeddings = np.asarray(stored["class_embeddings"], dtype=np.float32)
                self.query_rows = np.asarray(stored["query_rows"], dtype=np.float32)
                self.synonyms = _synonyms(stored, spec, path)
            expected_rows = text.projection.source_dimension if text.projection is not None else text.dimension
            if (
                len(self.class_names) != spec.classes
                or self.class_embeddings.shape != (spec.classes, text.encoder.dimension)
                or self.query_rows.shape != (spec.classes, expected_rows)
                or (self.synonyms is not None and (
                    self.synonyms.embeddings.shape != (len(self.synonyms.names), text.encoder.dimension)
                    or self.synonyms.classes.shape != (len(self.synonyms.names),)
                    or not np.all((self.synonyms.classes >= 0) & (self.synonyms.classes < spec.classes))
                ))
            ):
                raise TextSearchUnavailable(f"the class file {path} does not match the card's {spec.classes} classes")

    def describe(self) -> str:
        if self.text.classifier is None:
            return "dual encoder"
        spec = self.text.classifier
        return (f"classifier over {spec.classes} classes (top {spec.top_k}, temperature {spec.temperature:g}, "
                f"min similarity {spec.min_similarity:g})")

    def similarities(self, texts: list[str]) -> np.ndarray:
        """Cosine similarity of each text to each class [N, K] (classifier kind only): to its name, or
        to a synonym the text says (class_similarities)."""
        return class_similarities(self.encoder(texts), self.class_embeddings, self.synonyms)

    def __call__(self, texts: list[str]) -> list[TextQuery]:
        if not texts:
            return []
        if self.text.classifier is None:
            return [self._finish(vector, "") for vector in self.encoder(texts)]
        spec = self.text.classifier
        queries = []
        for text, similarity in zip(texts, self.similarities(texts), strict=True):
            best = int(np.argmax(similarity))
            if similarity[best] < spec.min_similarity:
                queries.append(TextQuery(None, no_match=(
                    f"no class of the model matches {text!r} (the closest, {self.class_names[best]!r}, has "
                    f"similarity {similarity[best]:.2f}, below {spec.min_similarity:.2f})"
                )))
                continue
            top = np.argsort(-similarity, kind="stable")[: spec.top_k]
            weights = softmax(similarity[top] / spec.temperature)
            understood = ", ".join(
                f"{self.class_names[index]} {weight:.2f}"
                for index, weight in list(zip(top, weights))[:_UNDERSTOOD_CLASSES]
                if weight >= _UNDERSTOOD_MIN_WEIGHT
            )
            queries.append(self._finish(weights @ self.query_rows[top], understood))
        return queries

    def _finish(self, vector: np.ndarray, understood_as: str) -> TextQuery:
        if self.projection is not None:
            vector = self.projection @ vector
        norm = float(np.linalg.norm(vector))
        if not np.isfinite(norm) or norm < 1e-12:
            return TextQuery(None, understood_as, "the text gives no direction in the image space")
        return TextQuery((vector / norm).astype(np.float32), understood_as)


def read_synonyms(stored: "np.lib.npyio.NpzFile", min_similarity: float, margin: float) -> ClassSynonyms:
    """The synonym arrays of a class file (or of prepare's cache of one); KeyError when it has none."""
    return ClassSynonyms([str(name) for name in stored["synonyms"]],
                         np.asarray(stored["synonym_classes"], dtype=np.int64),
                         np.asarray(stored["synonym_embeddings"], dtype=np.float32), min_similarity, margin)


def _synonyms(stored: "np.lib.npyio.NpzFile", spec: ClassifierText, path: Path) -> ClassSynonyms | None:
    """The class file's synonyms, where the card says it has them."""
    if spec.synonym_min_similarity is None:
        return None
    try:
        return read_synonyms(stored, spec.synonym_min_similarity, spec.synonym_margin)
    except KeyError as missing:
        raise TextSearchUnavailable(f"the class file {path} has no {missing} though the card gives synonyms") from None


class TextSearchService:
    """The embedder's words side: loads the card's text section once the model is loaded (never failing
    the embedder: without it, images are served and words refused with the reason), and runs text
    queries on its own thread."""

    def __init__(self, model_dir: Path, card_source: Callable[[], ModelCard], threads: int = 1) -> None:
        self._model_dir = model_dir
        self._card_source = card_source
        self._threads = threads
        self._executor: ThreadPoolExecutor | None = None
        self.searcher: TextSearcher | None = None
        self.unavailable = "not loaded yet"

    @property
    def kind(self) -> str:
        """What Info.text_search reports: "" when words cannot be searched."""
        return self.searcher.kind if self.searcher is not None else ""

    async def load(self) -> None:
        """Startup hook, after the model's (run again when a later hook fails: loads once)."""
        if self.searcher is not None:
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedder-text")
        card = self._card_source()
        if card.text is None:
            self.unavailable = "its model card has no text section"
            return
        loop = asyncio.get_running_loop()
        try:
            self.searcher = await loop.run_in_executor(
                self._executor, TextSearcher, self._model_dir, card, self._threads
            )
        except (TextSearchUnavailable, OSError, KeyError, ValueError, ImportError) as error:
            self.unavailable = str(error)
            logger.warning("model %s cannot search by words: %s", card.name, error)
            return
        self.unavailable = ""
        logger.info("text search: %s", self.searcher.describe())

    async def embed(self, texts: list[str]) -> list[TextQuery]:
        searcher, executor = self.searcher, self._executor
        if searcher is None or executor is None:
            raise TextSearchUnavailable(self.unavailable)
        return await asyncio.get_running_loop().run_in_executor(executor, searcher, texts)

    async def close(self) -> None:
        self.searcher = None
        if self._executor is not None:
            executor, self._executor = self._executor, None
            await asyncio.get_running_loop().run_in_executor(None, executor.shutdown, True)
