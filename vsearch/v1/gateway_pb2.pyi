from google.protobuf import struct_pb2 as _struct_pb2
from vsearch.v1 import embedder_pb2 as _embedder_pb2
from vsearch.v1 import search_pb2 as _search_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SearchMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SEARCH_MODE_UNSPECIFIED: _ClassVar[SearchMode]
    SEARCH_MODE_SIMILAR: _ClassVar[SearchMode]
    SEARCH_MODE_COPY: _ClassVar[SearchMode]

class OnCopy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ON_COPY_UNSPECIFIED: _ClassVar[OnCopy]
    ON_COPY_KEEP: _ClassVar[OnCopy]
    ON_COPY_FLAG: _ClassVar[OnCopy]
    ON_COPY_SKIP: _ClassVar[OnCopy]
SEARCH_MODE_UNSPECIFIED: SearchMode
SEARCH_MODE_SIMILAR: SearchMode
SEARCH_MODE_COPY: SearchMode
ON_COPY_UNSPECIFIED: OnCopy
ON_COPY_KEEP: OnCopy
ON_COPY_FLAG: OnCopy
ON_COPY_SKIP: OnCopy

class VisualSearchRequest(_message.Message):
    __slots__ = ("image", "item_id", "text", "crop", "k", "filter", "min_score", "collection", "min_probability", "mode", "page_token")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CROP_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    MIN_SCORE_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    MIN_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    item_id: str
    text: str
    crop: _embedder_pb2.CropBox
    k: int
    filter: _search_pb2.Filter
    min_score: float
    collection: str
    min_probability: float
    mode: SearchMode
    page_token: str
    def __init__(self, image: _Optional[bytes] = ..., item_id: _Optional[str] = ..., text: _Optional[str] = ..., crop: _Optional[_Union[_embedder_pb2.CropBox, _Mapping]] = ..., k: _Optional[int] = ..., filter: _Optional[_Union[_search_pb2.Filter, _Mapping]] = ..., min_score: _Optional[float] = ..., collection: _Optional[str] = ..., min_probability: _Optional[float] = ..., mode: _Optional[_Union[SearchMode, str]] = ..., page_token: _Optional[str] = ...) -> None: ...

