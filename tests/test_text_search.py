"""Search by words: the card's text section, the embedder's EmbedTexts, the gateway's `text` queries
(gRPC, HTTP JSON and form, CLI, eval), on a tiny dual encoder built here (tests/dual_encoder.py) and on
the real MobileNetV2-int8 classifier path (MiniLM sentence encoder, ImageNet class names); and the
offline pieces: measuring a classifier head, the threshold rule, carrying the text files to a model
made from a prepared one."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import shutil
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from conftest import (
    CHROMIUM_FLAGS, REPO_ROOT, VSEARCH, embedder_settings, in_process_stack, repeat_until_cached, run_cli,
    running_embedder,
)
from dual_encoder import COLOURS, build_dual_encoder, colour_image, write_tokenizer_json
from embedder_svc.model_card import read_model_card, write_model_card
from embedder_svc.text_search import ClassSynonyms, TextSearcher, class_similarities, load_text_encoder
from gateway.settings import TextExpansionSettings
from vsearch.v1 import embedder_pb2, embedder_pb2_grpc, gateway_pb2, search_pb2, search_pb2_grpc
from vsearch_cli.model_tools.text_search import (
    TextSearchError,
    cached_name_similarities,
    carry_text_search,
    choose_min_similarity,
    measure_linear_head,
)

CALTECH = "datasets/caltech101/101_ObjectCategories"


@pytest.fixture(scope="module")
def dual_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model_dir = tmp_path_factory.mktemp("dual-encoder")
    build_dual_encoder(model_dir)
    return model_dir


async def index_colours(stack, collection: str = "") -> None:
    """Three shades of each colour, with category = the colour and price = the shade."""
    requests = [
        gateway_pb2.AddImageRequest(id=f"{colour}-{shade}", image=colour_image(colour, shade), collection=collection)
        for colour in COLOURS for shade in range(3)
    ]
    for request in requests:
        colour, shade = request.id.split("-")
        request.metadata.update({"category": colour, "price": float(shade)})
    summary = await stack.stub.AddImages(iter(requests), timeout=60)
    assert summary.indexed == len(requests), summary


async def text_search(stack, text: str, k: int = 3, **fields: object) -> gateway_pb2.VisualSearchResponse:
    return await stack.stub.Search(gateway_pb2.VisualSearchRequest(text=text, k=k, **fields), timeout=30)


# ---- the dual encoder, through the whole stack ----------------------------------------------------


async def test_dual_encoder_words_rank_their_colour_first_through_grpc_http_and_caches(tmp_path, dual_dir):
    async with in_process_stack(tmp_path, dual_dir) as stack:
        stats = await stack.stub.Stats(gateway_pb2.VisualStatsRequest(), timeout=10)
        assert stats.text_search == "dual_encoder"
        await index_colours(stack)
        for text, colour in [("red", "red"), ("a photo of the sky", "blue"), ("  GRASS ", "green"), ("tomato", "red")]:
            reply = await text_search(stack, text)
            assert [hit.id.split("-")[0] for hit in reply.hits] == [colour] * 3, (text, reply)
            assert reply.understood_as == "" and reply.no_match_reason == ""
        # The same words again, spelt with other spacing: the embedding cache (sha256 of the normalised
        # text) answers, and the result cache too, once the first spelling's entries are written (after
        # its reply; waited for with that spelling, so the other's own writes cannot make it pass).
        cached = await repeat_until_cached(lambda: text_search(stack, "a photo of the sky"))
        again = await text_search(stack, "a  photo of\tthe sky")
        assert again.embedding_from_cache and again.from_cache
        assert [hit.id for hit in again.hits] == [hit.id for hit in cached.hits]
        # Filters apply to text queries as to images.
        filtered = await text_search(stack, "red", k=5, filter=search_pb2.Filter(conditions=[
            search_pb2.Condition(field="category", op=search_pb2.EQ, value=_value("green"))]))
        assert {hit.id.split("-")[0] for hit in filtered.hits} == {"green"}
        # A word the model gives no direction to: no hits, and why.
        nothing = await text_search(stack, "xylophone")
        assert not nothing.hits and nothing.no_good_match and "no direction" in nothing.no_match_reason

        # HTTP: JSON and form.
        response = await stack.http.post("/v1/search", json={"text": "blue", "k": 2})
        assert response.status_code == 200, response.text
        assert [hit["id"].split("-")[0] for hit in response.json()["hits"]] == ["blue", "blue"]
        response = await stack.http.post("/v1/search", data={"text": "green", "k": "2"})
        assert response.status_code == 200, response.text
        assert [hit["id"].split("-")[0] for hit in response.json()["hits"]] == ["green", "green"]
        assert (await stack.http.get("/v1/stats")).json()["text_search"] == "dual_encoder"
        response = await stack.http.post("/v1/search", json={"text": "blue", "item_id": "red-0"})
        assert response.status_code == 400 and "give either item_id or text, not both" in response.json()["error"]["message"]


def _value(text: str):
    from google.protobuf import struct_pb2

    return struct_pb2.Value(string_value=text)


async def test_text_queries_are_validated_before_anything_is_embedded(tmp_path, dual_dir):
    async with in_process_stack(tmp_path, dual_dir) as stack:
        for text, problem in [("", "empty"), ("   \n ", "empty"), ("red\x00", "control character"),
                              ("red\x1b[0m", "control character"), ("red " * 200, "limit is 500")]:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await text_search(stack, text)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, text
            assert problem in raised.value.details(), raised.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await text_search(stack, "red", crop=embedder_pb2.CropBox(x=0, y=0, width=4, height=4))
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "crop" in raised.value.details()
        response = await stack.http.post("/v1/search", json={"text": "red\u0007"})
        assert response.status_code == 400 and "control character" in response.json()["error"]["message"]
        for body in ({"json": {"text": ""}}, {"data": {"text": "", "k": "2"}}):
            response = await stack.http.post("/v1/search", **body)
            assert response.status_code == 400 and response.json()["error"] == {
                "code": "INVALID_ARGUMENT", "message": "text is empty"}, body
        response = await stack.http.post("/v1/search", json={"text": "red " * 200})
        assert response.status_code == 400 and response.json()["error"]["message"] == "text is 799 characters; the limit is 500"


async def test_text_search_works_per_collection(tmp_path, dual_dir):
    async with in_process_stack(tmp_path, dual_dir) as stack:
        await index_colours(stack, collection="colours")
        reply = await text_search(stack, "red", collection="colours")
        assert [hit.id for hit in reply.hits][:1] == ["red-0"] or reply.hits[0].id.startswith("red")
        empty = await text_search(stack, "red")  # the default collection holds nothing
        assert not empty.hits


# Solid colours around red in the dual encoder's chroma plane (tests/dual_encoder.py): "red" is closest to
# orange-0, then to the pink distractor, then to the other oranges; the oranges' mean lies on their side.
EXPANSION_CATALOG = {
    "orange-0": (209, 97, 78), "pink-0": (208, 73, 103), "orange-1": (204, 117, 64), "orange-2": (201, 122, 60),
    "orange-3": (199, 128, 57),
}


def solid_image(rgb: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (48, 40), rgb).save(buffer, format="PNG")
    return buffer.getvalue()


async def index_expansion_catalog(stack) -> None:
    requests = []
    for item_id, rgb in EXPANSION_CATALOG.items():
        request = gateway_pb2.AddImageRequest(id=item_id, image=solid_image(rgb))
        request.metadata.update({"category": item_id.split("-")[0]})
        requests.append(request)
    summary = await stack.stub.AddImages(iter(requests), timeout=60)
    assert summary.indexed == len(requests), summary


async def text_and_stored_vectors(stack, text: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The text's query vector (the embedder's) and every stored vector (search_svc's), asked directly."""
    async with grpc.aio.insecure_channel(stack.embedder_server.address) as channel:
        reply = await embedder_pb2_grpc.EmbedderStub(channel).EmbedTexts(
            embedder_pb2.EmbedTextsRequest(texts=[text]), timeout=10)
    async with grpc.aio.insecure_channel(stack.search_server.address) as channel:
        found = await search_pb2_grpc.VectorSearchStub(channel).Get(
            search_pb2.GetRequest(ids=list(EXPANSION_CATALOG), include_vectors=True), timeout=10)
    return (np.asarray(reply.results[0].embedding.values),
            {item.id: np.asarray(item.vector.values) for item in found.items})


