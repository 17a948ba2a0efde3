"""`vsearch eval --copies N`: transformed copies of catalog images, searched through a real stack."""

from __future__ import annotations

import csv
import io
import json
import random
import shutil
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image, ImageOps

from conftest import in_process_stack, run_cli, run_cli_async
from vsearch.client import AddItem, AsyncVisualSearchClient
from vsearch.v1 import gateway_pb2
from vsearch_cli.evaluation.copy_eval import catalog_duplicates, score_copies
from vsearch_cli.evaluation.copy_set_eval import format_copy_set_report, score_copy_set
from vsearch_cli.evaluation.copy_transforms import CHAINED_TRANSFORMS, MORE_TRANSFORMS, TRANSFORMS, transformed_copy
from vsearch_cli.evaluation.eval_command import LabelledImage, QueryOutcome


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


def test_the_transforms_beyond_the_issue_make_the_copies_they_name(ukbench_images: list[Path]) -> None:
    image = Image.open(ukbench_images[0]).convert("RGB")
    width, height = image.size
    copies = {name: Image.open(io.BytesIO(transformed_copy(image, name, random.Random(1)))) for name in MORE_TRANSFORMS}
    assert not set(copies) & set(TRANSFORMS) and len(copies) == 15
    assert all(copy.format == "JPEG" and copy.mode == "RGB" for copy in copies.values())
    assert copies["quarter_size"].size == (width // 4, height // 4)
    assert copies["double_size"].size == (width * 2, height * 2)
    assert copies["squeezed"].size == (int(width * 0.7), height)
    margin = max(width, height) // 4
    assert copies["border"].size == (width + 2 * margin, height + 2 * margin)
    assert copies["crop40"].size == (round(width * 0.4), round(height * 0.4))
    assert copies["crop50_mirror"].size == (round(width * 0.5), round(height * 0.5))
    assert copies["crop70_rotate"].width > round(width * 0.7)  # grown to hold the rotation
    red, green, blue = (band.tobytes() for band in copies["crop70_greyscale"].split())
    assert max(max(abs(r - g), abs(g - b)) for r, g, b in zip(red, green, blue)) <= 3
    pixels = np.asarray(image, dtype=np.float32)
    for name in ("blur", "noise", "contrast", "saturation", "perspective", "patch", "jpeg10"):
        assert copies[name].size == image.size, name
        assert np.abs(np.asarray(copies[name], dtype=np.float32) - pixels).mean() > 2, name  # it did change
    # Blur smooths, noise roughens: the mean difference between neighbouring pixels tells them apart.
    roughness = {name: np.abs(np.diff(np.asarray(copies[name].convert("L"), dtype=np.float32), axis=1)).mean()
                 for name in ("blur", "noise")}
    plain = np.abs(np.diff(np.asarray(image.convert("L"), dtype=np.float32), axis=1)).mean()
    assert roughness["blur"] < plain < roughness["noise"], (roughness, plain)
    again = transformed_copy(image, "noise", random.Random(1))
    assert again == transformed_copy(image, "noise", random.Random(1)) != transformed_copy(image, "noise", random.Random(2))


def test_a_chain_applies_each_of_its_steps_in_order(ukbench_images: list[Path]) -> None:
    """A chain's copy is its steps' copies one after the other, with the one random stream: the same
    bytes as applying them by hand, and the sizes they make."""
    image = Image.open(ukbench_images[0]).convert("RGB")
    width, height = image.size
    assert len(CHAINED_TRANSFORMS) == 8 and not set(CHAINED_TRANSFORMS) & (set(TRANSFORMS) | set(MORE_TRANSFORMS))
    for name in CHAINED_TRANSFORMS:
        steps = name.split("+")
        assert 2 <= len(steps) <= 3 and set(steps) <= set(TRANSFORMS), name
        by_hand, rng = image, random.Random(3)
        for step in steps:
            by_hand = TRANSFORMS[step](by_hand, rng)
        expected = io.BytesIO()
        by_hand.convert("RGB").save(expected, "JPEG", quality=90)
        assert transformed_copy(image, name, random.Random(3)) == expected.getvalue(), name
    copies = {name: Image.open(io.BytesIO(transformed_copy(image, name, random.Random(1)))) for name in CHAINED_TRANSFORMS}
    assert copies["half_size+caption"].size == (width // 2, height // 2)
    assert copies["crop70+jpeg20"].size == (round(width * 0.7), round(height * 0.7))
    assert copies["greyscale+half_size+jpeg20"].size == (width // 2, height // 2)
    red, green, blue = (band.tobytes() for band in copies["mirror+greyscale+caption"].split())
    assert max(max(abs(r - g), abs(g - b)) for r, g, b in zip(red, green, blue)) <= 3
    # Mirrored: the copy's left half is the original's right half flipped (a caption covers the bottom only).
    top = (0, 0, width, height // 2)
    mirrored = np.asarray(copies["mirror+greyscale+caption"].crop(top).convert("L"), dtype=np.float32)
    flipped = np.asarray(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).crop(top).convert("L"), dtype=np.float32)
    assert np.abs(mirrored - flipped).mean() < 3 < np.abs(mirrored - np.asarray(image.crop(top).convert("L"), dtype=np.float32)).mean()


def _write_ukbench_labels(path: Path, images: list[Path]) -> Path:
    with path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["path", "label"])
        for index, image in enumerate(images):
            writer.writerow([image.name, str(index // 4)])
    return path


def _distractors_dir(root: Path, shared_dir: Path, catalog_image: Path) -> tuple[Path, str]:
    """Three Caltech photos (nested, as found in a folder tree), a byte-identical copy of a catalog image
    (to be excluded), a half-size re-encoded copy of it (a copy the catalog does hold: a false copy by
    construction) and a file that is no image. Returns the folder and the re-encoded copy's query id."""
    caltech = shared_dir / "datasets/caltech101/101_ObjectCategories"
    (root / "nested" / "deeper").mkdir(parents=True)
    for index, name in enumerate(("airplanes/image_0001.jpg", "Motorbikes/image_0001.jpg", "watch/image_0001.jpg")):
        shutil.copyfile(caltech / name, root / ("nested" if index else "nested/deeper") / f"caltech-{index}.jpg")
    shutil.copyfile(catalog_image, root / "same-bytes.jpg")
    original = Image.open(catalog_image).convert("RGB")
    original.resize((original.width // 2, original.height // 2)).save(root / "reencoded.jpg", "JPEG", quality=85)
    (root / "notes.txt").write_text("not an image")
    return root, "distractor:reencoded.jpg"


async def test_copies_of_catalog_images_find_their_original(tmp_path: Path, mobilenet_dir: Path, shared_dir: Path,
                                                           ukbench_images: list[Path]) -> None:
    labels = _write_ukbench_labels(tmp_path / "labels.csv", ukbench_images)
    distractors, reencoded_id = _distractors_dir(tmp_path / "distractors", shared_dir, ukbench_images[7])
    images_root = str(ukbench_images[0].parent)
    async with in_process_stack(tmp_path / "stack", mobilenet_dir) as stack:
        gateway = stack.gateway_server.address
        code, out, err = await run_cli_async(
            "eval", "--images", images_root, "--labels", str(labels), "--gateway", gateway, "--copies", "5",
            "--seed", "3", "--distractors", str(distractors), "--json", timeout=300)
        assert code == 0, err
        report = json.loads(out)
        copies = report["copies"]
        assert copies["mode"] == "copy"  # the default
        assert copies["originals"] == 5 and report["catalog_size"] == 56 and report["queries_failed"] == 0
        assert set(copies["per_transform"]) == set(TRANSFORMS)
        assert all(entry["queries"] == 5 for entry in copies["per_transform"].values())
        assert copies["queries"] == 5 * len(TRANSFORMS)
        # Copies that keep the whole picture find their original first, verified as copies, through the
        # whole system.
        for name in ("jpeg20", "half_size", "mirror", "greyscale"):
            entry = copies["per_transform"][name]
            assert entry["recall_at_1"] == entry["copy_recall_at_1"] == 1.0, (name, copies)
            assert entry["original_absent"] == 0 and entry["original_absent_rate"] == 0.0
        assert 0.0 < copies["copy_recall_at_1"] <= copies["recall_at_1"] <= copies["recall_at_10"] <= 1.0
        assert copies["original_absent"] == sum(entry["original_absent"] for entry in copies["per_transform"].values())
        assert copies["target_copy_recall_at_1"] == 0.98
        assert copies["meets_target"] is (copies["copy_recall_at_1"] >= 0.98)

        # Distractors: the byte-identical one is a catalog image, excluded and counted; of the four searched,
        # the Caltech photos are copies of nothing, and the re-encoded copy of a catalog image is found a copy.
        found = report["distractors"]
        assert (found["images"], found["excluded_in_catalog"], found["searched"], found["failed"]) == (5, 1, 4, 0)
        assert found["excluded_examples"] == [str(distractors / "same-bytes.jpg")]
        assert found["with_copy_hit"] == 1 and found["false_copy_examples"] == [reencoded_id]
        assert found["false_copy_rate"] == 0.25 and found["meets_target"] is False

        # The evaluation's own collection is gone; no copy was indexed anywhere.
        assert report["collection_dropped"]
        with pytest.raises(grpc.aio.AioRpcError) as gone:
            await stack.stub.Stats(gateway_pb2.VisualStatsRequest(collection=report["collection"]), timeout=10)
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND
        default = await stack.stub.Stats(gateway_pb2.VisualStatsRequest(), timeout=10)
        assert default.count == 0

        # Distractors that are copies of nothing in the catalog: a rate of 0, with its counts.
        (distractors / "reencoded.jpg").unlink()
        code, out, err = await run_cli_async(
            "eval", "--images", images_root, "--labels", str(labels), "--gateway", gateway, "--copies", "1",
            "--distractors", str(distractors), timeout=300)
        assert code == 0, err
        assert "false copies: 0 of 3 distractors had a hit is_copy (rate 0.0000; target <= 0.01 met)" in out, out
        assert "1 excluded as catalog images" in out

        # The similar-mode baseline: the same figures, without the verdicts only copy mode gives.
        code, out, err = await run_cli_async(
            "eval", "--images", images_root, "--labels", str(labels), "--gateway", gateway, "--copies", "2",
            "--mode", "similar", "--json", timeout=300)
        assert code == 0, err
        baseline = json.loads(out)["copies"]
        assert baseline["mode"] == "similar" and baseline["queries"] == 2 * len(TRANSFORMS)
        assert baseline["copy_recall_at_1"] is None and baseline["meets_target"] is None
        assert baseline["per_transform"]["jpeg20"]["recall_at_1"] == 1.0

        # The transforms beyond the issue's: their own figures, no verdict on the issue's target.
        code, out, err = await run_cli_async(
            "eval", "--images", images_root, "--labels", str(labels), "--gateway", gateway, "--copies", "1",
            "--transforms", "more", "--json", timeout=300)
        assert code == 0, err
        more = json.loads(out)["copies"]
        assert more["transforms"] == "more" and set(more["per_transform"]) == set(MORE_TRANSFORMS)
        assert more["queries"] == len(MORE_TRANSFORMS) and more["meets_target"] is None
        assert more["per_transform"]["jpeg10"]["copy_recall_at_1"] == 1.0

        # Look-alikes as distractors: another photo of each catalog object (its fourth view), from a split of
        # the labels; an excluded label's row is left out.
        split_labels = tmp_path / "split-labels.csv"
        with split_labels.open("w", newline="") as stream:
            writer = csv.writer(stream)
            writer.writerow(["path", "label", "split"])
            for index, image in enumerate(ukbench_images):
                writer.writerow([image.name, str(index // 4), "other" if index % 4 == 3 else "catalog"])
        code, out, err = await run_cli_async(
            "eval", "--images", images_root, "--labels", str(split_labels), "--gateway", gateway, "--copies", "1",
            "--catalog-split", "catalog", "--distractor-split", "other", "--exclude-label", "0", "--json", timeout=300)
        assert code == 0, err
        split_report = json.loads(out)
        assert split_report["catalog_size"] == 42
        found = split_report["distractors"]
        assert found["source"] == "split other of the labels"
        assert (found["images"], found["excluded_in_catalog"], found["searched"], found["failed"]) == (13, 0, 13, 0)
        fourth_views = {f"distractor:{image.name}" for index, image in enumerate(ukbench_images) if index % 4 == 3}
        assert set(found["false_copy_examples"]) <= fourth_views - {f"distractor:{ukbench_images[3].name}"}
        assert found["false_copy_rate"] == pytest.approx(found["with_copy_hit"] / 13, abs=1e-4)
        code, _out, err = await run_cli_async(
            "eval", "--images", images_root, "--labels", str(split_labels), "--gateway", gateway, "--copies", "1",
            "--catalog-split", "catalog", "--distractor-split", "nothing-here")
        assert code == 2 and "--distractor-split nothing-here: no rows of that split" in err

        code, _out, err = await run_cli_async("eval", "--images", images_root, "--labels", str(labels),
                                              "--gateway", gateway, "--copies", "0")
        assert code == 2 and "--copies must be at least 1" in err
    for extra, message in ((["--copies", "2", "--text-template", "{label}"], "two different evaluations"),
                           (["--distractors", str(distractors)], "--distractors go with --copies N"),
                           (["--transforms", "more"], "--transforms goes with --copies N"),
                           (["--distractor-split", "test"], "--distractor-split go with --copies N"),
                           (["--copies", "2", "--distractors", str(distractors), "--distractor-split", "test"],
                            "give --distractors or --distractor-split, not both"),
                           (["--copies", "2", "--mode", "similar", "--distractor-split", "test"],
                            "--distractor-split measures false copies"),
                           (["--copies", "2", "--mode", "similar", "--distractors", str(distractors)],
                            "only copy mode tells")):
        refused = run_cli("eval", "--images", str(tmp_path), "--labels", str(labels), *extra)
        assert refused.returncode == 2 and message in refused.stderr, (extra, refused.stderr)


async def test_copies_eval_with_regions_indexes_its_catalog_with_regions(tmp_path: Path, mobilenet_dir: Path,
                                                                        ukbench_images: list[Path]) -> None:
    labels = _write_ukbench_labels(tmp_path / "labels.csv", ukbench_images[:16])
    images_root = str(ukbench_images[0].parent)
    async with in_process_stack(tmp_path / "stack", mobilenet_dir) as stack:
        gateway = stack.gateway_server.address
        code, out, err = await run_cli_async(
            "eval", "--images", images_root, "--labels", str(labels), "--gateway", gateway, "--copies", "2",
            "--regions", "--keep-collection", "--json", timeout=300)
        assert code == 0, err
        report = json.loads(out)
        assert report["regions"] is True and report["catalog_size"] == 16 and report["queries_failed"] == 0
        assert report["copies"]["queries"] == 2 * len(TRANSFORMS)
        # The collection the copies were searched in holds regions, as the gateway itself says; items, not
        # vectors, are counted.
        stats = await stack.stub.Stats(gateway_pb2.VisualStatsRequest(collection=report["collection"]), timeout=10)
        assert stats.regions and stats.count == 16
        # Copies that keep the whole picture still find their original first, verified, beside the regions.
        assert report["copies"]["per_transform"]["jpeg20"]["copy_recall_at_1"] == 1.0

        # Without the flag, the same evaluation's collection has none, and the text report says which.
        code, out, err = await run_cli_async(
            "eval", "--images", images_root, "--labels", str(labels), "--gateway", gateway, "--copies", "1",
            "--keep-collection", "--json", timeout=300)
        assert code == 0, err
        plain = json.loads(out)
        assert plain["regions"] is False
        stats = await stack.stub.Stats(gateway_pb2.VisualStatsRequest(collection=plain["collection"]), timeout=10)
        assert not stats.regions
        code, out, err = await run_cli_async(
            "eval", "--images", images_root, "--labels", str(labels), "--gateway", gateway, "--copies", "1",
            "--regions", timeout=300)
        assert code == 0, err
        assert "16 images in the catalog (with regions)" in out, out


async def test_a_catalog_duplicate_of_the_original_is_told_from_another_image(tmp_path: Path, mobilenet_dir: Path,
                                                                             ukbench_images: list[Path]) -> None:
    """An original's duplicates in the catalog are the items a copy search by its id verifies: a
    half-size re-encoding and a mirror image of the photo are, another photo of the same object is not."""
    photo = Image.open(ukbench_images[0]).convert("RGB")
    half, mirrored = io.BytesIO(), io.BytesIO()
    photo.resize((photo.width // 2, photo.height // 2)).save(half, "JPEG", quality=80)
    ImageOps.mirror(photo).save(mirrored, "JPEG", quality=90)
    items = [AddItem(ukbench_images[0].read_bytes(), id="photo"), AddItem(half.getvalue(), id="photo-half"),
             AddItem(mirrored.getvalue(), id="photo-mirrored"),
             # ukbench56 shows each object four times: images 1-3 show image 0's from elsewhere, 5-7 image 4's.
             *(AddItem(path.read_bytes(), id=path.stem) for path in ukbench_images[1:8])]
    async with in_process_stack(tmp_path / "stack", mobilenet_dir) as stack:
        async with AsyncVisualSearchClient(stack.gateway_server.address) as client:
            summary = await client.add(items, collection="dups", timeout=120)
            assert summary.failed == 0, summary
            found = await catalog_duplicates(client, "dups", ["photo", ukbench_images[4].stem])
    assert found == {"photo": frozenset({"photo-half", "photo-mirrored"}), ukbench_images[4].stem: frozenset()}


def test_a_first_hit_that_duplicates_the_original_counts_only_in_its_own_figure() -> None:
    def outcome(name: str, transform: str, ranked: list[str], verdicts: tuple[bool, ...]) -> QueryOutcome:
        query = LabelledImage(f"{name}#copy-{transform}", Path(f"/{name}-{transform}.jpg"), name, transform)
        return QueryOutcome(query, ranked, 1.0, False, (), verdicts)

    outcomes = [
        outcome("a", "crop50", ["a", "x"], (True, False)),  # right
        outcome("b", "crop50", ["b-dup", "b"], (True, True)),  # the original's duplicate first
        outcome("c", "crop50", ["x", "c"], (True, True)),  # another image first
        outcome("b", "mirror", ["b", "b-dup"], (False, False)),  # the original first, not verified
    ]
    scores = score_copies(outcomes, {"b": frozenset({"b-dup"}), "c": frozenset({"c-dup"})})
    crop50 = scores["per_transform"]["crop50"]
    assert crop50["copy_recall_at_1"] == round(1 / 3, 4) and crop50["first_hit_other_copy"] == 2
    assert crop50["first_hit_catalog_duplicate"] == 1
    assert crop50["copy_recall_at_1_duplicates_counted"] == round(2 / 3, 4)
    assert scores["copy_recall_at_1"] == 0.25 and scores["copy_recall_at_1_duplicates_counted"] == 0.5
    assert scores["per_transform"]["mirror"]["copy_recall_at_1_duplicates_counted"] == 0.0
    # Without the duplicates looked up, none is counted.
    assert score_copies(outcomes)["copy_recall_at_1_duplicates_counted"] == 0.25
    # Similar mode gives no verdicts, hence no such figure.
    similar = [outcome("a", "crop50", ["a"], (None,))]
    assert score_copies(similar)["copy_recall_at_1_duplicates_counted"] is None


def _copy_set(root: Path, ukbench_images: list[Path]) -> tuple[Path, dict[str, str]]:
    """A copy-detection set as a user brings one: six originals (different objects) in `catalog/`, each
    labelled by its own name; copies of four of them in `crops/` and `jpeg/` under their original's label;
    in `other/` two photos of other objects and a greyscale copy of an original mislabelled as having no
    original (a false copy by construction). Returns the labels CSV and the mislabelled query's id ->
    its original's id."""
    originals = ukbench_images[0:24:4]  # one photo of each of six objects
    rows = []
    for folder in ("catalog", "crops", "jpeg", "other"):
        (root / folder).mkdir(parents=True)
    for original in originals:
        shutil.copyfile(original, root / "catalog" / original.name)
        rows.append((f"catalog/{original.name}", original.stem, "catalog"))
    for index, original in enumerate(originals[:4]):
        folder, transform = ("crops", "crop70") if index < 2 else ("jpeg", "jpeg20")
        copy = transformed_copy(Image.open(original).convert("RGB"), transform, random.Random(index))
        (root / folder / original.name).write_bytes(copy)
        rows.append((f"{folder}/{original.name}", original.stem, "query"))
    for index, other in enumerate(ukbench_images[24:32:4]):  # other objects: no copy in the catalog
        shutil.copyfile(other, root / "other" / other.name)
        rows.append((f"other/{other.name}", f"nothing-{index}", "query"))
    ImageOps.grayscale(Image.open(originals[5])).save(root / "other" / "mislabelled.jpg", "JPEG", quality=90)
    rows.append(("other/mislabelled.jpg", "nothing-else", "query"))
    labels = root / "labels.csv"
    with labels.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["path", "label", "split"])
        writer.writerows(rows)
    return labels, {"other/mislabelled.jpg": f"catalog/{originals[5].name}"}


async def test_a_copy_set_of_ones_own_is_scored_by_its_labels(tmp_path: Path, mobilenet_dir: Path,
                                                              ukbench_images: list[Path]) -> None:
    """`vsearch eval --mode copy` without --copies: the query rows are copies labelled as their originals,
    or queries whose label no catalog row has; searched in copy mode through a real stack."""
    labels, mislabelled = _copy_set(tmp_path / "set", ukbench_images)
    distractors = tmp_path / "distractors"  # photos of two more objects: copies of nothing in the catalog
    distractors.mkdir()
    for other in ukbench_images[33:41:4]:
        shutil.copyfile(other, distractors / other.name)
    async with in_process_stack(tmp_path / "stack", mobilenet_dir) as stack:
        args = ("eval", "--images", str(tmp_path / "set"), "--labels", str(labels), "--gateway",
                stack.gateway_server.address, "--catalog-split", "catalog", "--query-split", "query", "--mode", "copy")
        code, out, err = await run_cli_async(*args, "--json", "--distractors", str(distractors), timeout=300)
        assert code == 0, err
        report = json.loads(out)
        assert (report["distractors"]["searched"], report["distractors"]["with_copy_hit"]) == (2, 0), report
        found = report["copy_set"]
        assert report["catalog_size"] == 6 and report["queries_failed"] == 0 and report["collection_dropped"]
        assert (found["queries"], found["with_copy"], found["without_copy"]) == (7, 4, 3)
        assert set(found["per_folder"]) == {"crops", "jpeg", "other"}
        for folder in ("crops", "jpeg"):
            entry = found["per_folder"][folder]
            assert entry["with_copy"] == 2 and entry["without_copy"] == 0
            assert entry["recall_at_1"] == entry["copy_recall_at_1"] == entry["copy_found"] == 1.0, (folder, found)
        assert found["copy_recall_at_1"] == 1.0 and found["meets_copy_target"] is True and found["missed"] == []
        # Only the mislabelled copy is a false copy: the photos of other objects are copies of nothing.
        assert found["false_copies"] == found["per_folder"]["other"]["false_copies"] == 1
        assert found["false_copy_examples"] == [{"query": query, "copy_hit": original}
                                                for query, original in mislabelled.items()]
        assert found["false_copy_rate"] == round(1 / 3, 4) and found["meets_false_copy_target"] is False

        code, out, err = await run_cli_async(*args, timeout=300)
        assert code == 0, err
        assert "copy recall@1 (first hit has the query's label, is_copy) 1.0000: target >= 0.98 met" in out, out
        assert "false copies: 1 of 3 queries whose label no catalog image has (rate 0.3333" in out, out

    for extra, message in ((["--mode", "copy", "--text-template", "{label}"], "two different evaluations"),
                           (["--transforms", "more", "--mode", "copy"], "--transforms goes with --copies N"),
                           (["--distractor-split", "query"], "go with --copies N or --mode copy")):
        refused = run_cli("eval", "--images", str(tmp_path / "set"), "--labels", str(labels), *extra)
        assert refused.returncode == 2 and message in refused.stderr, (extra, refused.stderr)


def test_a_copy_set_counts_each_query_as_a_copy_or_not_by_its_label() -> None:
    catalog = [LabelledImage(name, Path(f"/{name}"), label, "") for name, label in
               (("a", "A"), ("b", "B"), ("c", "C"), ("x", "X"))]

    def outcome(query_id: str, label: str, hits: list[tuple[str, bool]]) -> QueryOutcome:
        query = LabelledImage(query_id, Path(f"/{query_id}"), label, "")
        return QueryOutcome(query, [hit for hit, _ in hits], 1.0, False, (), tuple(copy for _, copy in hits))

    outcomes = [
        outcome("crops/1.jpg", "A", [("a", True), ("b", False)]),  # found, verified
        outcome("crops/2.jpg", "B", [("c", True), ("b", True)]),  # another image verified first
        outcome("jpeg/3.jpg", "C", [("a", False), ("b", False)]),  # its original not in the hits
        outcome("other/4.jpg", "Z", [("a", False)]),  # no copy in the catalog, none claimed
        outcome("other/5.jpg", "Y", [("b", False), ("c", True)]),  # a false copy, at any rank
        outcome("x", "X", [("x", True), ("a", False)]),  # a catalog row as a query: its own hit does not count
    ]
    scores = score_copy_set(outcomes, catalog)
    assert (scores["queries"], scores["with_copy"], scores["without_copy"]) == (6, 3, 3)
    assert scores["recall_at_1"] == scores["copy_recall_at_1"] == round(1 / 3, 4)
    assert scores["copy_found"] == round(2 / 3, 4) and scores["recall_at_10"] == round(2 / 3, 4)
    assert scores["relevant_absent"] == 1 and scores["first_hit_other_copy"] == 1
    assert scores["false_copies"] == 1 and scores["false_copy_rate"] == round(1 / 3, 4)
    assert scores["false_copy_examples"] == [{"query": "other/5.jpg", "copy_hit": "c"}]
    assert scores["first_hit_other_copy_examples"] == [{"query": "crops/2.jpg", "first_hit": "c"}]
    assert scores["per_folder"]["crops"]["copy_recall_at_1"] == 0.5
    assert scores["per_folder"]["jpeg"]["relevant_absent"] == 1
    assert scores["per_folder"]["(top)"] == {**scores["per_folder"]["(top)"], "without_copy": 1, "false_copies": 0}
    assert scores["meets_copy_target"] is False and scores["meets_false_copy_target"] is False
    assert scores["missed"] == [
        {"query": "crops/2.jpg", "why": "another image first (its original at rank 2)", "first_hit": "c"},
        {"query": "jpeg/3.jpg", "why": "not among the hits", "first_hit": "a"},
    ]
    unverified = score_copy_set([outcome("crops/7.jpg", "A", [("a", False)])], catalog)
    report = {"copy_set": scores, "regions": False, "catalog_size": 4, "query_p50_ms": 1.0, "query_p95_ms": 1.0,
              "queries_failed": 0, "collection": "c", "collection_dropped": True}
    text = format_copy_set_report(report)
    assert "  missed crops/2.jpg: another image first (its original at rank 2)" in text, text
    assert "  missed jpeg/3.jpg: not among the hits" in text
    assert unverified["missed"] == [{"query": "crops/7.jpg", "why": "first, but not verified a copy", "first_hit": "a"}]