class SearchHit(_message.Message):
    __slots__ = ("id", "score", "image_uri", "metadata", "match_probability", "is_copy", "copy_score", "matched_box", "matched_region")
    ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_URI_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    MATCH_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    IS_COPY_FIELD_NUMBER: _ClassVar[int]
    COPY_SCORE_FIELD_NUMBER: _ClassVar[int]
    MATCHED_BOX_FIELD_NUMBER: _ClassVar[int]
    MATCHED_REGION_FIELD_NUMBER: _ClassVar[int]
    id: str
    score: float
    image_uri: str
    metadata: _struct_pb2.Struct
    match_probability: float
    is_copy: bool
    copy_score: float
    matched_box: _embedder_pb2.CropBox
    matched_region: _embedder_pb2.CropBox
    def __init__(self, id: _Optional[str] = ..., score: _Optional[float] = ..., image_uri: _Optional[str] = ..., metadata: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., match_probability: _Optional[float] = ..., is_copy: _Optional[bool] = ..., copy_score: _Optional[float] = ..., matched_box: _Optional[_Union[_embedder_pb2.CropBox, _Mapping]] = ..., matched_region: _Optional[_Union[_embedder_pb2.CropBox, _Mapping]] = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ("embed_ms", "search_ms", "total_ms")
    EMBED_MS_FIELD_NUMBER: _ClassVar[int]
    SEARCH_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    embed_ms: float
    search_ms: float
    total_ms: float
    def __init__(self, embed_ms: _Optional[float] = ..., search_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class VisualSearchResponse(_message.Message):
    __slots__ = ("hits", "from_cache", "embedding_from_cache", "timing", "index_generation", "model_version", "no_good_match", "no_match_reason", "understood_as", "next_page_token")
    HITS_FIELD_NUMBER: _ClassVar[int]
    FROM_CACHE_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FROM_CACHE_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    INDEX_GENERATION_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    NO_GOOD_MATCH_FIELD_NUMBER: _ClassVar[int]
    NO_MATCH_REASON_FIELD_NUMBER: _ClassVar[int]
    UNDERSTOOD_AS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[SearchHit]
    from_cache: bool
    embedding_from_cache: bool
    timing: Timing
    index_generation: int
    model_version: str
    no_good_match: bool
    no_match_reason: str
    understood_as: str
    next_page_token: str
    def __init__(self, hits: _Optional[_Iterable[_Union[SearchHit, _Mapping]]] = ..., from_cache: _Optional[bool] = ..., embedding_from_cache: _Optional[bool] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., index_generation: _Optional[int] = ..., model_version: _Optional[str] = ..., no_good_match: _Optional[bool] = ..., no_match_reason: _Optional[str] = ..., understood_as: _Optional[str] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class VisualSearchBatchRequest(_message.Message):
    __slots__ = ("queries",)
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    queries: _containers.RepeatedCompositeFieldContainer[VisualSearchRequest]
    def __init__(self, queries: _Optional[_Iterable[_Union[VisualSearchRequest, _Mapping]]] = ...) -> None: ...

class VisualSearchResult(_message.Message):
    __slots__ = ("code", "message", "response")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    response: VisualSearchResponse
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., response: _Optional[_Union[VisualSearchResponse, _Mapping]] = ...) -> None: ...

class VisualSearchBatchResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[VisualSearchResult]
    def __init__(self, results: _Optional[_Iterable[_Union[VisualSearchResult, _Mapping]]] = ...) -> None: ...

class AddImageRequest(_message.Message):
    __slots__ = ("id", "image", "metadata", "image_uri", "collection", "on_copy", "regions")
    ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    IMAGE_URI_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    ON_COPY_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    id: str
    image: bytes
    metadata: _struct_pb2.Struct
    image_uri: str
    collection: str
    on_copy: OnCopy
    regions: bool
    def __init__(self, id: _Optional[str] = ..., image: _Optional[bytes] = ..., metadata: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., image_uri: _Optional[str] = ..., collection: _Optional[str] = ..., on_copy: _Optional[_Union[OnCopy, str]] = ..., regions: _Optional[bool] = ...) -> None: ...

class IngestCopy(_message.Message):
    __slots__ = ("id", "index", "copy_of", "copy_score", "skipped")
    ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    COPY_OF_FIELD_NUMBER: _ClassVar[int]
    COPY_SCORE_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    id: str
    index: int
    copy_of: str
    copy_score: float
    skipped: bool
    def __init__(self, id: _Optional[str] = ..., index: _Optional[int] = ..., copy_of: _Optional[str] = ..., copy_score: _Optional[float] = ..., skipped: _Optional[bool] = ...) -> None: ...

class ItemFailure(_message.Message):
    __slots__ = ("id", "code", "message", "index")
    ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    id: str
    code: int
    message: str
    index: int
    def __init__(self, id: _Optional[str] = ..., code: _Optional[int] = ..., message: _Optional[str] = ..., index: _Optional[int] = ...) -> None: ...

class AddImagesSummary(_message.Message):
    __slots__ = ("received", "indexed", "failed", "failures", "index_generation", "unchanged", "copies", "skipped_copies")
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    INDEXED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    INDEX_GENERATION_FIELD_NUMBER: _ClassVar[int]
    UNCHANGED_FIELD_NUMBER: _ClassVar[int]
    COPIES_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_COPIES_FIELD_NUMBER: _ClassVar[int]
    received: int
    indexed: int
    failed: int
    failures: _containers.RepeatedCompositeFieldContainer[ItemFailure]
    index_generation: int
    unchanged: int
    copies: _containers.RepeatedCompositeFieldContainer[IngestCopy]
    skipped_copies: int
    def __init__(self, received: _Optional[int] = ..., indexed: _Optional[int] = ..., failed: _Optional[int] = ..., failures: _Optional[_Iterable[_Union[ItemFailure, _Mapping]]] = ..., index_generation: _Optional[int] = ..., unchanged: _Optional[int] = ..., copies: _Optional[_Iterable[_Union[IngestCopy, _Mapping]]] = ..., skipped_copies: _Optional[int] = ...) -> None: ...

class DeleteImagesRequest(_message.Message):
    __slots__ = ("ids", "collection")
    IDS_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[str]
    collection: str
    def __init__(self, ids: _Optional[_Iterable[str]] = ..., collection: _Optional[str] = ...) -> None: ...

class DeleteImagesResponse(_message.Message):
    __slots__ = ("deleted", "index_generation")
    DELETED_FIELD_NUMBER: _ClassVar[int]
    INDEX_GENERATION_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    index_generation: int
    def __init__(self, deleted: _Optional[int] = ..., index_generation: _Optional[int] = ...) -> None: ...

class VisualStatsRequest(_message.Message):
    __slots__ = ("collection", "with_field_summaries")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    WITH_FIELD_SUMMARIES_FIELD_NUMBER: _ClassVar[int]
    collection: str
    with_field_summaries: bool
    def __init__(self, collection: _Optional[str] = ..., with_field_summaries: _Optional[bool] = ...) -> None: ...

class VisualStatsResponse(_message.Message):
    __slots__ = ("count", "index_type", "metric", "index_generation", "dimension", "model_name", "model_version", "filterable_fields", "text_search", "calibrated", "regions", "field_summaries")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    INDEX_TYPE_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    INDEX_GENERATION_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    FILTERABLE_FIELDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_SEARCH_FIELD_NUMBER: _ClassVar[int]
    CALIBRATED_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    FIELD_SUMMARIES_FIELD_NUMBER: _ClassVar[int]
    count: int
    index_type: str
    metric: str
    index_generation: int
    dimension: int
    model_name: str
    model_version: str
    filterable_fields: _containers.RepeatedScalarFieldContainer[str]
    text_search: str
    calibrated: bool
    regions: bool
    field_summaries: _containers.RepeatedCompositeFieldContainer[_search_pb2.FieldSummary]
    def __init__(self, count: _Optional[int] = ..., index_type: _Optional[str] = ..., metric: _Optional[str] = ..., index_generation: _Optional[int] = ..., dimension: _Optional[int] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., filterable_fields: _Optional[_Iterable[str]] = ..., text_search: _Optional[str] = ..., calibrated: _Optional[bool] = ..., regions: _Optional[bool] = ..., field_summaries: _Optional[_Iterable[_Union[_search_pb2.FieldSummary, _Mapping]]] = ...) -> None: ...

class ListImagesRequest(_message.Message):
    __slots__ = ("collection", "page_size", "page_token")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    collection: str
    page_size: int
    page_token: str
    def __init__(self, collection: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class CatalogImage(_message.Message):
    __slots__ = ("id", "content_sha256", "image_uri", "metadata")
    ID_FIELD_NUMBER: _ClassVar[int]
    CONTENT_SHA256_FIELD_NUMBER: _ClassVar[int]
    IMAGE_URI_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    id: str
    content_sha256: str
    image_uri: str
    metadata: _struct_pb2.Struct
    def __init__(self, id: _Optional[str] = ..., content_sha256: _Optional[str] = ..., image_uri: _Optional[str] = ..., metadata: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class ListImagesResponse(_message.Message):
    __slots__ = ("images", "next_page_token")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[CatalogImage]
    next_page_token: str
    def __init__(self, images: _Optional[_Iterable[_Union[CatalogImage, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...