def expected_scores(text_vector: np.ndarray, fed_back: list[np.ndarray], stored: dict[str, np.ndarray]) -> dict[str, float]:
    query = text_vector / np.linalg.norm(text_vector) + np.mean(fed_back, axis=0)
    query /= np.linalg.norm(query)
    return {item_id: float(query @ vector) for item_id, vector in stored.items()}


async def test_text_expansion_by_the_first_hits_moves_a_distractor_down_and_keeps_to_the_filter(tmp_path, dual_dir):
    """The text vector alone ranks the pink distractor second; expanded by its first hits (the default
    10, of which 4 are orange) the query moves towards the oranges, which then fill the top 3. With
    `hits` 0 the gateway searches once."""
    async with in_process_stack(tmp_path / "off", dual_dir, text_expansion=TextExpansionSettings(hits=0)) as stack:
        await index_expansion_catalog(stack)
        once = await text_search(stack, "red")
        assert [hit.id for hit in once.hits] == ["orange-0", "pink-0", "orange-1"]

    async with in_process_stack(tmp_path / "on", dual_dir) as stack:
        assert stack.gateway_server.settings.text_expansion == TextExpansionSettings(hits=10, weight=1.0)
        await index_expansion_catalog(stack)
        expanded = await text_search(stack, "red")
        assert [hit.id for hit in expanded.hits] == ["orange-0", "orange-1", "orange-2"]
        assert expanded.understood_as == "" and not expanded.from_cache
        # The result cache holds the expanded answer.
        again = await repeat_until_cached(lambda: text_search(stack, "red"))
        assert [hit.id for hit in again.hits] == [hit.id for hit in expanded.hits]

        # The scores are those of unit(text + mean of the hits' stored vectors), all five items here.
        text_vector, stored = await text_and_stored_vectors(stack, "red")
        everything = expected_scores(text_vector, [stored[item_id] for item_id in EXPANSION_CATALOG], stored)
        assert [hit.score for hit in expanded.hits] == pytest.approx([everything[hit.id] for hit in expanded.hits],
                                                                      abs=1e-4)

        # Both searches keep to the filter: without pink, only the oranges are fed back (the scores say
        # so: with pink among them they would differ), and only oranges come back.
        not_pink = search_pb2.Filter(conditions=[
            search_pb2.Condition(field="category", op=search_pb2.NE, value=_value("pink"))])
        filtered = await text_search(stack, "red", k=5, filter=not_pink)
        assert [hit.id for hit in filtered.hits] == ["orange-0", "orange-1", "orange-2", "orange-3"]
        oranges = expected_scores(text_vector, [stored[item_id] for item_id in EXPANSION_CATALOG if item_id != "pink-0"],
                                  stored)
        assert [hit.score for hit in filtered.hits] == pytest.approx([oranges[hit.id] for hit in filtered.hits], abs=1e-4)
        assert abs(oranges["orange-3"] - everything["orange-3"]) > 1e-3
        # A first search with one hit is answered as it is: the text's own score.
        pink_only = search_pb2.Filter(conditions=[
            search_pb2.Condition(field="category", op=search_pb2.EQ, value=_value("pink"))])
        filtered = await text_search(stack, "red", k=5, filter=pink_only)
        assert [hit.id for hit in filtered.hits] == ["pink-0"]
        assert filtered.hits[0].score == pytest.approx(float(text_vector @ stored["pink-0"]), abs=1e-4)
        # A text that names nothing still answers no hits, with its reason.
        nothing = await text_search(stack, "xylophone")
        assert not nothing.hits and nothing.no_good_match and "no direction" in nothing.no_match_reason


