"""The command line as a user runs it: `vsearch up` as real processes, then `index`, `search` (by image,
item id, pages), `stats`, `collections`, the gateway's errors, and every command's `--json`."""

from __future__ import annotations

import json
import os
import pty
import re
import signal
import subprocess
from pathlib import Path

import httpx
import pytest
import redis
from PIL import Image

from conftest import REPO_ROOT, VSEARCH, children_of, run_cli, vsearch_up
from dual_encoder import build_dual_encoder, write_tokenizer_json
from embedder_svc.model_card import read_model_card, write_model_card
from vsearch_cli.local_stack.ports import free_port

MODEL = "mobilenetv2-12-int8"


@pytest.fixture(scope="module")
def running_stack(tmp_path_factory, ukbench_images):
    # Ports of our choosing, so that the banner is checked against them.
    with vsearch_up(tmp_path_factory.mktemp("up"), "--image-root", str(ukbench_images[0].parent),
                    ports=(free_port(), free_port())) as stack:
        yield stack


def test_up_prints_addresses_and_uses_redis(running_stack):
    banner = running_stack.banner
    assert running_stack.gateway in banner
    assert f"http://127.0.0.1:{running_stack.http_port}" in banner
    assert "redis://127.0.0.1:" in banner


def test_up_caps_its_redis_memory_with_lru_eviction(running_stack):
    # Without a cap the cache grows with every unique query for the embedding TTL (a day).
    port = re.search(r"redis://127\.0\.0\.1:(\d+)/0", running_stack.banner).group(1)
    client = redis.Redis(port=int(port), socket_timeout=5)
    assert client.config_get("maxmemory") == {"maxmemory": str(256 * 1024 * 1024)}
    assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "allkeys-lru"}
    assert "(maxmemory 256mb, allkeys-lru)" in running_stack.banner


def test_up_refuses_a_redis_memory_size_redis_would_not_read():
    result = run_cli("up", "--redis-maxmemory", "lots", timeout=30)
    assert result.returncode == 2
    assert "--redis-maxmemory" in result.stderr and "256mb" in result.stderr


def test_up_with_one_replica_keeps_its_one_gateway_banner(running_stack):
    """The banner `vsearch up` always printed, unchanged without --replicas (scripts read it)."""
    assert re.fullmatch(
        r"vsearch up: gateway grpc 127\.0\.0\.1:\d+ http http://127\.0\.0\.1:\d+ \| embedder 127\.0\.0\.1:\d+ "
        r"\| search 127\.0\.0\.1:\d+ \| cache redis://\S+ \(maxmemory 256mb, allkeys-lru\) \| data \S+ \| Ctrl-C stops\n",
        running_stack.banner,
    ), running_stack.banner
    assert running_stack.gateways == [(running_stack.gateway, f"http://127.0.0.1:{running_stack.http_port}")]
    assert running_stack.searches == [running_stack.search]


def test_up_refuses_fewer_than_one_replica():
    result = run_cli("up", "--replicas", "0", timeout=30)
    assert result.returncode == 2 and "--replicas" in result.stderr


def test_up_lets_the_gateway_serve_images_from_its_image_roots(running_stack, ukbench_images, tmp_path):
    base = f"http://127.0.0.1:{running_stack.http_port}/v1/files"
    inside = httpx.get(base, params={"uri": ukbench_images[0].resolve().as_uri()}, timeout=10)
    assert inside.status_code == 200 and inside.content == ukbench_images[0].read_bytes()
    copy = tmp_path / "copy.jpg"
    copy.write_bytes(ukbench_images[0].read_bytes())
    assert httpx.get(base, params={"uri": copy.as_uri()}, timeout=10).status_code == 404


