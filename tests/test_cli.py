"""The command line as a user runs it: `vsearch up` as real processes, then `index` and `search`."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import httpx
import pytest
import redis

from conftest import children_of, run_cli, vsearch_up
from vsearch_cli.local_stack.ports import free_port


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
    for path in ukbench_images[:8]:
        (folder / path.name).write_bytes(path.read_bytes())
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