async def test_cli_searches_by_words_and_eval_scores_text_templates(tmp_path, dual_dir):
    async with in_process_stack(tmp_path, dual_dir) as stack:
        await index_colours(stack)
        gateway = stack.gateway_server.address
        code, out, err = await _cli("search", "--text", "the sky", "-k", "3", "--gateway", gateway, "--json")
        assert code == 0, err
        assert [hit["id"].split("-")[0] for hit in json.loads(out)["hits"]] == ["blue"] * 3
        code, _out, err = await _cli("search", "--text", "red", str(tmp_path / "x.jpg"), "--gateway", gateway)
        assert code == 2 and "not both" in err
        code, out, err = await _cli("search", "--text", "xylophone", "--gateway", gateway)
        assert code == 0, err
        assert out.splitlines()[0] == "no match: the text gives no direction in the image space"
        assert out.splitlines()[1].startswith("0 hits in ")
        code, _out, err = await _cli("search", "--text", "", "--gateway", gateway)
        assert code == 1 and "INVALID_ARGUMENT" in err and "text is empty" in err, err

        images = tmp_path / "images"
        images.mkdir()
        with (tmp_path / "labels.csv").open("w", newline="") as stream:
            writer = csv.writer(stream)
            writer.writerow(["path", "label"])
            for colour in COLOURS:
                for shade in range(3):
                    (images / f"{colour}{shade}.png").write_bytes(colour_image(colour, shade))
                    writer.writerow([f"{colour}{shade}.png", colour])
        code, out, err = await _cli(
            "eval", "--images", str(images), "--labels", str(tmp_path / "labels.csv"), "--k", "5", "--gateway", gateway,
            "--text-template", "{label}", "--text-template", "a photo of something {label}", "--json",
        )
        assert code == 0, err
        report = json.loads(out)
        assert [entry["template"] for entry in report["text"]] == ["{label}", "a photo of something {label}"]
        for entry in report["text"]:
            assert entry["queries"] == 3 and entry["map_at_k"] == 1.0 and entry["precision_at_1"] == 1.0, entry
            assert entry["per_query"]["red"]["text"] in ("red", "a photo of something red")
        code, _out, err = await _cli("eval", "--images", str(images), "--labels", str(tmp_path / "labels.csv"),
                                     "--gateway", gateway, "--text-template", "no placeholder")
        assert code == 2 and "{label}" in err