def test_index_reports_and_skips_bad_files(running_stack, ukbench_images, tmp_path):
    folder = tmp_path / "catalog" / "nested"
    folder.mkdir(parents=True)
    for path in ukbench_images[:7]:
        (folder / path.name).write_bytes(path.read_bytes())
    Image.open(ukbench_images[7]).save(folder / "ukbench00007.avif", quality=90)  # AVIF is taken too
    (folder / "broken.jpg").write_bytes(ukbench_images[8].read_bytes()[:2000])
    (folder / "notes.txt").write_text("not an image")
    result = run_cli("index", str(tmp_path / "catalog"), "--gateway", running_stack.gateway, "--json",
                     "--errors", str(tmp_path / "errors.jsonl"))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert {"indexed", "skipped", "failed", "failures"} <= set(summary)
    assert (summary["indexed"], summary["skipped"], summary["failed"]) == (8, 1, 1)
    assert summary["failures"][0]["path"].endswith("broken.jpg")
    assert summary["failures"][0]["code"] == "INVALID_ARGUMENT"
    errors = [json.loads(line) for line in (tmp_path / "errors.jsonl").read_text().splitlines()]
    assert [error["path"] for error in errors] == [summary["failures"][0]["path"]]


def test_search_finds_the_same_object(running_stack, ukbench_images):
    result = run_cli("search", str(ukbench_images[1]), "-k", "4", "--gateway", running_stack.gateway, "--json")
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    paths = [hit["metadata"]["filename"] for hit in reply["hits"]]
    # ukbench00000..00003 are four views of one object; the query is one of them.
    assert {"ukbench00000.jpg", "ukbench00001.jpg", "ukbench00002.jpg", "ukbench00003.jpg"} == set(paths)


def test_search_with_a_bad_filter_fails_clearly(running_stack, ukbench_images):
    result = run_cli("search", str(ukbench_images[1]), "--where", "colour", "==", "red",
                     "--gateway", running_stack.gateway)
    assert result.returncode == 1
    assert "INVALID_ARGUMENT" in result.stderr and "colour" in result.stderr


def json_of(result: subprocess.CompletedProcess) -> dict:
    """The one JSON object a `--json` command printed (and nothing else on stdout)."""
    assert result.returncode == 0, result.stderr
    [line] = result.stdout.splitlines()
    return json.loads(line)


def index_folder(running_stack, ukbench_images: list[Path], folder: Path, collection: str, count: int) -> None:
    """`count` ukbench images under `folder` (category = the folder's name), indexed into `collection`."""
    folder.mkdir(parents=True)
    for path in ukbench_images[:count]:
        (folder / path.name).write_bytes(path.read_bytes())
    summary = json_of(run_cli("index", str(folder), "--collection", collection, "--category-from-folder",
                              "--gateway", running_stack.gateway, "--json"))
    assert summary["indexed"] + summary["unchanged"] == count, summary


def test_search_by_item_id_a_page_at_a_time(running_stack, ukbench_images, tmp_path):
    gateway = running_stack.gateway
    index_folder(running_stack, ukbench_images, tmp_path / "pages", "cli_pages", 8)
    whole = json_of(run_cli("search", str(ukbench_images[0]), "-k", "8", "--collection", "cli_pages",
                            "--gateway", gateway, "--json"))
    ranked = [hit["id"] for hit in whole["hits"]]
    assert len(ranked) == 8 and whole["hits"][0]["metadata"]["category"] == "pages"

    first = json_of(run_cli("search", "--item-id", ranked[0], "-k", "3", "--collection", "cli_pages",
                            "--gateway", gateway, "--json"))
    assert [hit["id"] for hit in first["hits"]] == ranked[:3] and first["next_page_token"]
    second = json_of(run_cli("search", "--item-id", ranked[0], "-k", "3", "--page-token", first["next_page_token"],
                             "--collection", "cli_pages", "--gateway", gateway, "--json"))
    assert [hit["id"] for hit in second["hits"]] == ranked[3:6]
    text = run_cli("search", "--item-id", ranked[0], "-k", "3", "--collection", "cli_pages", "--gateway", gateway)
    assert text.returncode == 0, text.stderr
    assert text.stdout.splitlines()[-1] == f"next page: --page-token {first['next_page_token']}"
    # Whole ids, so that one can be copied from the text into --item-id.
    assert all(f"  {item_id}  " in text.stdout for item_id in ranked[:3])

    # Exactly one query: usage errors (exit 2) that say what is wrong.
    neither = run_cli("search", "--collection", "cli_pages", "--gateway", gateway)
    assert neither.returncode == 2 and "give IMAGE, --item-id ID or --text WORDS" in neither.stderr
    both = run_cli("search", str(ukbench_images[0]), "--item-id", ranked[0], "--gateway", gateway)
    assert both.returncode == 2 and "not both: got IMAGE and --item-id" in both.stderr
    crop = run_cli("search", "--item-id", ranked[0], "--crop", "0,0,10,10", "--gateway", gateway)
    assert crop.returncode == 2 and "--crop applies only to an image" in crop.stderr


