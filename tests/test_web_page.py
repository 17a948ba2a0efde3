"""The web page (gateway/static/index.html) in real Chromium through playwright, over the whole stack in
process (a calibrated MobileNetV2 in the embedder, FAISS, Redis): the query by upload, drop, paste and
camera (and the capture input where getUserMedia is missing); a crop drawn, resized and cleared on the
preview; hits with readable titles, category, price, score bar and match probability; "more like this";
filter chips and a price range built from the stats' field summaries; more results on demand (and the
search run again when the catalog changed between pages); the keyboard alone; a phone-sized viewport;
errors in place; the collection picker."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import shutil
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
from google.protobuf import struct_pb2

from conftest import CHROMIUM_FLAGS, in_process_stack, run_cli
from vsearch.v1 import gateway_pb2

VIEWS = 4
OBJECTS = 10  # ukbench objects 0..9 (four views each), indexed as `vsearch index` would: sha256 ids
TITLED = range(0, 4)  # object 0's views also have a `title`
PATH_IDS = {40: "photos/2024/beach-0.jpg", 41: "photos/2024/beach-1.jpg"}  # no image_uri: the id is a path
# Chromium's stand-in camera (a test pattern) and its permission prompt answered yes.
CAMERA_FLAGS = ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]
HEX64 = re.compile(r"\b[0-9a-f]{64}\b", re.IGNORECASE)
# Crop drawn from and to these fractions of the displayed preview, then its corner dragged further.
DRAWN, RESIZED = (0.25, 0.75), 0.9


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def price_of(position: int) -> float:
    return position + 0.5


@pytest.fixture(scope="module")
def calibrated_dir(caltech_sample, mobilenet_dir, tmp_path_factory) -> Path:
    """The default model calibrated on the Caltech sample, so that hits carry match_probability."""
    out = tmp_path_factory.mktemp("page-calibrated") / "model"
    result = run_cli("model", "calibrate", "--model-dir", str(mobilenet_dir), "--images", str(caltech_sample.root),
                     "--labels", str(caltech_sample.labels_csv), "--split-col", "split", "--fit-split", "train",
                     "--out", str(out), timeout=300)
    assert result.returncode == 0, result.stderr
    return out


def catalog_requests(images: list[Path]):
    for position in range(OBJECTS * VIEWS):
        path = images[position]
        metadata = struct_pb2.Struct()
        # What `vsearch index` stores for a file: its full path and file name among them.
        metadata.update({"category": f"object-{position // VIEWS}", "price": price_of(position), "path": str(path),
                         "filename": path.name, "folder": path.parent.name})
        if position in TITLED:
            metadata.update({"title": f"Titled thing, view {position}"})
        yield gateway_pb2.AddImageRequest(id=sha256(path.read_bytes()), image=path.read_bytes(), metadata=metadata,
                                          image_uri=path.resolve().as_uri())
    for position, item_id in PATH_IDS.items():
        metadata = struct_pb2.Struct()
        metadata.update({"category": "beach"})
        yield gateway_pb2.AddImageRequest(id=item_id, image=images[position].read_bytes(), metadata=metadata)


@pytest.fixture(scope="module")
async def stack(tmp_path_factory, calibrated_dir, ukbench_images):
    async with in_process_stack(
        tmp_path_factory.mktemp("web-page"), calibrated_dir, image_roots=[ukbench_images[0].parent],
    ) as stack:
        summary = await stack.stub.AddImages(catalog_requests(ukbench_images), timeout=120)
        expected = OBJECTS * VIEWS + len(PATH_IDS)
        assert (summary.indexed, summary.failed) == (expected, 0), summary
        yield stack


@pytest.fixture(scope="module")
async def browser():
    from playwright.async_api import async_playwright

    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("chromium not installed (scripts/setup installs Debian's chromium)")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=chromium, args=[*CHROMIUM_FLAGS, *CAMERA_FLAGS])
        try:
            yield browser
        finally:
            await browser.close()


async def open_page(browser, stack, init_script: str | None = None, **context_options):
    """A fresh context (its own storage and permissions) on the page, once the stats are shown."""
    from playwright.async_api import expect

    context = await browser.new_context(locale="en-US", **context_options)
    page = await context.new_page()
    if init_script:
        await page.add_init_script(init_script)
    await page.add_init_script(RECORD_SEARCHES)
    await page.goto(f"http://127.0.0.1:{stack.gateway_server.http_port}/")
    await expect(page.locator("#model")).to_contain_text(f"{await stack.count()} images")
    return page


# Records what the page sends to /v1/search, field by field (files as name, type and sha256), before it
# goes: Chromium does not report multipart bodies holding files to playwright's request events.
RECORD_SEARCHES = """
window.sentSearches = [];
const sendRequest = window.fetch;
window.fetch = async function (resource, options) {
  if (String(resource).includes("/v1/search") && options && options.body instanceof FormData) {
    const fields = {};
    for (const [name, value] of options.body.entries()) {
      if (value instanceof File) {
        const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", await value.arrayBuffer()));
        fields[name] = [value.name, value.type, [...digest].map((b) => b.toString(16).padStart(2, "0")).join("")];
      } else {
        fields[name] = value;
      }
    }
    window.sentSearches.push(fields);
  }
  return sendRequest.call(this, resource, options);
};
"""


async def search_on_page(page, action):
    """Runs `action` (a coroutine function that makes the page search) and returns the fields the page
    sent (files as [name, type, sha256]) and the JSON it got."""
    async with page.expect_response("**/v1/search") as answer:
        await action()
    response = await answer.value
    return await page.evaluate("window.sentSearches.at(-1)"), await response.json()


def file_sent(path: Path, name: str | None = None, content_type: str = "image/jpeg") -> list[str]:
    return [name or path.name, content_type, sha256(path.read_bytes())]


async def shown_ids(page) -> list[str]:
    return await page.locator(".hit").evaluate_all("cards => cards.map(card => card.dataset.id)")


async def api_search(stack, image: bytes, **fields: str) -> dict:
    response = await stack.search_file(image, **fields)
    assert response.status_code == 200, response.text
    return response.json()


def expected_title(hit: dict) -> str:
    if hit["metadata"].get("title"):
        return hit["metadata"]["title"]
    if hit["image_uri"]:
        return Path(unquote(urlparse(hit["image_uri"]).path)).name
    return hit["id"].rsplit("/", 1)[-1]


# ---- the query ------------------------------------------------------------------------------------


async def test_hits_have_readable_titles_category_price_score_and_probability(browser, stack, ukbench_images):
    from playwright.async_api import expect

    page = await open_page(browser, stack)
    await page.set_input_files("#file", str(ukbench_images[0]))
    await page.fill("#k", "8")
    sent, answer = await search_on_page(page, lambda: page.click("#go"))
    assert sent["image"] == file_sent(ukbench_images[0]) and "crop" not in sent
    hits = answer["hits"]
    await expect(page.locator(".hit")).to_have_count(8)
    assert await shown_ids(page) == [hit["id"] for hit in hits]
    assert {hit["id"] for hit in hits[:4]} == {sha256(path.read_bytes()) for path in ukbench_images[:4]}
    cards = page.locator(".hit")
    for n, hit in enumerate(hits):
        card = cards.nth(n)
        await expect(card.locator(".title")).to_have_text(expected_title(hit))
        await expect(card.locator(".category")).to_have_text(hit["metadata"]["category"])
        if "price" in hit["metadata"]:
            assert float(await card.locator(".price").inner_text()) == hit["metadata"]["price"]
        else:
            await expect(card.locator(".price")).to_have_count(0)
        width = await card.locator(".bar span").evaluate("fill => fill.getBoundingClientRect().width")
        full = await card.locator(".bar").evaluate("bar => bar.getBoundingClientRect().width")
        assert width == pytest.approx(full * max(0.0, min(1.0, hit["score"])), abs=1.5), (width, full, hit["score"])
        assert hit["match_probability"] is not None
        await expect(card.locator(".probability")).to_have_text(
            f"match probability {math.floor(hit['match_probability'] * 100 + 0.5)}%")  # as JS rounds
        # The thumbnail is the indexed file, served by the gateway.
        await expect(card.locator(".thumb img")).to_have_js_property("complete", True)
        assert await card.locator(".thumb img").evaluate("img => img.naturalWidth") > 0
    titles = await page.locator(".hit .title").all_inner_texts()
    assert "Titled thing, view 0" in titles and any(re.fullmatch(r"ukbench\d{5}\.jpg", title) for title in titles)
    # Neither a 64-hex id nor a server path anywhere in the results.
    text = await page.locator("#results").inner_text()
    assert not HEX64.search(text), text
    assert str(ukbench_images[0].parent) not in text and "file://" not in text, text

    # An item without an image URI whose id is a path: titled by its file name, no path shown.
    await page.set_input_files("#file", str(ukbench_images[40]))
    _, answer = await search_on_page(page, lambda: page.click("#go"))
    assert answer["hits"][0]["id"] == PATH_IDS[40]
    first = cards.first
    await expect(first.locator(".title")).to_have_text("beach-0.jpg")
    await expect(first.locator(".id")).to_have_count(0)
    await expect(first.locator(".price")).to_have_count(0)
    await expect(first.locator(".thumb")).to_have_text("no preview")
    assert "photos/2024" not in await page.locator("#results").inner_text()


async def test_an_image_dropped_or_pasted_is_the_query(browser, stack, ukbench_images):
    from playwright.async_api import expect

    page = await open_page(browser, stack)
    payload = base64.b64encode(ukbench_images[9].read_bytes()).decode()
    make_transfer = """([data, name]) => {
        const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], name, {type: "image/jpeg"}));
        return transfer;
    }"""
    await page.evaluate(f"""(args) => {{
        const transfer = ({make_transfer})(args);
        document.getElementById("drop").dispatchEvent(
            new DragEvent("drop", {{dataTransfer: transfer, bubbles: true, cancelable: true}}));
    }}""", [payload, "dropped.jpg"])
    await expect(page.locator("#queryName")).to_contain_text("dropped.jpg")
    await expect(page.locator("#previewImage")).to_have_js_property("complete", True)
    sent, answer = await search_on_page(page, lambda: page.click("#go"))
    assert sent["image"] == file_sent(ukbench_images[9], "dropped.jpg")
    group = {sha256(path.read_bytes()) for path in ukbench_images[8:12]}
    assert set((await shown_ids(page))[:4]) == group

    payload = base64.b64encode(ukbench_images[13].read_bytes()).decode()
    await page.evaluate(f"""(args) => {{
        const transfer = ({make_transfer})(args);
        document.dispatchEvent(new ClipboardEvent("paste", {{clipboardData: transfer, bubbles: true, cancelable: true}}));
    }}""", [payload, "pasted.jpg"])
    await expect(page.locator("#queryName")).to_contain_text("pasted.jpg")
    sent, _ = await search_on_page(page, lambda: page.click("#go"))
    assert sent["image"] == file_sent(ukbench_images[13], "pasted.jpg")
    group = {sha256(path.read_bytes()) for path in ukbench_images[12:16]}
    assert set((await shown_ids(page))[:4]) == group


async def test_a_camera_photo_is_the_query(browser, stack):
    from playwright.async_api import expect

    page = await open_page(browser, stack, permissions=["camera"])
    await expect(page.locator("#cameraFallback")).to_be_hidden()
    await page.click("#cameraButton")
    await expect(page.locator("#cameraVideo")).to_be_visible()
    await expect(page.locator("#snap")).to_be_enabled()  # the stream plays
    await page.click("#snap")
    await expect(page.locator("#camera")).to_be_hidden()
    await expect(page.locator("#queryName")).to_contain_text("camera.jpg")
    sent, answer = await search_on_page(page, lambda: page.click("#go"))
    assert sent["image"][:2] == ["camera.jpg", "image/jpeg"]
    await expect(page.locator(".hit")).to_have_count(len(answer["hits"]))
    assert len(answer["hits"]) == 12
    # The camera was released.
    assert await page.evaluate("document.getElementById('cameraVideo').srcObject") is None


async def test_without_get_user_media_the_capture_input_takes_the_photo(browser, stack, ukbench_images):
    from playwright.async_api import expect

    page = await open_page(browser, stack, init_script="delete Navigator.prototype.mediaDevices;")
    assert await page.evaluate("navigator.mediaDevices === undefined")
    await expect(page.locator("#cameraButton")).to_be_hidden()
    capture = page.locator('input[type=file][accept="image/*"][capture]')
    await expect(capture).to_be_visible()
    await expect(page.locator("#cameraFallback")).to_contain_text("Take a photo")
    await capture.set_input_files(str(ukbench_images[20]))
    sent, _ = await search_on_page(page, lambda: page.click("#go"))
    assert sent["image"] == file_sent(ukbench_images[20])
    assert set((await shown_ids(page))[:4]) == {sha256(path.read_bytes()) for path in ukbench_images[20:24]}


async def test_the_crop_is_drawn_resized_and_cleared_on_the_preview(browser, stack, ukbench_images):
    from playwright.async_api import expect

    page = await open_page(browser, stack)
    query = ukbench_images[6]
    await page.set_input_files("#file", str(query))
    preview = page.locator("#previewImage")
    await expect(preview).to_have_js_property("complete", True)
    natural = await preview.evaluate("img => [img.naturalWidth, img.naturalHeight]")
    shown = await preview.bounding_box()
    # The image fills the preview's width (object-fit contain, anchored top left).
    scale = shown["width"] / natural[0]

    def at(fx: float, fy: float) -> tuple[float, float]:
        return shown["x"] + fx * natural[0] * scale, shown["y"] + fy * natural[1] * scale

    await expect(page.locator("#cropBox")).to_be_hidden()
    await page.mouse.move(*at(DRAWN[0], DRAWN[0]))
    await page.mouse.down()
    await page.mouse.move(*at(DRAWN[1], DRAWN[1]), steps=5)
    await page.mouse.up()
    await expect(page.locator("#cropBox")).to_be_visible()
    await expect(page.locator("#clearCrop")).to_be_visible()
    drawn = await page.locator("#cropBox").bounding_box()
    assert drawn["width"] == pytest.approx(0.5 * natural[0] * scale, abs=3)

    handle = await page.locator('#cropBox .handle[data-corner="se"]').bounding_box()
    await page.mouse.move(handle["x"] + handle["width"] / 2, handle["y"] + handle["height"] / 2)
    await page.mouse.down()
    await page.mouse.move(*at(RESIZED, RESIZED), steps=5)
    await page.mouse.up()
    resized = await page.locator("#cropBox").bounding_box()
    assert resized["width"] > drawn["width"] + 20 and resized["height"] > drawn["height"] + 20

    sent, answer = await search_on_page(page, lambda: page.click("#go"))
    x, y, width, height = (int(part) for part in sent["crop"].split(","))
    tolerance = 2 / scale + 1  # a displayed pixel or two
    assert x == pytest.approx(DRAWN[0] * natural[0], abs=tolerance)
    assert y == pytest.approx(DRAWN[0] * natural[1], abs=tolerance)
    assert x + width == pytest.approx(RESIZED * natural[0], abs=tolerance)
    assert y + height == pytest.approx(RESIZED * natural[1], abs=tolerance)
    await expect(page.locator("#cropText")).to_have_text(f"Crop {width} × {height} at {x}, {y}")
    # What the page shows is the cropped search's answer, not the whole image's.
    cropped = await api_search(stack, query.read_bytes(), crop=sent["crop"], k="12")
    whole = await api_search(stack, query.read_bytes(), k="12")
    assert [hit["id"] for hit in answer["hits"]] == [hit["id"] for hit in cropped["hits"]]
    assert [hit["score"] for hit in cropped["hits"]] != [hit["score"] for hit in whole["hits"]]
    assert await shown_ids(page) == [hit["id"] for hit in cropped["hits"]]

    await page.click("#clearCrop")  # one click
    await expect(page.locator("#cropBox")).to_be_hidden()
    await expect(page.locator("#cropText")).to_have_text("")
    sent, _ = await search_on_page(page, lambda: page.click("#go"))
    assert "crop" not in sent
    assert await shown_ids(page) == [hit["id"] for hit in whole["hits"]]


# ---- results --------------------------------------------------------------------------------------


async def test_more_like_this_searches_by_the_items_id(browser, stack, ukbench_images):
    from playwright.async_api import expect

    page = await open_page(browser, stack)
    await page.set_input_files("#file", str(ukbench_images[16]))
    await search_on_page(page, lambda: page.click("#go"))
    card = page.locator(".hit").nth(5)
    item = await card.get_attribute("data-id")
    title = await card.locator(".title").inner_text()
    sent, answer = await search_on_page(page, lambda: card.locator(".more-like-this").click())
    assert sent["item_id"] == item and "image" not in sent
    expected = await stack.http.post("/v1/search", data={"item_id": item, "k": "12"})
    assert await shown_ids(page) == [hit["id"] for hit in expected.json()["hits"]]
    assert (await shown_ids(page))[0] == item  # the item itself is its nearest neighbour
    await expect(page.locator("#queryName")).to_have_text(f"Like {title}")
    # The search button now searches like the item, until another image is chosen.
    sent, _ = await search_on_page(page, lambda: page.click("#go"))
    assert sent["item_id"] == item


async def test_category_chips_and_a_price_range_narrow_the_hits(browser, stack, ukbench_images):
    from playwright.async_api import expect

    page = await open_page(browser, stack)
    chips = page.locator('.filter[data-field="category"] .chip')
    await expect(chips).to_have_count(OBJECTS + 1)  # object-0..9 and beach
    await expect(page.locator('.filter[data-field="category"] .chip[data-value="object-3"] .count')).to_have_text("4")
    await expect(page.locator("#plainFilter")).to_be_hidden()
    await page.set_input_files("#file", str(ukbench_images[8]))
    await search_on_page(page, lambda: page.click("#go"))
    await expect(page.locator(".hit")).to_have_count(12)

    chosen = {"object-2", "object-5"}
    for value in sorted(chosen):
        chip = page.locator(f'.chip[data-value="{value}"]')
        sent, _ = await search_on_page(page, lambda chip=chip: chip.click())  # a filter change searches again
        await expect(chip).to_have_attribute("aria-pressed", "true")
    assert json.loads(sent["filter"]) == [{"field": "category", "op": "in", "value": sorted(chosen)}]
    await expect(page.locator(".hit")).to_have_count(2 * VIEWS)
    assert set(await page.locator(".hit .category").all_inner_texts()) == chosen

    price = page.locator('.filter[data-field="price"]')
    for end, value in (("min", "10"), ("max", "20")):
        await price.locator(f".range-{end}").fill(value)
        sent, _ = await search_on_page(page, lambda end=end: price.locator(f".range-{end}").press("Tab"))
    assert json.loads(sent["filter"])[1:] == [{"field": "price", "op": ">=", "value": 10},
                                              {"field": "price", "op": "<=", "value": 20}]
    # Object 2's views 10 and 11 (prices 10.5, 11.5): object 5's are above 20.
    await expect(page.locator(".hit")).to_have_count(2)
    assert {float(text) for text in await page.locator(".hit .price").all_inner_texts()} == {price_of(10), price_of(11)}
    assert set(await page.locator(".hit .category").all_inner_texts()) == {"object-2"}

    await page.locator('.chip[data-value="object-2"]').click()  # unpressed again: object 5 only, none in range
    await expect(page.locator(".hit")).to_have_count(0)
    await expect(page.locator("#noGoodMatch")).to_contain_text("No good match")


async def test_more_results_append_distinct_hits_and_restart_when_the_catalog_changed(browser, stack, ukbench_images):
    from playwright.async_api import expect

    page = await open_page(browser, stack)
    await page.set_input_files("#file", str(ukbench_images[24]))
    await page.fill("#k", "5")
    _, first = await search_on_page(page, lambda: page.click("#go"))
    await expect(page.locator(".hit")).to_have_count(5)
    assert first["next_page_token"]
    await expect(page.locator("#more")).to_be_visible()
    sent, second = await search_on_page(page, lambda: page.click("#more"))
    assert sent["page_token"] == first["next_page_token"] and sent["k"] == "5"
    await expect(page.locator(".hit")).to_have_count(10)
    ids = await shown_ids(page)
    assert len(set(ids)) == 10 and ids[:5] == [hit["id"] for hit in first["hits"]]
    top10 = await api_search(stack, ukbench_images[24].read_bytes(), k="10")
    assert ids == [hit["id"] for hit in top10["hits"]]
    await expect(page.locator("#status")).to_contain_text("10 hits shown")

    # A write between pages: the next page's token is stale, so the page searches again from the first.
    extra = struct_pb2.Struct()
    extra.update({"category": "beach"})
    summary = await stack.stub.AddImages(iter([gateway_pb2.AddImageRequest(
        id="page-test-extra", image=ukbench_images[50].read_bytes(), metadata=extra)]), timeout=60)
    assert summary.indexed == 1
    try:
        async with page.expect_response(lambda r: "/v1/search" in r.url and r.status >= 400) as refused:
            async with page.expect_response(lambda r: "/v1/search" in r.url and r.ok) as again:
                await page.click("#more")
        assert (await (await refused.value).json())["error"]["code"] == "FAILED_PRECONDITION"
        assert "page_token" not in await page.evaluate("window.sentSearches.at(-1)")
        await expect(page.locator(".hit")).to_have_count(5)
        await expect(page.locator("#status")).to_contain_text("catalog changed")
        await expect(page.locator("#status")).not_to_have_class("error")
    finally:
        await stack.http.delete("/v1/images/page-test-extra")


# ---- keyboard, phone, errors -----------------------------------------------------------------------


async def tab_to(page, selector: str, limit: int = 80) -> None:
    """Presses Tab until the focus is on `selector`: it is reachable by keyboard."""
    for _ in range(limit):
        await page.keyboard.press("Tab")
        if await page.evaluate("(selector) => document.activeElement.matches(selector)", selector):
            return
    pytest.fail(f"{selector} not reached with Tab")


async def test_everything_works_from_the_keyboard(browser, stack, ukbench_images):
    from playwright.async_api import expect

    page = await open_page(browser, stack)
    # Listening early turns Chromium's file chooser interception on before the key is pressed.
    page.on("filechooser", lambda _chooser: None)
    await tab_to(page, "#choose")
    async with page.expect_file_chooser() as chooser:
        await page.keyboard.press("Enter")
    await (await chooser.value).set_files(str(ukbench_images[28]))
    await expect(page.locator("#queryName")).to_contain_text(ukbench_images[28].name)

    # A crop without a pointer: a box, moved with the arrow keys, then cleared.
    await tab_to(page, "#cropStart")
    await page.keyboard.press("Enter")
    await expect(page.locator("#cropBox")).to_be_focused()
    before = await page.locator("#cropText").inner_text()
    await page.keyboard.press("ArrowRight")
    await page.keyboard.press("Shift+ArrowDown")
    assert await page.locator("#cropText").inner_text() != before
    await page.keyboard.press("Delete")
    await expect(page.locator("#cropBox")).to_be_hidden()

    await tab_to(page, "#k")
    await page.keyboard.press("Control+A")
    await page.keyboard.type("6")
    sent, _ = await search_on_page(page, lambda: page.keyboard.press("Enter"))  # Enter searches
    assert sent["k"] == "6" and sent["image"] == file_sent(ukbench_images[28])
    await expect(page.locator(".hit")).to_have_count(6)

    await tab_to(page, '.chip[data-value="object-7"]')
    sent, _ = await search_on_page(page, lambda: page.keyboard.press("Space"))
    assert json.loads(sent["filter"]) == [{"field": "category", "op": "==", "value": "object-7"}]
    await expect(page.locator(".hit")).to_have_count(VIEWS)

    await tab_to(page, ".hit .more-like-this")
    item = await page.evaluate("document.activeElement.closest('.hit').dataset.id")
    sent, _ = await search_on_page(page, lambda: page.keyboard.press("Enter"))
    assert sent["item_id"] == item


async def test_on_a_phone_the_page_fits_and_searches(browser, stack, ukbench_images):
    from playwright.async_api import expect

    page = await open_page(browser, stack, viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True,
                           device_scale_factor=2)
    fits = "document.documentElement.scrollWidth <= window.innerWidth"
    assert await page.evaluate(fits)
    await page.set_input_files("#file", str(ukbench_images[32]))
    await page.fill("#k", "6")
    await search_on_page(page, lambda: page.click("#go"))
    await expect(page.locator(".hit")).to_have_count(6)
    assert set((await shown_ids(page))[:4]) == {sha256(path.read_bytes()) for path in ukbench_images[32:36]}
    assert await page.evaluate(fits), await page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
    # Two cards a row, each inside the viewport.
    boxes = [await page.locator(".hit").nth(n).bounding_box() for n in range(2)]
    assert boxes[0]["y"] == boxes[1]["y"] and boxes[1]["x"] + boxes[1]["width"] <= 390


async def test_errors_are_shown_in_place(browser, stack, tmp_path):
    from playwright.async_api import expect

    page = await open_page(browser, stack)
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image at all")
    await page.set_input_files("#file", str(notes))
    await expect(page.locator("#noPreview")).to_be_visible()
    await search_on_page(page, lambda: page.click("#go"))
    expected = (await stack.search_file(notes.read_bytes())).json()["error"]
    alert = page.locator("#form [role=alert]")
    await expect(alert).to_have_text(f"{expected['code']}: {expected['message']}")
    assert expected["code"] == "INVALID_ARGUMENT"
    await expect(page.locator(".hit")).to_have_count(0)


# ---- collections ------------------------------------------------------------------------------------


async def test_the_collection_picker_searches_the_chosen_collection(browser, stack, ukbench_images):
    from playwright.async_api import expect

    other = "page_other"
    summary = await stack.stub.AddImages(iter([gateway_pb2.AddImageRequest(
        id="other-item", image=ukbench_images[44].read_bytes(), collection=other)]), timeout=60)
    assert summary.indexed == 1
    page = await open_page(browser, stack)
    await expect(page.locator("#collectionBox")).to_be_visible()
    await page.select_option("#collection", other)
    await expect(page.locator("#model")).to_contain_text("1 images")
    await page.set_input_files("#file", str(ukbench_images[45]))
    sent, _ = await search_on_page(page, lambda: page.click("#go"))
    assert sent["collection"] == other
    assert await shown_ids(page) == ["other-item"]