async def _cli(*args: str) -> tuple[int, str, str]:
    """`vsearch ARGS` in a subprocess, awaited (the stack it talks to runs in this event loop)."""
    process = await asyncio.create_subprocess_exec(
        *VSEARCH, *args, cwd=REPO_ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 120)
    return process.returncode, out.decode(), err.decode()


async def test_web_page_searches_by_words_when_the_model_can(tmp_path, dual_dir, squeezenet_dir):
    """The page shows its words box when stats' text_search is set, searches with the words typed, says
    what matched nothing; with a model that cannot search by words the box stays hidden."""
    from playwright.async_api import async_playwright, expect

    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("chromium not installed (scripts/setup installs Debian's chromium)")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        try:
            async with in_process_stack(tmp_path / "dual", dual_dir) as stack:
                await index_colours(stack)
                page = await browser.new_page()
                await page.goto(f"http://127.0.0.1:{stack.gateway_server.http_port}/")
                await expect(page.locator("#model")).to_contain_text("9 images")
                await expect(page.locator("#wordsBox")).to_be_visible()
                await expect(page.locator("#go")).to_be_disabled()
                await page.fill("#words", "the sky")
                await page.fill("#k", "3")
                await page.click("#go")
                await expect(page.locator(".hit")).to_have_count(3)
                ids = await page.locator(".hit").evaluate_all("cards => cards.map(card => card.dataset.id)")
                assert {hit.split("-")[0] for hit in ids} == {"blue"}
                await expect(page.locator("#status")).to_contain_text("3 hits")
                await page.screenshot(path=str(tmp_path / "words.png"), full_page=True)
                await page.fill("#words", "xylophone")
                await page.click("#go")
                await expect(page.locator(".hit")).to_have_count(0)
                await expect(page.locator("#status")).to_contain_text("No match: the text gives no direction")
                await page.fill("#words", "red\u0007")
                await page.click("#go")
                await expect(page.locator("#status.error")).to_contain_text("INVALID_ARGUMENT: text contains a control character")
            async with in_process_stack(tmp_path / "squeezenet", squeezenet_dir) as stack:
                page = await browser.new_page()
                await page.goto(f"http://127.0.0.1:{stack.gateway_server.http_port}/")
                await expect(page.locator("#model")).to_contain_text("squeezenet1.0-fp16")
                await expect(page.locator("#wordsBox")).to_be_hidden()
        finally:
            await browser.close()


# ---- the embedder ----------------------------------------------------------------------------------