def test_stats_with_field_summaries(running_stack, ukbench_images, tmp_path):
    gateway = running_stack.gateway
    index_folder(running_stack, ukbench_images, tmp_path / "shelf", "cli_stats", 6)
    stats = json_of(run_cli("stats", "--collection", "cli_stats", "--gateway", gateway, "--json"))
    assert (stats["collection"], stats["count"], stats["dimension"]) == ("cli_stats", 6, 1280)
    assert stats["filterable_fields"] == ["category", "price"] and stats["field_summaries"] == []
    fields = json_of(run_cli("stats", "--collection", "cli_stats", "--fields", "--gateway", gateway, "--json"))
    by_name = {summary["name"]: summary for summary in fields["field_summaries"]}
    assert by_name["category"]["top_values"] == [{"value": "shelf", "count": 6}]
    assert by_name["price"]["present"] == 0 and by_name["price"]["min"] is None
    text = run_cli("stats", "--collection", "cli_stats", "--fields", "--gateway", gateway)
    assert text.returncode == 0, text.stderr
    assert text.stdout.startswith("collection cli_stats: 6 items")
    assert "  category (string): 6 items; shelf 6" in text.stdout.splitlines()


def drop_on_a_terminal(gateway: str, collection: str, answer: bytes) -> tuple[int, str, str]:
    """`vsearch collections drop` with a terminal as stdin, answering its question with `answer`."""
    controller, terminal = pty.openpty()
    try:
        process = subprocess.Popen([*VSEARCH, "collections", "drop", collection, "--gateway", gateway], stdin=terminal,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT)
        os.write(controller, answer)
        out, err = process.communicate(timeout=60)
    finally:
        os.close(terminal)
        os.close(controller)
    return process.returncode, out, err


def listed_collections(gateway: str) -> dict[str, dict]:
    return {entry["name"]: entry for entry in json_of(run_cli("collections", "list", "--gateway", gateway, "--json"))
            ["collections"]}


