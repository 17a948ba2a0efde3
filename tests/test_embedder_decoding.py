"""What the embedder accepts (formats, EXIF orientation, colour modes, crops) and how it refuses
nasty inputs: per item, with a message naming the problem, while the rest of the batch embeds."""

from __future__ import annotations

import io
import re
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from embedder_svc.image_decoding import CropBox, ImageDecoder, ImageRejected, ResolutionNeed
from embedder_svc.model_card import read_model_card
from embedder_svc.preprocessing import Preprocessor
from embedder_svc.regions import region_boxes
from embedder_svc.server import SERVICE_NAME
from service_kit.copy_feature_codec import decode_copy_features
from vsearch.v1 import embedder_pb2
from conftest import (
    TEST_MAX_IMAGE_BYTES,
    RunningEmbedder,
    cosine,
    embed_one,
    embed_results,
    embed_vectors,
    embedder_settings,
    encode,
    image_input,
    running_embedder,
    single_colour_png,
    vector_of,
)

INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]


@pytest.fixture(scope="module")
def jpeg(ukbench_images: list[Path]) -> bytes:
    return ukbench_images[8].read_bytes()


@pytest.fixture(scope="module")
def pixels(jpeg: bytes) -> Image.Image:
    """The JPEG's decoded RGB pixels: lossless re-encodings of these must embed identically."""
    return Image.open(io.BytesIO(jpeg)).convert("RGB")


@pytest.fixture(scope="module")
async def jpeg_vector(mobilenet_embedder: RunningEmbedder, jpeg: bytes) -> np.ndarray:
    return await embed_one(mobilenet_embedder.stub, jpeg)


@pytest.mark.parametrize(
    ("format", "options", "min_cosine"),
    [
        ("PNG", {}, 0.9999),
        ("BMP", {}, 0.9999),
        ("TIFF", {}, 0.9999),
        ("TIFF", {"compression": "tiff_lzw"}, 0.9999),
        ("WEBP", {"lossless": True}, 0.9999),
        ("WEBP", {"quality": 90}, 0.95),
        ("AVIF", {"quality": 90}, 0.95),
        ("GIF", {}, 0.9),  # 256-colour palette
        ("JPEG", {"quality": 75}, 0.95),
    ],
)
async def test_each_format_embeds_like_the_jpeg(
    mobilenet_embedder: RunningEmbedder, pixels: Image.Image, jpeg_vector: np.ndarray,
    format: str, options: dict, min_cosine: float,
) -> None:
    vector = await embed_one(mobilenet_embedder.stub, encode(pixels, format, **options))
    assert cosine(vector, jpeg_vector) > min_cosine


async def test_gif_uses_the_first_frame(mobilenet_embedder: RunningEmbedder, pixels: Image.Image) -> None:
    frames = [pixels.convert("P"), Image.new("P", pixels.size, 0)]
    animated = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    still = encode(frames[0], "GIF")
    assert Image.open(io.BytesIO(animated)).n_frames == 2
    assert cosine(*(await embed_vectors(mobilenet_embedder.stub, [animated, still]))) > 0.9999


async def test_exif_orientation_is_applied_and_crops_use_displayed_coordinates(
    mobilenet_embedder: RunningEmbedder, pixels: Image.Image
) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored pixels are shown rotated 90 degrees clockwise
    rotated_jpeg = encode(pixels, "JPEG", quality=95, exif=exif.tobytes())
    stored = Image.open(io.BytesIO(rotated_jpeg)).convert("RGB")  # Pillow ignores EXIF unless asked
    displayed = stored.transpose(Image.Transpose.ROTATE_270)
    assert displayed.size == (pixels.height, pixels.width)

    crop = (40, 300, 320, 240)  # x, y, width, height of the portrait image as displayed
    x, y, width, height = crop
    vectors = await embed_vectors(mobilenet_embedder.stub, [
        rotated_jpeg,
        encode(displayed, "PNG"),
        encode(stored, "PNG"),
        image_input(rotated_jpeg, crop),
        encode(displayed.crop((x, y, x + width, y + height)), "PNG"),
    ])
    assert cosine(vectors[0], vectors[1]) > 0.9999
    assert cosine(vectors[0], vectors[2]) < 0.95  # orientation really matters to the model
    assert cosine(vectors[3], vectors[4]) > 0.9999