async def test_embedder_refuses_words_with_the_reason_when_its_text_files_do_not_match(tmp_path, dual_dir, ukbench_bytes):
    model_dir = tmp_path / "model"
    shutil.copytree(dual_dir, model_dir)
    (model_dir / "text" / "vocab.txt").write_text("[PAD]\n[UNK]\nred\n")
    async with running_embedder(embedder_settings(model_dir)) as embedder:
        info = await embedder.stub.Info(embedder_pb2.InfoRequest(), timeout=10)
        assert info.text_search == ""
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await embedder.stub.EmbedTexts(embedder_pb2.EmbedTextsRequest(texts=["red"]), timeout=10)
        assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "cannot search by words" in raised.value.details() and "sha256" in raised.value.details()
        # Images are still served.
        reply = await embedder.stub.EmbedImages(embedder_pb2.EmbedImagesRequest(
            images=[embedder_pb2.ImageInput(data=colour_image("red"))]), timeout=10)
        assert reply.results[0].WhichOneof("result") == "embedding"


async def test_classifier_embedder_matches_class_names_and_refuses_unrelated_words(mobilenet_dir):
    card = read_model_card(mobilenet_dir)
    assert card.text is not None and card.text.kind == "classifier"
    classifier = card.text.classifier
    assert classifier.classes == 1000 and 0.2 < classifier.min_similarity < 0.8 and classifier.threshold_rule
    async with running_embedder(embedder_settings(mobilenet_dir)) as embedder:
        info = await embedder.stub.Info(embedder_pb2.InfoRequest(), timeout=10)
        assert info.text_search == "classifier"
        reply = await embedder.stub.EmbedTexts(embedder_pb2.EmbedTextsRequest(
            texts=["a photo of a Dalmatian", "zxqv qwerty", " ", "an espresso machine"]), timeout=30)
        assert reply.model_version == card.version
        dalmatian, gibberish, empty, espresso = reply.results
        assert dalmatian.WhichOneof("result") == "embedding" and dalmatian.understood_as.startswith("Dalmatian")
        vector = np.asarray(dalmatian.embedding.values)
        assert vector.shape == (1280,) and abs(np.linalg.norm(vector) - 1) < 1e-4
        assert gibberish.WhichOneof("result") == "error" and gibberish.error.code == grpc.StatusCode.NOT_FOUND.value[0]
        assert "no class of the model matches 'zxqv qwerty'" in gibberish.error.message
        assert empty.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "empty" in empty.error.message
        assert "espresso" in espresso.understood_as


async def test_a_wordnet_synonym_is_taken_for_its_class_and_a_confusing_one_is_left_out(mobilenet_dir):
    """The sentence encoder alone reads "puma" as "pug" and "rucksack" as "ruffed grouse"; as WordNet's
    names of "cougar" and "backpack" they are understood. "plane", WordNet's for the carpenter's tool, is
    as near "airplane" as a name can be, so it is left out, and "airplane" stays with the aircraft; a
    synonym only a little nearer a text than a class's name does not take it."""
    card = read_model_card(mobilenet_dir)
    classifier = card.text.classifier
    assert classifier.synonym_min_similarity is not None and "synonyms kept" in classifier.threshold_rule
    async with running_embedder(embedder_settings(mobilenet_dir)) as embedder:
        texts = ["puma", "a photo of a mountain lion", "rucksack", "airplane", "wild cat", "the meaning of life"]
        reply = await embedder.stub.EmbedTexts(embedder_pb2.EmbedTextsRequest(texts=texts), timeout=30)
        understood = dict(zip(texts, (result.understood_as for result in reply.results)))
        assert understood["puma"].startswith("cougar") and understood["a photo of a mountain lion"].startswith("cougar")
        assert understood["rucksack"].startswith("backpack")
        assert "aircraft" in understood["airplane"].split(",")[0], understood["airplane"]
        # "cat bear" (the red panda's) is a little nearer "wild cat" than "tiger cat" is, not clearly.
        assert understood["wild cat"].startswith("tiger cat"), understood["wild cat"]
        assert reply.results[5].WhichOneof("result") == "error"  # still no match


