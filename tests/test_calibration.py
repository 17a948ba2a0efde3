"""Calibrated scores: the isotonic fit and the calibration error as functions, `vsearch model calibrate` as
a user runs it, and a calibrated model served through the real stack: every hit's match_probability
(gRPC, HTTP, `vsearch search`, the web page), min_probability, no_good_match and its setting, an
uncalibrated model that makes none up, and `vsearch eval`'s calibration_error."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import math
import shutil
from pathlib import Path
from typing import AsyncIterator

import grpc
import httpx
import numpy as np
import pytest
from google.protobuf import struct_pb2

from conftest import embedder_settings, in_process_stack, repeat_until_cached, run_cli, running_embedder
from embedder_svc.model_card import read_model_card
from gateway.server import create_server as create_gateway
from gateway.settings import GatewaySettings
from vsearch.v1 import gateway_pb2, gateway_pb2_grpc, search_pb2
from vsearch_cli.evaluation.retrieval_metrics import expected_calibration_error
from vsearch_cli.model_tools.calibrate import ScoreCalibration, isotonic_knots, pool_adjacent_violators

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


# ---- the functions --------------------------------------------------------------------------------


def test_expected_calibration_error_by_hand():
    # Bins [0, .1): p .05, none relevant -> .05; [.1, .2): p .15, relevant -> .85; [.9, 1]: p .95 twice,
    # one relevant -> .45 over two hits. (1 x .05 + 1 x .85 + 2 x .45) / 4.
    assert expected_calibration_error([0.05, 0.15, 0.95, 0.95], [False, True, True, False]) == pytest.approx(0.45)
    assert expected_calibration_error([1.0, 0.0], [True, False]) == 0.0
    with pytest.raises(ValueError):
        expected_calibration_error([], [])


def test_pool_adjacent_violators_pools_what_decreases():
    starts, weights, means = pool_adjacent_violators(np.array([1.0, 3.0, 2.0, 4.0, 0.0]), np.ones(5))
    assert starts.tolist() == [0, 1] and weights.tolist() == [1, 4] and means.tolist() == [1.0, 2.25]


def test_isotonic_knots_follow_a_step_with_few_monotone_knots():
    rng = np.random.default_rng(0)
    scores = rng.uniform(0, 1, 20_000)
    relevant = rng.uniform(0, 1, scores.size) < np.where(scores > 0.5, 0.8, 0.2)
    knots_x, knots_y = isotonic_knots(scores, relevant, max_knots=100)
    assert len(knots_x) <= 100
    assert np.all(np.diff(knots_x) > 0) and np.all(np.diff(knots_y) >= 0)
    fitted = ScoreCalibration(knots_x, knots_y, 0.0)
    low, high = fitted.probability(np.array([0.25, 0.75]), np.array([1, 1]))
    assert low == pytest.approx(0.2, abs=0.04) and high == pytest.approx(0.8, abs=0.04)
    # Constant beyond the ends.
    assert fitted.probability(np.array([-5.0, 5.0]), np.array([1, 1])).tolist() == [knots_y[0], knots_y[-1]]


# ---- vsearch model calibrate ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def calibrated(caltech_sample, mobilenet_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("calibrated") / "model"
    result = run_cli("model", "calibrate", "--model-dir", str(mobilenet_dir), "--images", str(caltech_sample.root),
                     "--labels", str(caltech_sample.labels_csv), "--split-col", "split", "--fit-split", "train",
                     "--out", str(out), timeout=300)
    assert result.returncode == 0, result.stderr
    return out, result


def test_calibrate_writes_knots_into_a_card_with_a_new_version(calibrated, mobilenet_dir, caltech_sample):
    out, result = calibrated
    card, source = read_model_card(out), read_model_card(mobilenet_dir)
    calibration = card.calibration
    assert calibration is not None and source.calibration is None  # --out: the source is left as it was
    assert 2 <= len(calibration.score_knots) <= 100
    assert np.all(np.diff(calibration.score_knots) > 0) and np.all(np.diff(calibration.probability_knots) >= 0)
    assert calibration.uncalibrated_version == source.version and card.version != source.version
    assert calibration.labels_sha256 == hashlib.sha256(caltech_sample.labels_csv.read_bytes()).hexdigest()
    assert calibration.pairs == 72 * 71  # each of the 72 fit images against the 71 others
    assert calibration.held_out_ece is not None
    assert f"expected calibration error {calibration.held_out_ece:.4f} on 48 held-out images" in result.stdout
    assert (out / "model.onnx").read_bytes() == (mobilenet_dir / "model.onnx").read_bytes()


def test_calibrate_refuses_options_that_do_not_go_together(caltech_sample, mobilenet_dir, tmp_path):
    result = run_cli("model", "calibrate", "--model-dir", str(mobilenet_dir), "--images", str(caltech_sample.root),
                     "--labels", str(caltech_sample.labels_csv), "--fit-split", "train", "--out", str(tmp_path / "m"))
    assert result.returncode == 1 and "--split-col and --fit-split go together" in result.stderr
    assert not (tmp_path / "m").exists()


# ---- served -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def stack(calibrated, caltech_sample, tmp_path_factory):
    """The calibrated model behind the whole stack, the 120 sample images indexed with their labels."""
    out, _ = calibrated
    async with in_process_stack(tmp_path_factory.mktemp("calibrated-stack"), out) as stack:
        def requests():
            for path, label, _split in caltech_sample.rows:
                metadata = struct_pb2.Struct()
                metadata.update({"category": label})
                yield gateway_pb2.AddImageRequest(id=path, image=(caltech_sample.root / path).read_bytes(),
                                                  metadata=metadata, image_uri=f"test://{path}")

        summary = await stack.stub.AddImages(requests(), timeout=300)
        assert (summary.indexed, summary.failed) == (120, 0), summary
        yield stack


@contextlib.asynccontextmanager
async def gateway_on(embedder_address: str, search_address: str, **settings: object) -> AsyncIterator[
        tuple[gateway_pb2_grpc.VisualSearchStub, httpx.AsyncClient]]:
    """One more real gateway (in-process cache) over running services, with its own settings."""
    gateway, _ = await create_gateway(GatewaySettings(
        port=0, http_port=0, embedder_address=embedder_address, search_address=search_address, **settings))
    await gateway.start()
    try:
        await gateway.wait_ready(30)
        async with grpc.aio.insecure_channel(gateway.address) as channel, httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{gateway.http_port}", timeout=30) as http:
            yield gateway_pb2_grpc.VisualSearchStub(channel), http
    finally:
        await gateway.stop(grace=1)


def card_probabilities(model_dir: Path, scores: list[float]) -> np.ndarray:
    calibration = read_model_card(model_dir).calibration
    fitted = ScoreCalibration(np.array(calibration.score_knots), np.array(calibration.probability_knots),
                              calibration.rank_scale)
    return fitted.probability(np.array(scores), np.arange(1, len(scores) + 1))


def probabilities_of(reply: gateway_pb2.VisualSearchResponse) -> list[float]:
    assert all(hit.HasField("match_probability") for hit in reply.hits)
    return [hit.match_probability for hit in reply.hits]


async def test_every_hit_carries_the_cards_probability(stack, calibrated, caltech_sample):
    out, _ = calibrated
    stats = await stack.stub.Stats(gateway_pb2.VisualStatsRequest(), timeout=10)
    assert stats.calibrated and stats.model_version == read_model_card(out).version
    for path in caltech_sample.paths("test")[::8]:
        reply = await stack.search(path.read_bytes(), k=30)
        probabilities = probabilities_of(reply)
        assert probabilities == pytest.approx(card_probabilities(out, [hit.score for hit in reply.hits]).tolist(), abs=1e-6)
        # Down the ranking scores fall and ranks grow: the probability never rises.
        assert all(later <= earlier + 1e-7 for earlier, later in zip(probabilities, probabilities[1:]))
        assert reply.no_good_match == (probabilities[0] < 0.5)
        # The same result from the cache carries the same probabilities.
        again = await repeat_until_cached(lambda: stack.search(path.read_bytes(), k=30))
        assert probabilities_of(again) == probabilities


async def test_min_probability_filters_like_min_score_and_bad_values_are_refused(stack, caltech_sample):
    image = caltech_sample.paths("test")[1].read_bytes()
    everything = await stack.search(image, k=40)
    probabilities = probabilities_of(everything)
    distinct = sorted(set(probabilities))
    assert len(distinct) > 2, probabilities
    threshold = distinct[len(distinct) // 2]
    filtered = await stack.search(image, k=40, min_probability=threshold)
    assert [hit.id for hit in filtered.hits] == [hit.id for hit, p in zip(everything.hits, probabilities) if p >= threshold]
    assert 0 < len(filtered.hits) < len(everything.hits)
    for bad in (1.5, -0.1, math.nan):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stack.search(image, k=5, min_probability=bad)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "min_probability must be within [0, 1]" in refused.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stack.stub.Search(gateway_pb2.VisualSearchRequest(text="a crocodile", min_probability=0.5), timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "min_probability applies only to image and item_id queries" in refused.value.details()


async def test_no_good_match_follows_the_gateways_threshold(stack, ukbench_bytes):
    # A UKBench photo is like nothing in the Caltech sample: its best hit is far from certain.
    default = await stack.search(ukbench_bytes[0], k=5)
    best = probabilities_of(default)[0]
    assert best < 1.0
    assert default.no_good_match == (best < 0.5)
    # A threshold on the other side of the best hit's probability flips it.
    threshold = best / 2 if default.no_good_match else (best + 1) / 2
    async with gateway_on(stack.embedder_server.address, stack.search_server.address,
                          no_good_match_below=threshold) as (stub, http):
        other = await stub.Search(gateway_pb2.VisualSearchRequest(image=ukbench_bytes[0], k=5), timeout=30)
        assert [hit.id for hit in other.hits] == [hit.id for hit in default.hits]
        assert other.no_good_match == (not default.no_good_match)
        body = (await http.post("/v1/search", json={"item_id": default.hits[0].id, "k": 3})).json()
        assert body["no_good_match"] is (body["hits"][0]["match_probability"] < threshold)
    # No hit at all is never a good match.
    nothing = await stack.search(ukbench_bytes[0], k=5, filter=search_pb2.Filter(conditions=[search_pb2.Condition(
        field="category", op=search_pb2.EQ, value=struct_pb2.Value(string_value="no such category"))]))
    assert len(nothing.hits) == 0 and nothing.no_good_match


async def test_an_uncalibrated_model_makes_no_probability_up(stack, mobilenet_dir, caltech_sample):
    image = caltech_sample.paths("test")[0].read_bytes()
    # The same vectors, the card without a calibration, behind its own gateway over the same index.
    async with running_embedder(embedder_settings(mobilenet_dir)) as embedder, gateway_on(
            embedder.server.address, stack.search_server.address) as (stub, http):
        stats = await stub.Stats(gateway_pb2.VisualStatsRequest(), timeout=10)
        assert not stats.calibrated
        reply = await stub.Search(gateway_pb2.VisualSearchRequest(image=image, k=5), timeout=30)
        assert len(reply.hits) == 5 and not any(hit.HasField("match_probability") for hit in reply.hits)
        assert not reply.no_good_match  # hits, and nothing to say they are bad
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Search(gateway_pb2.VisualSearchRequest(image=image, k=5, min_probability=0.5), timeout=30)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "has no calibration" in refused.value.details()
        response = await http.post("/v1/search", files={"image": ("q.jpg", image, "image/jpeg")}, data={"k": "3"})
        assert response.status_code == 200
        assert [hit["match_probability"] for hit in response.json()["hits"]] == [None, None, None]
        assert response.json()["no_good_match"] is False
        response = await http.post("/v1/search", files={"image": ("q.jpg", image, "image/jpeg")},
                                   data={"min_probability": "0.5"})
        assert response.status_code == 400 and response.json()["error"]["code"] == "FAILED_PRECONDITION"
        assert (await http.get("/v1/stats")).json()["calibrated"] is False


async def test_http_shows_probabilities_and_takes_min_probability(stack, caltech_sample):
    image = caltech_sample.paths("test")[5].read_bytes()
    assert (await stack.http.get("/v1/stats")).json()["calibrated"] is True
    reply = await stack.search(image, k=10)
    body = (await stack.search_file(image, k="10")).json()
    assert [hit["match_probability"] for hit in body["hits"]] == pytest.approx(probabilities_of(reply), abs=1e-6)
    assert body["no_good_match"] is reply.no_good_match
    threshold = probabilities_of(reply)[4]
    expected = [hit.id for hit in reply.hits if hit.match_probability >= threshold]
    by_form = (await stack.search_file(image, k="10", min_probability=str(threshold))).json()
    by_json = (await stack.http.post("/v1/search", json={"image_base64": base64.b64encode(image).decode(),
                                                          "k": 10, "min_probability": threshold})).json()
    assert [hit["id"] for hit in by_form["hits"]] == [hit["id"] for hit in by_json["hits"]] == expected
    response = await stack.search_file(image, min_probability="2")
    assert response.status_code == 400 and "min_probability must be within [0, 1]" in response.json()["error"]["message"]
    response = await stack.http.post("/v1/search", json={"item_id": reply.hits[0].id, "min_probability": "0.5"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "INVALID_ARGUMENT"


async def test_vsearch_search_shows_probabilities(stack, caltech_sample):
    image = caltech_sample.paths("test")[2]
    gateway = stack.gateway_server.address
    reply = await stack.search(image.read_bytes(), k=3)
    shown = await asyncio.to_thread(run_cli, "search", str(image), "-k", "3", "--gateway", gateway)
    assert shown.returncode == 0, shown.stderr
    assert f"p={reply.hits[0].match_probability:.2f}" in shown.stdout.splitlines()[1]
    as_json = await asyncio.to_thread(run_cli, "search", str(image), "-k", "3", "--min-probability", "0", "--json",
                                      "--gateway", gateway)
    parsed = json.loads(as_json.stdout)
    assert [hit["match_probability"] for hit in parsed["hits"]] == pytest.approx(probabilities_of(reply), abs=1e-6)
    assert parsed["no_good_match"] is reply.no_good_match


async def test_eval_reports_the_calibration_error_of_the_hits(stack, caltech_sample):
    result = await asyncio.to_thread(
        run_cli, "eval", "--images", str(caltech_sample.root), "--labels", str(caltech_sample.labels_csv),
        "--catalog-split", "test", "--query-split", "test", "--k", "20", "--json",
        "--gateway", stack.gateway_server.address, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    # 48 queries, each scored on the 20 hits after its own: every one carries a probability.
    assert report["calibration_hits"] == 48 * 20 and report["calibration_hits_without_probability"] == 0
    assert 0.0 <= report["calibration_error"] <= 1.0
    # The error is at least the gap between the mean probability and the share relevant (one bin's worth).
    assert report["calibration_error"] >= abs(report["mean_match_probability"] - report["relevant_share"]) - 1e-4


async def test_web_page_shows_probabilities_and_no_good_match(stack, ukbench_images, caltech_sample):
    from playwright.async_api import async_playwright, expect

    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("chromium not installed (scripts/setup installs Debian's chromium)")
    assert probabilities_of(await stack.search(ukbench_images[0].read_bytes(), k=1))[0] < 1.0
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        try:
            page = await browser.new_page()
            await page.goto(f"http://127.0.0.1:{stack.gateway_server.http_port}/")
            await expect(page.locator("#minProbabilityBox")).to_be_visible()  # stats say calibrated
            await page.set_input_files("#file", str(caltech_sample.paths("test")[0]))
            await page.click("#go")
            await expect(page.locator(".hit")).to_have_count(12)
            await expect(page.locator(".hit .probability")).to_have_count(12)
            await expect(page.locator(".hit .probability").first).to_contain_text("match probability")
            await page.set_input_files("#file", str(ukbench_images[0]))
            await page.fill("#minProbability", "1")
            await page.click("#go")
            await expect(page.locator(".hit")).to_have_count(0)
            await expect(page.locator("#noGoodMatch")).to_be_visible()
            await expect(page.locator("#noGoodMatch")).to_contain_text("No good match: no hits")
        finally:
            await browser.close()
