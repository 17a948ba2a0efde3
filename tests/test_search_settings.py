"""search_svc's settings: what `SEARCH_*` variables give, the defaults, what each backend refuses, and
that a bad setting stops `python -m search_svc` with one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from conftest import REPO_ROOT, service_env
from search_svc.settings import FaissSettings, MilvusSettings, SearchSettings


def faiss_settings(data_dir: Path, **overrides: object) -> SearchSettings:
    return SearchSettings(
        backend=overrides.pop("backend", "faiss"), dimension=8, filter_fields={"category": "string", "price": "float"},
        faiss=FaissSettings(data_dir=data_dir), **overrides,
    )


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SEARCH_BACKEND", "milvus")
    monkeypatch.setenv("SEARCH_MILVUS__URI", "http://milvus:19530")
    monkeypatch.setenv("SEARCH_MILVUS__TIMEOUT_S", "2.5")
    monkeypatch.setenv("SEARCH_COLLECTION", "catalog_v2")
    monkeypatch.setenv("SEARCH_MILVUS__TOKEN", "root:Milvus")
    monkeypatch.setenv("SEARCH_FILTER_FIELDS", '{"category": "string", "year": "int"}')
    monkeypatch.setenv("SEARCH_INDEX_TYPE", "hnsw")
    monkeypatch.setenv("SEARCH_INDEX_PARAMS", '{"M": 16, "efConstruction": 200}')
    monkeypatch.setenv("SEARCH_SEARCH_PARAMS", '{"ef": 64}')
    settings = SearchSettings()
    assert settings.port == 50053 and settings.dimension == 1280 and settings.metric == "IP"
    assert settings.milvus.uri == "http://milvus:19530" and not settings.milvus.is_local
    assert settings.milvus.timeout_s == 2.5 and settings.collection == "catalog_v2" and settings.backend == "milvus"
    assert settings.milvus.token is not None and settings.milvus.token.get_secret_value() == "root:Milvus"
    assert "root:Milvus" not in repr(settings)
    assert settings.filter_fields == {"category": "string", "year": "int"}
    assert settings.index_type == "HNSW" and settings.index_params == {"M": 16, "efConstruction": 200}
    assert settings.search_params == {"ef": 64}


def test_settings_defaults():
    settings = SearchSettings()
    assert settings.backend == "faiss" and settings.faiss.data_dir == Path(".vsearch/faiss")
    assert settings.index_type == "IVF_FLAT" and SearchSettings(backend="milvus").index_type == "FLAT"
    assert settings.milvus.uri == ".vsearch/milvus.db" and settings.milvus.is_local
    assert settings.filter_fields == {"category": "string", "price": "float"}
    assert (settings.max_k, settings.max_batch_rows, settings.store_workers) == (1000, 3000, 4)


def test_settings_refuse_what_faiss_does_not_offer(tmp_path: Path):
    with pytest.raises(ValidationError, match="not offered by the faiss backend"):
        faiss_settings(tmp_path, index_type="HNSW")
    with pytest.raises(ValidationError, match="nprobe must be a positive integer"):
        faiss_settings(tmp_path, index_type="IVF_FLAT", search_params={"nprobe": 0})
    assert faiss_settings(tmp_path, index_type="HNSW", backend="milvus").index_type == "HNSW"


def test_display_uri_hides_the_password():
    assert MilvusSettings(uri="https://root:secret@milvus:19530").display_uri == "https://root:***@milvus:19530"
    assert MilvusSettings(uri="http://milvus:19530").display_uri == "http://milvus:19530"


@pytest.mark.parametrize(
    ("name", "value"),
    [("SEARCH_DIMENSION", "zero"), ("SEARCH_FILTER_FIELDS", '{"vector": "string"}'), ("SEARCH_MILVUS__URI", "milvus.sqlite"),
     ("SEARCH_BACKEND", "sqlite"), ("SEARCH_INDEX_TYPE", "HNSW")],
)
def test_invalid_setting_refuses_to_start_with_one_line(name: str, value: str):
    result = subprocess.run(
        [sys.executable, "-m", "search_svc"], cwd=REPO_ROOT, env=service_env("SEARCH_", **{name: value}),
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("search_svc: refusing to start") and name in lines[0]