def test_a_synonym_counts_for_its_class_only_where_the_text_is_like_it():
    """class_similarities: the best of a class's name and of its synonyms past both gates (at least
    min_similarity, and margin more than any class's name)."""
    texts = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0.8, 0, 0.6, 0]], dtype=np.float32)
    names = np.array([[0.5, 0.0, 0.866, 0.0], [0.0, 0.3, 0.0, 0.954]], dtype=np.float32)  # two classes
    synonyms = ClassSynonyms(["a", "b", "c"], np.array([1, 1, 0]), np.array(
        [[0.9, 0.0, 0.436, 0.0], [0.0, 0.6, 0.0, 0.8], [0.0, 0.75, 0.661, 0.0]], dtype=np.float32), 0.7, 0.1)
    similarity = class_similarities(texts, names, synonyms)
    # Text 0: class 1 takes synonym "a" (0.9); class 0 keeps its name (0.5). Text 1: synonym "c" (0.75)
    # lifts class 0; "b" (0.6) is below the gate, so class 1 keeps its name (0.3). Text 2 is 0.98 like
    # "a", but 0.92 like class 0's own name, less than the margin below: class 1 keeps its name's 0.
    np.testing.assert_allclose(similarity, [[0.5, 0.9], [0.75, 0.3], [0.92, 0.0]], atol=2e-3)
    without_margin = ClassSynonyms(synonyms.names, synonyms.classes, synonyms.embeddings, 0.7, 0.0)
    assert class_similarities(texts, names, without_margin)[2, 1] == pytest.approx(0.982, abs=2e-3)
    np.testing.assert_allclose(class_similarities(texts, names), texts @ names.T)


async def test_classifier_words_find_their_caltech_images_through_the_gateway(tmp_path, mobilenet_dir, shared_dir):
    """MobileNetV2-int8 with its ImageNet classifier turned into a query vector: "pizza" finds the pizzas
    among pizzas, Dalmatians and grand pianos."""
    categories = ["pizza", "dalmatian", "grand_piano"]
    async with in_process_stack(tmp_path, mobilenet_dir) as stack:
        requests = []
        for category in categories:
            for path in sorted((shared_dir / CALTECH / category).glob("*.jpg"))[:6]:
                request = gateway_pb2.AddImageRequest(id=f"{category}/{path.name}", image=path.read_bytes())
                request.metadata.update({"category": category})
                requests.append(request)
        summary = await stack.stub.AddImages(iter(requests), timeout=120)
        assert summary.indexed == len(requests)
        for text, category in [("a photo of a pizza", "pizza"), ("dalmatian", "dalmatian"),
                               ("an image showing a grand piano", "grand_piano")]:
            reply = await text_search(stack, text, k=6)
            found = [hit.id.split("/")[0] for hit in reply.hits]
            assert found.count(category) >= 5, (text, found, reply.understood_as)
            assert reply.understood_as
        nothing = await text_search(stack, "the meaning of life", k=6)
        assert not nothing.hits and nothing.no_good_match and "no class of the model matches" in nothing.no_match_reason
        response = await stack.http.post("/v1/search", json={"text": "income tax return"})
        assert response.status_code == 200 and response.json()["hits"] == [] and response.json()["no_match_reason"]


async def test_a_model_without_text_support_refuses_words_cleanly(tmp_path, squeezenet_dir):
    """SqueezeNet's classifier is not affine on its features (ReLU, then softmax): prepare gives it no
    text section, and a text search is FAILED_PRECONDITION (HTTP 400) naming the model."""
    assert read_model_card(squeezenet_dir).text is None
    async with in_process_stack(tmp_path, squeezenet_dir) as stack:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await text_search(stack, "a photo of a dog")
        assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert raised.value.details() == "model squeezenet1.0-fp16 cannot search by words"
        response = await stack.http.post("/v1/search", json={"text": "a dog"})
        assert response.status_code == 400 and response.json()["error"]["code"] == "FAILED_PRECONDITION"
        assert (await stack.http.get("/v1/stats")).json()["text_search"] == ""


# ---- the offline pieces ------------------------------------------------------------------------------