async def test_colour_modes(mobilenet_embedder: RunningEmbedder, pixels: Image.Image, jpeg_vector: np.ndarray) -> None:
    gray = pixels.convert("L")
    sixteen_bit = Image.fromarray(np.asarray(gray).astype(np.uint16) * 257)
    assert sixteen_bit.mode == "I;16"
    with_hole = pixels.convert("RGBA")
    with_hole.paste((0, 0, 0, 0), (100, 100, 300, 300))  # transparent black
    hole_on_white = pixels.copy()
    hole_on_white.paste((255, 255, 255), (100, 100, 300, 300))

    vectors = await embed_vectors(mobilenet_embedder.stub, [
        encode(gray, "PNG"),                       # 0 grayscale
        encode(gray.convert("RGB"), "PNG"),        # 1 the same, as RGB
        encode(sixteen_bit, "PNG"),                # 2 16-bit grayscale
        encode(pixels.convert("P"), "PNG"),        # 3 palette
        encode(pixels.convert("RGBA"), "PNG"),     # 4 opaque RGBA
        encode(with_hole, "PNG"),                  # 5 RGBA with a transparent area
        encode(hole_on_white, "PNG"),              # 6 that area white
        encode(pixels.convert("CMYK"), "JPEG", quality=95),  # 7 CMYK
        encode(pixels.convert("1"), "PNG"),        # 8 bilevel
    ])
    assert cosine(vectors[0], vectors[1]) > 0.9999
    assert cosine(vectors[2], vectors[1]) > 0.9999
    assert cosine(vectors[3], jpeg_vector) > 0.9
    assert cosine(vectors[4], jpeg_vector) > 0.9999
    assert cosine(vectors[5], vectors[6]) > 0.9999
    assert cosine(vectors[7], jpeg_vector) > 0.95
    assert np.isfinite(vectors[8]).all()


async def test_crop_box_equals_the_precropped_image(mobilenet_embedder: RunningEmbedder, pixels: Image.Image) -> None:
    x, y, width, height = 100, 50, 300, 250
    png = encode(pixels, "PNG")
    vectors = await embed_vectors(mobilenet_embedder.stub, [
        image_input(png, (x, y, width, height)),
        encode(pixels.crop((x, y, x + width, y + height)), "PNG"),
        image_input(png, (0, 0, pixels.width, pixels.height)),  # the whole image, as a crop
        png,
    ])
    assert cosine(vectors[0], vectors[1]) > 0.9999
    assert cosine(vectors[2], vectors[3]) > 0.9999
    assert cosine(vectors[0], vectors[3]) < 0.99


async def test_nasty_inputs_fail_alone_with_precise_messages(mobilenet_embedder: RunningEmbedder, jpeg: bytes, pixels: Image.Image) -> None:
    png = encode(pixels, "PNG")
    nasty = {
        "empty image data": b"",
        "truncated": jpeg[: len(jpeg) // 2],
        "not an image": b"a plain text file, not an image\n" * 20,
        "over the limit of 40000000 pixels (decompression bomb guard)": single_colour_png(20_000, 20_000),
        f"bytes, over the limit of {TEST_MAX_IMAGE_BYTES} bytes": jpeg + b"\0" * TEST_MAX_IMAGE_BYTES,
        "lies outside the 640x480 image": image_input(png, (600, 0, 100, 100)),
        "crop box has zero size": image_input(png, (10, 10, 0, 50)),
        "unsupported image format ICO": encode(pixels.resize((64, 64)), "ICO"),
    }
    items = [jpeg, *nasty.values(), png]
    results = await embed_results(mobilenet_embedder.stub, items)

    assert cosine(vector_of(results[0]), vector_of(results[-1])) > 0.999
    for expected, result in zip(nasty, results[1:-1]):
        assert result.WhichOneof("result") == "error", expected
        assert result.error.code == INVALID_ARGUMENT, expected
        assert expected in result.error.message, (expected, result.error.message)
    health = health_pb2_grpc.HealthStub(mobilenet_embedder.channel)
    status = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5)
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    assert mobilenet_embedder.sample("vsearch_embedder_images_failed_total", {"code": "INVALID_ARGUMENT"}) >= len(nasty)


