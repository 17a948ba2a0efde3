"""A tiny CLIP-style dual encoder, built with onnx.helper, for the tests of search by words.

Both towers map into one 8-d space where each primary colour has its own direction:

- the image tower (model.onnx) averages the pixels of a 32x32 RGB input, removes their grey part
  (the mean of the three channels) and projects the chroma with a fixed 3x8 matrix: a red image lands
  on the red direction, a grey one on nothing;
- the text tower (text/encoder.onnx) is an embedding bag: each token's row of a table (zero for words
  without a colour), masked by the attention mask; the embedder mean-pools it. "red" has the red
  direction, "sky" the blue one, "grass" the green one.

So the text "red" ranks red images first, as a real CLIP export would for real words."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from embedder_svc.model_card import (
    InputSpec,
    ModelCard,
    ModelSource,
    OutputSpec,
    Preprocessing,
    TextEncoderSpec,
    TextSearch,
    TextTokenizer,
    write_model_card,
)

DIMENSION = 8
SIZE = 32
VOCABULARY = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "something", "the",
              "red", "green", "blue", "sky", "grass", "tomato", "xylophone"]
COLOURS = {"red": (220, 20, 30), "green": (30, 200, 40), "blue": (20, 40, 210)}
# Chroma of each word (RGB), 0 for words without a colour.
WORD_COLOURS = {"red": (1, 0, 0), "tomato": (1, 0, 0), "green": (0, 1, 0), "grass": (0, 1, 0),
                "blue": (0, 0, 1), "sky": (0, 0, 1)}


def _projection() -> np.ndarray:
    rng = np.random.default_rng(7)
    return rng.standard_normal((3, DIMENSION)).astype(np.float32)


def _chroma(rgb: tuple[float, float, float]) -> np.ndarray:
    values = np.asarray(rgb, dtype=np.float32)
    return values - values.mean()


def image_tower() -> onnx.ModelProto:
    projection = _projection()
    nodes = [
        helper.make_node("GlobalAveragePool", ["pixels"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["rgb"], axis=1),
        helper.make_node("ReduceMean", ["rgb"], ["grey"], axes=[1], keepdims=1),
        helper.make_node("Sub", ["rgb", "grey"], ["chroma"]),
        helper.make_node("MatMul", ["chroma", "projection"], ["projected"]),
        helper.make_node("ReduceL2", ["projected"], ["norm"], axes=[1], keepdims=1),
        helper.make_node("Max", ["norm", "eps"], ["norm_safe"]),
        helper.make_node("Div", ["projected", "norm_safe"], ["embedding"]),
    ]
    graph = helper.make_graph(
        nodes, "image_tower",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", DIMENSION])],
        initializer=[numpy_helper.from_array(projection, "projection"),
                     numpy_helper.from_array(np.array(1e-12, dtype=np.float32), "eps")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="vsearch tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def text_tower() -> onnx.ModelProto:
    projection = _projection()
    table = np.zeros((len(VOCABULARY), DIMENSION), dtype=np.float32)
    for word, rgb in WORD_COLOURS.items():
        table[VOCABULARY.index(word)] = _chroma(rgb) @ projection
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["tokens"], axis=0),
        helper.make_node("Cast", ["attention_mask"], ["mask_float"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask_float", "last_axis"], ["mask"]),
        helper.make_node("Mul", ["tokens", "mask"], ["token_embeddings"]),
    ]
    graph = helper.make_graph(
        nodes, "text_tower",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "length"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "length"])],
        [helper.make_tensor_value_info("token_embeddings", TensorProto.FLOAT, ["batch", "length", DIMENSION])],
        initializer=[numpy_helper.from_array(table, "table"),
                     numpy_helper.from_array(np.array([2], dtype=np.int64), "last_axis")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="vsearch tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_dual_encoder(model_dir: Path) -> ModelCard:
    """Writes model.onnx, text/encoder.onnx, text/vocab.txt and the card (with a dual_encoder text
    section) into `model_dir`; returns the card."""
    (model_dir / "text").mkdir(parents=True, exist_ok=True)
    (model_dir / "model.onnx").write_bytes(image_tower().SerializeToString())
    (model_dir / "text" / "encoder.onnx").write_bytes(text_tower().SerializeToString())
    (model_dir / "text" / "vocab.txt").write_text("\n".join(VOCABULARY) + "\n")
    text = TextSearch(
        kind="dual_encoder", dimension=DIMENSION,
        tokenizer=TextTokenizer(kind="wordpiece", file="text/vocab.txt", sha256=_sha256(model_dir / "text" / "vocab.txt"),
                                max_length=16),
        encoder=TextEncoderSpec(file="text/encoder.onnx", sha256=_sha256(model_dir / "text" / "encoder.onnx"),
                                output="token_embeddings", pooling="mean", dimension=DIMENSION),
    )
    source = ModelSource(file="dual-encoder.onnx", sha256=_sha256(model_dir / "model.onnx"))
    input_spec = InputSpec(name="pixels", height=SIZE, width=SIZE)
    preprocessing = Preprocessing(resize_shorter=SIZE, crop=SIZE, channel_order="RGB", pixel_scale=1 / 255,
                                  mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    output = OutputSpec(name="embedding", dimension=DIMENSION, pooling="avg", l2_normalized=True)
    card = ModelCard(
        name="tiny-dual-encoder", version=ModelCard.derive_version(source, "pixels", input_spec, preprocessing, output),
        source=source, feature_tensor="pixels", input=input_spec, preprocessing=preprocessing, output=output, text=text,
    )
    write_model_card(model_dir, card)
    return card


def write_tokenizer_json(path: Path) -> Path:
    """A Hugging Face tokenizer.json over VOCABULARY, as a CLIP export ships one (its own normaliser,
    pre-tokenizer and start/end tokens around each text): lower-cased words, [CLS] ... [SEP]."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    tokenizer = Tokenizer(WordLevel({word: index for index, word in enumerate(VOCABULARY)}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", VOCABULARY.index("[CLS]")), ("[SEP]", VOCABULARY.index("[SEP]"))])
    tokenizer.save(str(path))
    return path


def colour_image(colour: str, shade: int = 0) -> bytes:
    """A PNG of one colour (its shade varied a little), with some noise."""
    rng = np.random.default_rng(shade + 10 * list(COLOURS).index(colour))
    base = np.asarray(COLOURS[colour], dtype=np.float32) * (1.0 - 0.1 * shade)
    pixels = np.clip(base + rng.normal(0, 8, (40, 48, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