async def test_add_text_encoder_gives_an_image_tower_its_text_tower_with_a_tokenizer_json(tmp_path, dual_dir, mobilenet_dir):
    """How a real CLIP export plugs in: the image tower prepared alone, then `vsearch model add-text-encoder`
    with the text tower's ONNX and its tokenizer.json (padded to a fixed length, as CLIP's 77)."""
    model_dir = tmp_path / "image-tower"
    model_dir.mkdir()
    shutil.copyfile(dual_dir / "model.onnx", model_dir / "model.onnx")
    full_card = read_model_card(dual_dir)
    image_card = full_card.model_copy(update={"text": None})
    write_model_card(model_dir, image_card)
    tokenizer = write_tokenizer_json(tmp_path / "tokenizer.json")
    encoder = dual_dir / "text" / "encoder.onnx"
    result = run_cli("model", "add-text-encoder", "--model-dir", str(model_dir), "--encoder", str(encoder),
                     "--tokenizer", str(tokenizer), "--output", "token_embeddings", "--pooling", "mean",
                     "--max-length", "16", "--pad-to-max-length")
    assert result.returncode == 0, result.stderr
    card = read_model_card(model_dir)
    assert card.text.kind == "dual_encoder" and card.text.tokenizer.kind == "tokenizer_json"
    assert card.text.tokenizer.pad_to_max_length and card.text.tokenizer.max_length == 16
    assert card.version != image_card.version and card.version in result.stdout
    assert sorted(path.name for path in (model_dir / "text").iterdir()) == ["encoder.onnx", "tokenizer.json"]
    # The same words give the vectors the wordpiece card gives (tokenizer.json lower-cases too).
    attached, original = TextSearcher(model_dir, card), TextSearcher(dual_dir, full_card)
    for words in (["Red"], ["the SKY", "grass"]):
        for mine, theirs in zip(attached(words), original([word.lower() for word in words])):
            np.testing.assert_allclose(mine.vector, theirs.vector, atol=1e-6)
    async with running_embedder(embedder_settings(model_dir)) as embedder:
        info = await embedder.stub.Info(embedder_pb2.InfoRequest(), timeout=10)
        assert info.text_search == "dual_encoder" and info.model_version == card.version

    # Refusals name the problem and change nothing: an output the encoder lacks; vectors of another size
    # than the model's (MobileNetV2's card keeps its classifier text section).
    result = run_cli("model", "add-text-encoder", "--model-dir", str(model_dir), "--encoder", str(encoder),
                     "--tokenizer", str(tokenizer), "--output", "text_embeds")
    assert result.returncode == 1 and "has outputs ['token_embeddings'], not 'text_embeds'" in result.stderr
    assert read_model_card(model_dir) == card
    other = Path(shutil.copytree(mobilenet_dir, tmp_path / "mobilenet"))
    result = run_cli("model", "add-text-encoder", "--model-dir", str(other), "--encoder", str(encoder),
                     "--tokenizer", str(tokenizer), "--output", "token_embeddings", "--pooling", "mean")
    assert result.returncode == 1 and "gives shape [2, 8]; the card says 1280 values" in result.stderr, result.stderr
    assert read_model_card(other) == read_model_card(mobilenet_dir) and not (other / "text.partial").exists()


