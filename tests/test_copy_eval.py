"""`vsearch eval --copies N`: transformed copies of catalog images, searched through a real stack."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import random
from pathlib import Path

import grpc
import pytest
from PIL import Image, ImageOps

from conftest import REPO_ROOT, VSEARCH, in_process_stack, run_cli
from vsearch.v1 import gateway_pb2
from vsearch_cli.evaluation.copy_transforms import TRANSFORMS, transformed_copy


def test_every_transform_makes_a_decodable_jpeg_that_differs_as_it_says(ukbench_images: list[Path]) -> None:
    image = Image.open(ukbench_images[0]).convert("RGB")
    copies = {name: Image.open(io.BytesIO(transformed_copy(image, name, random.Random(1)))) for name in TRANSFORMS}
    assert all(copy.format == "JPEG" and copy.mode == "RGB" for copy in copies.values())
    assert copies["crop50"].size == (round(image.width * 0.5), round(image.height * 0.5))
    assert copies["crop70"].size == (round(image.width * 0.7), round(image.height * 0.7))
    assert copies["half_size"].size == (image.width // 2, image.height // 2)
    assert copies["rotate"].width > image.width and copies["rotate"].height > image.height  # grown to hold it
    red, green, blue = (band.tobytes() for band in copies["greyscale"].split())
    assert max(max(abs(r - g), abs(g - b)) for r, g, b in zip(red, green, blue)) <= 3  # grey, up to JPEG noise
    red, green, _ = (band.tobytes() for band in copies["brightness"].split())
    assert red != Image.open(ukbench_images[0]).convert("RGB").split()[0].tobytes()
    mirrored = ImageOps.mirror(image).getpixel((3, image.height // 2))
    assert max(abs(a - b) for a, b in zip(copies["mirror"].getpixel((3, image.height // 2)), mirrored)) < 40
    # Deterministic per seed, different across seeds (random crop position).
    again = transformed_copy(image, "crop50", random.Random(1))
    assert again == transformed_copy(image, "crop50", random.Random(1))
    assert again != transformed_copy(image, "crop50", random.Random(2))


async def _cli(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *VSEARCH, *args, cwd=REPO_ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 300)
    return process.returncode, out.decode(), err.decode()


async def test_copies_of_catalog_images_find_their_original(tmp_path: Path, mobilenet_dir: Path,
                                                           ukbench_images: list[Path]) -> None:
    labels = tmp_path / "labels.csv"
    with labels.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["path", "label"])
        for index, path in enumerate(ukbench_images):
            writer.writerow([path.name, str(index // 4)])
    async with in_process_stack(tmp_path / "stack", mobilenet_dir) as stack:
        gateway = stack.gateway_server.address
        code, out, err = await _cli("eval", "--images", str(ukbench_images[0].parent), "--labels", str(labels),
                                    "--gateway", gateway, "--copies", "5", "--seed", "3", "--json")
        assert code == 0, err
        report = json.loads(out)
        copies = report["copies"]
        assert copies["originals"] == 5 and report["catalog_size"] == 56 and report["queries_failed"] == 0
        assert set(copies["per_transform"]) == set(TRANSFORMS)
        assert all(entry["queries"] == 5 for entry in copies["per_transform"].values())
        assert copies["queries"] == 5 * len(TRANSFORMS)
        # Copies that keep the whole picture find their original first, through the whole system.
        for name in ("jpeg20", "half_size", "mirror", "greyscale"):
            assert copies["per_transform"][name]["recall_at_1"] == 1.0, (name, copies)
        assert 0.0 < copies["recall_at_1"] <= copies["recall_at_10"] <= 1.0
        # The evaluation's own collection is gone; no copy was indexed anywhere.
        assert report["collection_dropped"]
        with pytest.raises(grpc.aio.AioRpcError) as gone:
            await stack.stub.Stats(gateway_pb2.VisualStatsRequest(collection=report["collection"]), timeout=10)
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND
        default = await stack.stub.Stats(gateway_pb2.VisualStatsRequest(), timeout=10)
        assert default.count == 0

        code, _out, err = await _cli("eval", "--images", str(ukbench_images[0].parent), "--labels", str(labels),
                                     "--gateway", gateway, "--copies", "0")
        assert code == 2 and "--copies must be at least 1" in err
    code_both = run_cli("eval", "--images", str(tmp_path), "--labels", str(labels), "--copies", "2",
                        "--text-template", "{label}")
    assert code_both.returncode == 2 and "two different evaluations" in code_both.stderr