@pytest.mark.parametrize(("width", "height"), [(20_000, 20_000), (8_000, 6_000)])
async def test_decompression_bombs_are_refused_from_the_header(mobilenet_embedder: RunningEmbedder, width: int, height: int) -> None:
    # Pillow's own guard is a backstop far above these (a JPEG may be decoded at 1/8 of its size); the
    # service's check of the header's size refuses both before any pixel is decoded.
    bomb = single_colour_png(width, height)
    assert len(bomb) < 100_000  # small on disk, huge decoded
    started = time.perf_counter()
    (result,) = await embed_results(mobilenet_embedder.stub, [bomb])
    elapsed = time.perf_counter() - started
    assert result.error.code == INVALID_ARGUMENT
    message = result.error.message
    assert "over the limit of 40000000 pixels (decompression bomb guard)" in message
    assert f"{width * height} pixels" in message
    # Only the configured limit is quoted, never Pillow's own backstop (twice it).
    assert re.findall(r"\d{7,}", message) == ["40000000", str(width * height)], message
    assert elapsed < 0.5


async def test_per_item_errors_keep_their_places_whatever_the_share_of_each_decode_worker(
    mobilenet_dir: Path, mobilenet_embedder: RunningEmbedder, jpeg: bytes, pixels: Image.Image
) -> None:
    """Each decode worker prepares a share of a request's images; seven over three workers gives
    uneven shares, and every result must still sit at its own image's index."""
    png = encode(pixels, "PNG")
    rotated = encode(pixels.rotate(90, expand=True), "PNG")
    items = [jpeg, b"", png, jpeg[: len(jpeg) // 2], rotated, b"not an image", jpeg]
    async with running_embedder(embedder_settings(mobilenet_dir, decode_workers=3)) as embedder:
        results = await embed_results(embedder.stub, items)
    assert [result.WhichOneof("result") for result in results] == [
        "embedding", "error", "embedding", "error", "embedding", "error", "embedding",
    ]
    for item, result in zip(items, results):
        if result.WhichOneof("result") == "embedding":
            alone = await embed_one(mobilenet_embedder.stub, item)
            assert cosine(vector_of(result), alone) > 0.9999
    assert "empty image data" in results[1].error.message and "image 1:" in results[1].error.message
    assert "truncated" in results[3].error.message and "image 3:" in results[3].error.message
    assert "not an image" in results[5].error.message and "image 5:" in results[5].error.message


@pytest.mark.parametrize(("channel_order", "dtype"), [("RGB", "float32"), ("BGR", "float32"), ("RGB", "float16")])
def test_preprocessing_computes_the_cards_formula(
    mobilenet_dir: Path, pixels: Image.Image, channel_order: str, dtype: str
) -> None:
    """(pixel * scale - mean) / std per channel, in the card's channel order and dtype, CHW: the
    straightforward computation, to the last bit."""
    card = read_model_card(mobilenet_dir)
    card = card.model_copy(update={
        "preprocessing": card.preprocessing.model_copy(update={"channel_order": channel_order}),
        "input": card.input.model_copy(update={"dtype": dtype}),
    })
    preprocessor = Preprocessor(card)
    spec = card.preprocessing
    resized = pixels.resize((spec.crop, spec.crop), preprocessor.resample, box=preprocessor.crop_box(*pixels.size))
    values = np.asarray(resized, dtype=np.float32)
    if channel_order == "BGR":
        values = values[:, :, ::-1]
    std = np.asarray(spec.std, dtype=np.float32)
    expected = values * (spec.pixel_scale / std).astype(np.float32) + (-np.asarray(spec.mean, dtype=np.float32) / std)
    expected = np.ascontiguousarray(expected.transpose(2, 0, 1)).astype(dtype)
    tensor = preprocessor(pixels)
    assert tensor.dtype == np.dtype(dtype) and tensor.shape == (3, spec.crop, spec.crop)
    assert tensor.flags.c_contiguous
    np.testing.assert_array_equal(tensor, expected)


# --- large JPEGs, decoded no larger than needed ------------------------------------------------

PHOTO_SIZE = (4032, 3024)  # a 12-megapixel phone photo


@pytest.fixture(scope="module")
def photo(pixels: Image.Image) -> Image.Image:
    """A 12-megapixel photo's pixels: a ukbench image enlarged, with fine noise for a photo's detail."""
    enlarged = np.asarray(pixels.resize(PHOTO_SIZE, Image.Resampling.BICUBIC), dtype=np.int16)
    noise = np.random.default_rng(0).integers(-5, 6, enlarged.shape)
    return Image.fromarray(np.clip(enlarged + noise, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def photo_jpeg(photo: Image.Image) -> bytes:
    return encode(photo, "JPEG", quality=90)


@pytest.fixture(scope="module")
def decoder() -> ImageDecoder:
    return ImageDecoder(max_bytes=1 << 26, max_pixels=40_000_000)


@pytest.mark.parametrize(("need", "decoded_size", "reduction"), [
    (ResolutionNeed(shorter=256), (504, 378), 8),                 # the model's 256: 1/8
    (ResolutionNeed(shorter=256, longer=512), (1008, 756), 4),    # and copy features' 512 (1/8 is 504): 1/4
    (ResolutionNeed(shorter=640), (1008, 756), 4),                # regions' 256 / 0.4
    (ResolutionNeed(shorter=2000), PHOTO_SIZE, 1),                # 1/2 would be 1512 high
    (None, PHOTO_SIZE, 1),
])
def test_a_large_jpeg_is_decoded_no_larger_than_its_consumers_need(
    decoder: ImageDecoder, photo_jpeg: bytes, need: ResolutionNeed | None, decoded_size: tuple[int, int],
    reduction: int,
) -> None:
    decoded = decoder.decode_for(photo_jpeg, None, need)
    assert decoded.image.size == decoded_size and decoded.image.mode == "RGB"
    assert decoded.size == PHOTO_SIZE and decoded.reduction == reduction


def test_the_pixel_limit_counts_the_pixels_decoded() -> None:
    """The bomb guard weighs what will be decoded: a JPEG over the limit is taken when its consumers need
    it no larger than the limit allows, and refused, naming both sizes, when they need more of it; a PNG
    of as many pixels is refused (it cannot be decoded smaller), and so is a progressive JPEG."""
    decoder = ImageDecoder(max_bytes=1 << 26, max_pixels=1_000_000)
    picture = Image.new("RGB", (2400, 1800), (90, 140, 200))  # 4.3 Mpx
    jpeg = encode(picture, "JPEG", quality=90)
    decoded = decoder.decode_for(jpeg, None, ResolutionNeed(shorter=256, longer=512))
    assert decoded.image.size == (600, 450) and decoded.reduction == 4 and decoded.size == (2400, 1800)
    cases = {
        (None, None): "image is 2400x1800 = 4320000 pixels",  # no reduction asked for
        (ResolutionNeed(shorter=800), None): "image is 2400x1800 = 4320000 pixels, 1080000 decoded at 1/2 of its size",
        (ResolutionNeed(shorter=256), CropBox(0, 0, 300, 300)): "image is 2400x1800 = 4320000 pixels",  # a small crop
    }
    for (need, crop), detail in cases.items():
        with pytest.raises(ImageRejected) as refused:
            decoder.decode_for(jpeg, crop, need)
        assert refused.value.message == (
            f"image too large: over the limit of 1000000 pixels (decompression bomb guard): {detail}"
        )
    with pytest.raises(ImageRejected, match=re.escape("image is 2400x1800 = 4320000 pixels")):
        decoder.decode_for(encode(picture, "PNG"), None, ResolutionNeed(shorter=256))
    # libjpeg holds a progressive JPEG's every coefficient however small it decodes it: its full size counts.
    progressive = encode(picture, "JPEG", quality=90, progressive=True)
    with pytest.raises(ImageRejected, match=re.escape(
            "image is 2400x1800 = 4320000 pixels (a progressive JPEG is weighed at its full size")):
        decoder.decode_for(progressive, None, ResolutionNeed(shorter=256, longer=512))
    small_progressive = encode(picture.resize((1000, 750)), "JPEG", quality=90, progressive=True)
    assert decoder.decode_for(small_progressive, None, ResolutionNeed(shorter=256)).reduction == 2


async def test_a_50_megapixel_photo_is_embedded(mobilenet_embedder: RunningEmbedder, photo: Image.Image) -> None:
    """Over the default 40-megapixel limit, but decoded at 1/8 of its size (what the model, regions and copy
    features need): embedded like the same photo at 12 megapixels."""
    large = encode(photo.resize((8160, 6120), Image.Resampling.BILINEAR), "JPEG", quality=50)  # within the 3 MiB limit
    request = embedder_pb2.EmbedImagesRequest(images=[image_input(large)], with_copy_features=True)
    (result,) = (await mobilenet_embedder.stub.EmbedImages(request, timeout=60)).results
    assert result.WhichOneof("result") == "embedding" and result.copy_features, result.error
    reference = await embed_one(mobilenet_embedder.stub, encode(photo, "JPEG", quality=85))
    assert cosine(vector_of(result), reference) > 0.95


def test_formats_without_dct_scaling_are_decoded_whole(decoder: ImageDecoder, photo: Image.Image) -> None:
    png = encode(photo.resize((2400, 1800)), "PNG")
    decoded = decoder.decode_for(png, None, ResolutionNeed(shorter=256))
    assert decoded.image.size == (2400, 1800) and decoded.reduction == 1


def test_reduced_crops_and_parts_are_in_the_full_pictures_pixels(decoder: ImageDecoder, photo: Image.Image) -> None:
    """A crop box is in the full photo's displayed pixels (after EXIF orientation) however small the
    photo is decoded; so is every box a DecodedImage cuts; the pixels are those of the full photo's,
    shrunk."""
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise: displayed 3024 x 4032
    rotated = encode(photo, "JPEG", quality=90, exif=exif.tobytes())
    displayed = photo.transpose(Image.Transpose.ROTATE_270)
    crop = CropBox(800, 1200, 1600, 2000)
    decoded = decoder.decode_for(rotated, crop, ResolutionNeed(shorter=256))
    assert decoded.size == (1600, 2000) and decoded.reduction == 4
    assert decoded.image.size == (400, 500)
    expected = displayed.crop((800, 1200, 2400, 3200)).resize((400, 500), Image.Resampling.BOX)
    difference = np.abs(np.asarray(decoded.image, np.int16) - np.asarray(expected, np.int16))
    assert difference.mean() < 4  # the same picture (0.8; a shifted crop or the stored orientation: 49, 59)

    part = CropBox(400, 1000, 800, 600)
    shrunk_part = decoded.part(part)
    assert shrunk_part.size == (200, 150)
    expected_part = displayed.crop((1200, 2200, 2000, 2800)).resize((200, 150), Image.Resampling.BOX)
    assert np.abs(np.asarray(shrunk_part, np.int16) - np.asarray(expected_part, np.int16)).mean() < 4

    with pytest.raises(ImageRejected, match=re.escape("lies outside the 3024x4032 image")):
        decoder.decode_for(rotated, CropBox(0, 0, 3100, 100), ResolutionNeed(shorter=256))


async def test_a_large_jpeg_embeds_as_when_decoded_whole(
    mobilenet_dir: Path, mobilenet_embedder: RunningEmbedder, photo_jpeg: bytes
) -> None:
    """Reduced decoding (the default) changes a photo's vector a little (cosine 0.982 here; recompressing a ukbench
    image at JPEG quality 75 gives 0.979, docs/benchmarks.md), and keeps every box in the photo's own pixels:
    its regions', and the size its copy features' matched boxes are given in."""
    request = embedder_pb2.EmbedImagesRequest(images=[image_input(photo_jpeg)], with_regions=True,
                                              with_copy_features=True)
    reduced = (await mobilenet_embedder.stub.EmbedImages(request, timeout=60)).results[0]
    async with running_embedder(embedder_settings(mobilenet_dir, reduced_decoding=False)) as whole_embedder:
        whole = (await whole_embedder.stub.EmbedImages(request, timeout=60)).results[0]
    # Different (the default did decode it smaller), but close.
    assert 0.97 < cosine(vector_of(reduced), vector_of(whole)) < 0.999
    boxes = [(box.x, box.y, box.width, box.height) for box in region_boxes(*PHOTO_SIZE)]
    for result in (reduced, whole):
        assert [(r.box.x, r.box.y, r.box.width, r.box.height) for r in result.regions] == boxes
        assert decode_copy_features(result.copy_features).original_size == PHOTO_SIZE
    for reduced_region, whole_region in zip(reduced.regions, whole.regions):
        assert np.dot(reduced_region.embedding.values, whole_region.embedding.values) > 0.95
