"""Settings of the search service, read from `SEARCH_*` environment variables (nested settings as
`SEARCH_MILVUS__URI` or `SEARCH_FAISS__DATA_DIR`, dicts as JSON, e.g.
`SEARCH_FILTER_FIELDS='{"category": "string"}'`)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from service_kit.settings import ServiceSettings

FieldType = Literal["string", "float", "int", "bool"]

# Column names the collection uses for itself; a filter field may not take one of them.
RESERVED_COLUMNS = frozenset({"id", "vector", "image_uri", "metadata", "content_sha256", "copy_features", "written_us"})
_FIELD_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,62}$")
COLLECTION_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")
_SERVER_SCHEMES = ("http", "https", "tcp", "grpc", "unix")
FAISS_INDEX_TYPES = ("FLAT", "IVF_FLAT")
# The fewest IVF lists a search probes when nprobe comes from the scan budget (ivf_scan_vectors).
MIN_AUTO_NPROBE = 16


class MilvusSettings(BaseModel):
    model_config = ConfigDict(frozen=True)

    # A path ending in .db runs an embedded Milvus Lite on that file (its folder is created);
    # http://host:port (or https://, tcp://, unix:) talks to a Milvus standalone or cluster server.
    uri: str = ".vsearch/milvus.db"
    token: SecretStr | None = None
    # Deadline of every single Milvus call (and of connecting); nothing is retried inside it.
    timeout_s: float = Field(10.0, gt=0, le=3600)
    # As FaissSettings' feature_index and feature_hash_bits: each replica keeps a collection's
    # descriptor index in memory, built from Milvus when it first uses the collection and following
    # every replica's writes, polling Milvus every `feature_sync_s` (search_svc/milvus_feature_mirror.py).
    # Collections created before rows carried their write time have none. Every replica holds the
    # whole index (about 19 KiB per item with its id and write time), so a collection of more than
    # `feature_index_max_items` gets none while it is that large (logged): 100k items is about 1.8 GiB per
    # replica.
    feature_index: bool = True
    feature_hash_bits: int = Field(16, ge=8, le=30)
    feature_sync_s: float = Field(2.0, gt=0, le=3600)
    feature_index_max_items: int = Field(100_000, ge=0)

    @property
    def is_local(self) -> bool:
        return urlparse(self.uri).scheme.lower() not in _SERVER_SCHEMES

    @property
    def display_uri(self) -> str:
        """The URI without a password, for logs and error messages."""
        parsed = urlparse(self.uri)
        if parsed.password is None:
            return self.uri
        return parsed._replace(netloc=f"{parsed.username}:***@{parsed.hostname}" + (f":{parsed.port}" if parsed.port else "")).geturl()

    @field_validator("uri")
    @classmethod
    def _check_uri(cls, uri: str) -> str:
        if urlparse(uri).scheme.lower() not in _SERVER_SCHEMES and not uri.endswith(".db"):
            raise ValueError("must be a Milvus Lite file path ending in .db or an http(s)://host:port URI")
        return uri



class FaissSettings(BaseModel):
    model_config = ConfigDict(frozen=True)

    # One SQLite file per collection (the source of truth) and, after a clean shutdown, a snapshot of
    # its FAISS index, so a restart need not rebuild it.
    data_dir: Path = Path(".vsearch/faiss")
    # IVF_FLAT searches exactly (a flat index) until a collection holds this many items, then trains
    # its IVF lists on them in the background; it retrains when the collection has grown by
    # `ivf_retrain_growth` since, so the list count follows the catalog size.
    ivf_train_min_items: int = Field(10_000, ge=100)
    ivf_retrain_growth: float = Field(4.0, gt=1.0)
    # Unless search_params set nprobe, an IVF search probes as many lists as hold about this many
    # vectors (at least 16 lists; every list of a small index, which is then exact), so that the
    # share of the catalog it looks at shrinks only as the catalog grows. A fixed 16 lists lost a
    # copy's original from the 30-deep shortlist for 1 % of copies at 9k real image vectors, and for
    # greyscale copies 3.5 % at 137k (docs/search-backends.md, "How many lists a search probes").
    ivf_scan_vectors: int = Field(16_384, ge=1)
    # k-means of the IVF training on a GPU when faiss has one ("auto": when one is present). The
    # index itself stays on the CPU: faiss GPU indexes cannot remove ids or filter by id, which
    # updates, deletes and metadata filters need.
    gpu: Literal["auto", "on", "off"] = "auto"
    # Keep each collection's items' local descriptors (from their stored copy features) in memory, so
    # that a copy search also gets the items sharing the most descriptors with its query
    # (SearchRequest.feature_candidates): about 16 KiB of memory per item with copy features, built
    # when a collection is opened (search_svc/feature_index.py). Off: copy searches verify their
    # similarity shortlist only.
    feature_index: bool = True
    # Descriptors are bucketed by their first this many bits: a lookup reads one bucket per query
    # descriptor, about descriptors / 2^bits entries each (unevenly). 16 suits up to about 100k items;
    # add a bit each time a catalog doubles beyond that.
    feature_hash_bits: int = Field(16, ge=8, le=30)


class SearchSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SEARCH_")

    port: int = 50053
    # "faiss": in-process FAISS over SQLite files, the single-machine default (`vsearch bench ann`
    # at 1M vectors: the only local engine reaching recall@10 >= 0.95 at a usable speed); one
    # replica only, since each holds its own files. "milvus": Milvus Lite file or a Milvus server,
    # for several replicas and a cluster.
    backend: Literal["faiss", "milvus"] = "faiss"
    milvus: MilvusSettings = MilvusSettings()
    faiss: FaissSettings = FaissSettings()
    # The collection requests without a collection name use; created at startup, never dropped.
    collection: str = "vsearch_images"
    # Length of the stored vectors; the service refuses to become ready on a collection of another.
    dimension: int = Field(1280, ge=1, le=32768)
    # FLAT is exact. IVF_FLAT: both backends (on FAISS exact until ivf_train_min_items, then nlist
    # 4 * sqrt(items) unless index_params say, nprobe from faiss.ivf_scan_vectors unless search_params
    # say). HNSW, IVF_SQ8, DISKANN, ...: a Milvus server only. Default: IVF_FLAT on FAISS (what
    # `vsearch bench ann` chose at 1M), FLAT on Milvus.
    index_type: str = ""
    index_params: dict[str, Any] = Field(default_factory=dict)  # e.g. {"nlist": 1024}
    search_params: dict[str, Any] = Field(default_factory=dict)  # e.g. {"nprobe": 32}
    # Metadata keys stored in typed columns that Search filters may use.
    filter_fields: dict[str, FieldType] = Field(default_factory=lambda: {"category": "string", "price": "float"})
    max_k: int = Field(1000, ge=1, le=16384)  # 16384 is Milvus's own top-k limit
    # Field summaries (Stats with_field_summaries: a scan of the filter columns, which the web page asks for on
    # every load) are kept this long while this process sees no write to the collection; other replicas'
    # writes show within it.
    field_summaries_max_age_s: float = Field(60.0, ge=0)
    # Upserts are sent to Milvus in batches of at most this many rows and about this many bytes:
    # Milvus Lite becomes 5-25x slower once one request carries more than ~7 MB (e.g. ~1450 rows
    # of 1280 floats) or more than ~3000 rows.
    max_batch_rows: int = Field(3000, ge=1)
    max_batch_bytes: int = Field(4 * 1024 * 1024, ge=64 * 1024)
    # Threads that may wait on the store (or validate large requests) at once.
    store_workers: int = Field(4, ge=1, le=256)

    # Fixed: vectors are L2-normalised, so inner product is cosine similarity.
    @property
    def metric(self) -> str:
        return "IP"

    @field_validator("collection")
    @classmethod
    def _check_collection(cls, name: str) -> str:
        if not COLLECTION_NAME.match(name):
            raise ValueError("must be letters, digits and underscores, not starting with a digit")
        return name

    @field_validator("index_type")
    @classmethod
    def _normalise_index_type(cls, index_type: str) -> str:
        index_type = index_type.strip().upper()
        if not re.match(r"^[A-Z0-9_]+$", index_type):
            raise ValueError("must be a Milvus index type such as FLAT, IVF_FLAT or HNSW")
        return index_type

    @field_validator("filter_fields")
    @classmethod
    def _check_filter_fields(cls, fields: dict[str, FieldType]) -> dict[str, FieldType]:
        for name in fields:
            if not _FIELD_NAME.match(name):
                raise ValueError(f"field name {name!r} must be a letter then letters, digits or underscores (at most 63)")
            if name in RESERVED_COLUMNS:
                raise ValueError(f"field name {name!r} is reserved")
        return fields

    @model_validator(mode="before")
    @classmethod
    def _default_index_type(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("index_type"):
            data = {**data, "index_type": "IVF_FLAT" if data.get("backend", "faiss") == "faiss" else "FLAT"}
        return data

    @model_validator(mode="after")
    def _check_backend(self) -> "SearchSettings":
        if self.backend == "faiss":
            if self.index_type not in FAISS_INDEX_TYPES:
                raise ValueError(
                    f"SEARCH_INDEX_TYPE {self.index_type} is not offered by the faiss backend: use "
                    f"{' or '.join(FAISS_INDEX_TYPES)}, or SEARCH_BACKEND=milvus"
                )
            for params, key in ((self.index_params, "nlist"), (self.search_params, "nprobe")):
                value = params.get(key)
                if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                    raise ValueError(f"{key} must be a positive integer, got {value!r}")
        return self