def test_collections_list_and_drop_asks_first(running_stack, ukbench_images, tmp_path):
    gateway = running_stack.gateway
    index_folder(running_stack, ukbench_images, tmp_path / "doomed", "cli_drop", 2)
    listed = listed_collections(gateway)
    assert listed["cli_drop"] == {"name": "cli_drop", "count": 2, "is_default": False, "regions": False}
    assert [entry["name"] for entry in listed.values() if entry["is_default"]]
    text = run_cli("collections", "list", "--gateway", gateway)
    assert re.search(r"^cli_drop +2 *$", text.stdout, re.MULTILINE), text.stdout

    # Not a terminal and no --yes: refused, nothing dropped.
    refused = subprocess.run([*VSEARCH, "collections", "drop", "cli_drop", "--gateway", gateway],
                             stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert refused.returncode == 2 and "without --yes" in refused.stderr
    code, _out, err = drop_on_a_terminal(gateway, "cli_drop", b"n\n")
    assert code == 1 and "Drop collection 'cli_drop' and its 2 items?" in err and "not dropped" in err
    assert "cli_drop" in listed_collections(gateway)
    code, out, err = drop_on_a_terminal(gateway, "cli_drop", b"y\n")
    assert code == 0 and out.strip() == "dropped collection cli_drop", err
    assert "cli_drop" not in listed_collections(gateway)
    again = json_of(run_cli("collections", "drop", "cli_drop", "--yes", "--gateway", gateway, "--json"))
    assert (again["collection"], again["dropped"]) == ("cli_drop", False)


def test_gateway_errors_are_one_line_naming_the_status(running_stack, tmp_path):
    missing = run_cli("stats", "--collection", "no_such_collection", "--gateway", running_stack.gateway, "--json")
    assert missing.returncode == 1 and missing.stdout == ""
    [line] = missing.stderr.splitlines()
    assert line.startswith(f"vsearch stats: gateway {running_stack.gateway}: NOT_FOUND: ") and "no_such_collection" in line
    nowhere = f"127.0.0.1:{free_port()}"
    for command in (["stats"], ["collections", "list"], ["search", "--item-id", "x"], ["delete", "x"]):
        result = run_cli(*command, "--gateway", nowhere, "--json", timeout=60)
        assert result.returncode == 1 and result.stdout == "", result
        [line] = result.stderr.splitlines()
        assert line.startswith(f"vsearch {' '.join(command[:2] if command[0] == 'collections' else command[:1])}: "
                               f"gateway {nowhere}: UNAVAILABLE: "), line


def test_up_json_prints_every_address_once(running_stack, tmp_path):
    model_dir = running_stack.data_dir / "models" / MODEL
    process = subprocess.Popen(
        [*VSEARCH, "up", "--json", "--data-dir", str(tmp_path), "--model-dir", str(model_dir), "--no-redis",
         "--grpc-port", "0", "--http-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    try:
        addresses = json.loads(process.stdout.readline())
        [gateway] = addresses["gateways"]
        assert set(addresses) == {"gateways", "embedder", "triton", "search", "milvus", "redis", "cache", "data_dir"}
        assert (addresses["redis"], addresses["milvus"], addresses["triton"]) == (None, None, None)
        assert addresses["data_dir"] == str(tmp_path.resolve()) and len(addresses["search"]) == 1
        stats = json_of(run_cli("stats", "--gateway", gateway["grpc"], "--json"))
        assert stats["count"] == 0
        assert httpx.get(f"{gateway['http']}/healthz", timeout=10).status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
    assert process.returncode == 0 and out == "" and "vsearch up: stopped" in err


def test_keys_json(tmp_path):
    keys_file = str(tmp_path / "keys.jsonl")
    made = json_of(run_cli("keys", "create", "shop", "--scopes", "search,write", "--keys-file", keys_file, "--json"))
    assert made["key"].startswith("vs_") and made["scopes"] == ["search", "write"] and "hash" not in made
    listed = json_of(run_cli("keys", "list", "--keys-file", keys_file, "--json"))
    assert listed["keys"] == [{name: made[name] for name in ("name", "key_id", "scopes", "created")}]
    assert made["key"] not in json.dumps(listed)
    revoked = json_of(run_cli("keys", "revoke", made["key_id"], "--keys-file", keys_file, "--json"))
    assert [entry["name"] for entry in revoked["revoked"]] == ["shop"]
    assert json_of(run_cli("keys", "list", "--keys-file", keys_file, "--json"))["keys"] == []


def test_model_commands_json(running_stack, tmp_path):
    prepared = json_of(run_cli("model", "prepare", "--preset", MODEL, "--out", str(tmp_path / "prepared"), "--json"))
    card = read_model_card(tmp_path / "prepared")
    assert (prepared["name"], prepared["version"], prepared["dimension"]) == (MODEL, card.version, 1280)

    repository = json_of(run_cli("model", "triton-repo", "--model-dir", str(tmp_path / "prepared"), "--out",
                                 str(tmp_path / "triton"), "--flavour", "cpu", "--json"))
    assert repository["model_name"] == MODEL and Path(repository["config"]).is_file()
    assert (repository["flavour"], repository["tensorrt_precision"]) == ("cpu", None)

    # A dual encoder's image tower alone, then its text tower added (as tests/test_text_search.py does).
    dual = tmp_path / "dual"
    build_dual_encoder(dual)
    tower = tmp_path / "tower"
    tower.mkdir()
    (tower / "model.onnx").write_bytes((dual / "model.onnx").read_bytes())
    write_model_card(tower, read_model_card(dual).model_copy(update={"text": None}))
    added = json_of(run_cli(
        "model", "add-text-encoder", "--model-dir", str(tower), "--encoder", str(dual / "text" / "encoder.onnx"),
        "--tokenizer", str(write_tokenizer_json(tmp_path / "tokenizer.json")), "--output", "token_embeddings",
        "--pooling", "mean", "--json"))
    assert (added["tokenizer"], added["dimension"], added["version"]) == (
        "tokenizer_json", 8, read_model_card(tower).version)


def test_sigterm_stops_every_process(running_stack):
    process = running_stack.process
    children = list(children_of(process.pid))
    assert len(children) == 4  # redis, embedder, search, gateway
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0
    assert "vsearch up: stopped" in output
    for pid in children:
        assert not Path(f"/proc/{pid}").exists(), f"child {pid} outlived vsearch up"