def _classifier_model(weights: np.ndarray, bias: np.ndarray, squared: bool = False) -> onnx.ModelProto:
    """image [N, 3, 8, 8] -> 1x1 conv + ReLU -> "features" [N, 4, 8, 8] -> average pool -> Gemm -> logits
    (squared, with `squared`: not affine)."""
    conv = np.random.default_rng(1).standard_normal((4, 3, 1, 1)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["image", "conv"], ["conv_out"]),
        helper.make_node("Relu", ["conv_out"], ["features"]),
        helper.make_node("GlobalAveragePool", ["features"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "weights", "bias"], ["scores" if squared else "logits"], transB=1),
    ]
    if squared:
        nodes.append(helper.make_node("Mul", ["scores", "scores"], ["logits"]))
    graph = helper.make_graph(
        nodes, "classifier", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", len(bias)])],
        initializer=[numpy_helper.from_array(conv, "conv"), numpy_helper.from_array(weights, "weights"),
                     numpy_helper.from_array(bias, "bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def test_the_classifier_head_is_measured_as_a_matrix_and_a_non_affine_one_is_refused():
    rng = np.random.default_rng(0)
    weights = rng.standard_normal((5, 4)).astype(np.float32)
    bias = rng.standard_normal(5).astype(np.float32)
    head = measure_linear_head(_classifier_model(weights, bias), "image", 8, "features", 5)
    assert head.logits_name == "logits" and head.residual < 1e-4
    np.testing.assert_allclose(head.weights, weights, atol=1e-3)
    np.testing.assert_allclose(head.bias, bias, atol=1e-3)
    with pytest.raises(TextSearchError, match="not affine"):
        measure_linear_head(_classifier_model(weights, bias, squared=True), "image", 8, "features", 5)
    with pytest.raises(TextSearchError, match="no output of the source model has 1000 values"):
        measure_linear_head(_classifier_model(weights, bias), "image", 8, "features", 1000)


def test_the_threshold_rule_balances_related_and_unrelated_phrases():
    related = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.45])
    unrelated = np.array([0.1, 0.2, 0.3, 0.35, 0.55])
    threshold = choose_min_similarity(related, unrelated)
    # 0.36..0.45 accept every related phrase and refuse 4 of 5 unrelated ones: the lowest is taken.
    assert threshold.value == pytest.approx(0.36)
    assert threshold.accepted_related == 1.0 and threshold.accepted_unrelated == pytest.approx(0.2)
    assert "balanced accuracy" in threshold.rule


def test_class_name_embeddings_are_cached_by_what_they_depend_on(tmp_path, dual_dir):
    """Preparing embeds ~6,000 phrases: a second model with the same class names (and encoder, vocabulary,
    phrasings) reads them from the cache; other names miss it."""
    card = read_model_card(dual_dir)
    encoder = load_text_encoder(dual_dir, card.text)
    names = ["red", "green", "blue"]
    first = cached_name_similarities(encoder, names, "e" * 64, "v" * 64, tmp_path)
    (cached,) = tmp_path.glob("text-names-*.npz")
    np.testing.assert_allclose(first.class_embeddings, encoder(names), atol=1e-6)
    # Mark the cached entry: a hit returns the marked values, a miss computes them again.
    marked = first.class_embeddings[::-1].copy()
    np.savez(cached, class_embeddings=marked, related_best=first.related_best, unrelated_best=first.unrelated_best)
    np.testing.assert_array_equal(cached_name_similarities(encoder, names, "e" * 64, "v" * 64, tmp_path).class_embeddings, marked)
    for other in [(names[:2] + ["tomato"], "e" * 64), (names, "f" * 64)]:
        again = cached_name_similarities(encoder, other[0], other[1], "v" * 64, tmp_path)
        np.testing.assert_allclose(again.class_embeddings, encoder(other[0]), atol=1e-6)
    assert len(list(tmp_path.glob("text-names-*.npz"))) == 3


def test_a_projected_model_maps_text_queries_through_the_same_projection(tmp_path, dual_dir):
    """What `vsearch model pca` does to the image vectors (v' ~ A v), carry_text_search does to the
    queries: q' = (A+)^T q, so q'.(A v) = q.v on A's rows."""
    card = read_model_card(dual_dir)
    rng = np.random.default_rng(3)
    components = np.linalg.qr(rng.standard_normal((8, 5)))[0].T  # A: 5 orthonormal rows
    out_dir = tmp_path / "projected"
    out_dir.mkdir()
    projected_card = card.model_copy(update={"output": card.output.model_copy(update={"dimension": 5})})
    projected_card = carry_text_search(dual_dir, out_dir, projected_card, projection=np.linalg.pinv(components.T))
    write_model_card(out_dir, projected_card)
    assert projected_card.text.dimension == 5 and projected_card.text.projection.source_dimension == 8
    original = TextSearcher(dual_dir, card)(["red"])[0].vector
    mapped = TextSearcher(out_dir, read_model_card(out_dir))(["red"])[0].vector
    expected = components @ original
    np.testing.assert_allclose(mapped, expected / np.linalg.norm(expected), atol=1e-5)
    # Carried without a projection (quantize: same space), the files come along and the card is unchanged.
    same = tmp_path / "same"
    same.mkdir()
    assert carry_text_search(dual_dir, same, card) == card
    assert (same / "text" / "encoder.onnx").read_bytes() == (dual_dir / "text" / "encoder.onnx").read_bytes()
