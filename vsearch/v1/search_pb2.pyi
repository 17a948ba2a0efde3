from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Operator(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OPERATOR_UNSPECIFIED: _ClassVar[Operator]
    EQ: _ClassVar[Operator]
    NE: _ClassVar[Operator]
    LT: _ClassVar[Operator]
    LE: _ClassVar[Operator]
    GT: _ClassVar[Operator]
    GE: _ClassVar[Operator]
    IN: _ClassVar[Operator]
    NOT_IN: _ClassVar[Operator]
OPERATOR_UNSPECIFIED: Operator
EQ: Operator
NE: Operator
LT: Operator
LE: Operator
GT: Operator
GE: Operator
IN: Operator
NOT_IN: Operator

class Vector(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class Item(_message.Message):
    __slots__ = ("id", "vector", "image_uri", "metadata", "content_sha256", "copy_features", "regions")
    ID_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    IMAGE_URI_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CONTENT_SHA256_FIELD_NUMBER: _ClassVar[int]
    COPY_FEATURES_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    id: str
    vector: Vector
    image_uri: str
    metadata: _struct_pb2.Struct
    content_sha256: str
    copy_features: bytes
    regions: _containers.RepeatedCompositeFieldContainer[Region]
    def __init__(self, id: _Optional[str] = ..., vector: _Optional[_Union[Vector, _Mapping]] = ..., image_uri: _Optional[str] = ..., metadata: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., content_sha256: _Optional[str] = ..., copy_features: _Optional[bytes] = ..., regions: _Optional[_Iterable[_Union[Region, _Mapping]]] = ...) -> None: ...

class RegionBox(_message.Message):
    __slots__ = ("x", "y", "width", "height")
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    x: int
    y: int
    width: int
    height: int
    def __init__(self, x: _Optional[int] = ..., y: _Optional[int] = ..., width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class Region(_message.Message):
    __slots__ = ("box", "vector")
    BOX_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    box: RegionBox
    vector: Vector
    def __init__(self, box: _Optional[_Union[RegionBox, _Mapping]] = ..., vector: _Optional[_Union[Vector, _Mapping]] = ...) -> None: ...

class UpsertRequest(_message.Message):
    __slots__ = ("items", "collection")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[Item]
    collection: str
    def __init__(self, items: _Optional[_Iterable[_Union[Item, _Mapping]]] = ..., collection: _Optional[str] = ...) -> None: ...

class UpsertResponse(_message.Message):
    __slots__ = ("upserted", "generation")
    UPSERTED_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    upserted: int
    generation: int
    def __init__(self, upserted: _Optional[int] = ..., generation: _Optional[int] = ...) -> None: ...

class Condition(_message.Message):
    __slots__ = ("field", "op", "value")
    FIELD_FIELD_NUMBER: _ClassVar[int]
    OP_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    field: str
    op: Operator
    value: _struct_pb2.Value
    def __init__(self, field: _Optional[str] = ..., op: _Optional[_Union[Operator, str]] = ..., value: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ...) -> None: ...

class Filter(_message.Message):
    __slots__ = ("conditions",)
    CONDITIONS_FIELD_NUMBER: _ClassVar[int]
    conditions: _containers.RepeatedCompositeFieldContainer[Condition]
    def __init__(self, conditions: _Optional[_Iterable[_Union[Condition, _Mapping]]] = ...) -> None: ...

class SearchRequest(_message.Message):
    __slots__ = ("queries", "k", "filter", "min_score", "collection", "include_copy_features", "copy_query_features", "feature_candidates")
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    MIN_SCORE_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_COPY_FEATURES_FIELD_NUMBER: _ClassVar[int]
    COPY_QUERY_FEATURES_FIELD_NUMBER: _ClassVar[int]
    FEATURE_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    queries: _containers.RepeatedCompositeFieldContainer[Vector]
    k: int
    filter: Filter
    min_score: float
    collection: str
    include_copy_features: bool
    copy_query_features: bytes
    feature_candidates: int
    def __init__(self, queries: _Optional[_Iterable[_Union[Vector, _Mapping]]] = ..., k: _Optional[int] = ..., filter: _Optional[_Union[Filter, _Mapping]] = ..., min_score: _Optional[float] = ..., collection: _Optional[str] = ..., include_copy_features: _Optional[bool] = ..., copy_query_features: _Optional[bytes] = ..., feature_candidates: _Optional[int] = ...) -> None: ...

class Hit(_message.Message):
    __slots__ = ("id", "score", "image_uri", "metadata", "copy_features", "region", "content_sha256")
    ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_URI_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    COPY_FEATURES_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    CONTENT_SHA256_FIELD_NUMBER: _ClassVar[int]
    id: str
    score: float
    image_uri: str
    metadata: _struct_pb2.Struct
    copy_features: bytes
    region: RegionBox
    content_sha256: str
    def __init__(self, id: _Optional[str] = ..., score: _Optional[float] = ..., image_uri: _Optional[str] = ..., metadata: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., copy_features: _Optional[bytes] = ..., region: _Optional[_Union[RegionBox, _Mapping]] = ..., content_sha256: _Optional[str] = ...) -> None: ...

class HitList(_message.Message):
    __slots__ = ("hits", "feature_matches")
    HITS_FIELD_NUMBER: _ClassVar[int]
    FEATURE_MATCHES_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[Hit]
    feature_matches: _containers.RepeatedCompositeFieldContainer[Hit]
    def __init__(self, hits: _Optional[_Iterable[_Union[Hit, _Mapping]]] = ..., feature_matches: _Optional[_Iterable[_Union[Hit, _Mapping]]] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("results", "generation")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[HitList]
    generation: int
    def __init__(self, results: _Optional[_Iterable[_Union[HitList, _Mapping]]] = ..., generation: _Optional[int] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("ids", "include_vectors", "collection", "include_copy_features")
    IDS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_VECTORS_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_COPY_FEATURES_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[str]
    include_vectors: bool
    collection: str
    include_copy_features: bool
    def __init__(self, ids: _Optional[_Iterable[str]] = ..., include_vectors: _Optional[bool] = ..., collection: _Optional[str] = ..., include_copy_features: _Optional[bool] = ...) -> None: ...

class GetResponse(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[Item]
    def __init__(self, items: _Optional[_Iterable[_Union[Item, _Mapping]]] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("ids", "collection")
    IDS_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[str]
    collection: str
    def __init__(self, ids: _Optional[_Iterable[str]] = ..., collection: _Optional[str] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("deleted", "generation")
    DELETED_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    generation: int
    def __init__(self, deleted: _Optional[int] = ..., generation: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ("skip_count", "collection", "with_field_summaries")
    SKIP_COUNT_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    WITH_FIELD_SUMMARIES_FIELD_NUMBER: _ClassVar[int]
    skip_count: bool
    collection: str
    with_field_summaries: bool
    def __init__(self, skip_count: _Optional[bool] = ..., collection: _Optional[str] = ..., with_field_summaries: _Optional[bool] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("count", "index_type", "metric", "generation", "dimension", "collection", "filterable_fields", "regions", "field_summaries")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    INDEX_TYPE_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    FILTERABLE_FIELDS_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    FIELD_SUMMARIES_FIELD_NUMBER: _ClassVar[int]
    count: int
    index_type: str
    metric: str
    generation: int
    dimension: int
    collection: str
    filterable_fields: _containers.RepeatedScalarFieldContainer[str]
    regions: bool
    field_summaries: _containers.RepeatedCompositeFieldContainer[FieldSummary]
    def __init__(self, count: _Optional[int] = ..., index_type: _Optional[str] = ..., metric: _Optional[str] = ..., generation: _Optional[int] = ..., dimension: _Optional[int] = ..., collection: _Optional[str] = ..., filterable_fields: _Optional[_Iterable[str]] = ..., regions: _Optional[bool] = ..., field_summaries: _Optional[_Iterable[_Union[FieldSummary, _Mapping]]] = ...) -> None: ...

class FieldSummary(_message.Message):
    __slots__ = ("name", "type", "present", "top_values", "more_values", "min", "max")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    TOP_VALUES_FIELD_NUMBER: _ClassVar[int]
    MORE_VALUES_FIELD_NUMBER: _ClassVar[int]
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: str
    present: int
    top_values: _containers.RepeatedCompositeFieldContainer[ValueCount]
    more_values: bool
    min: float
    max: float
    def __init__(self, name: _Optional[str] = ..., type: _Optional[str] = ..., present: _Optional[int] = ..., top_values: _Optional[_Iterable[_Union[ValueCount, _Mapping]]] = ..., more_values: _Optional[bool] = ..., min: _Optional[float] = ..., max: _Optional[float] = ...) -> None: ...

class ValueCount(_message.Message):
    __slots__ = ("value", "count")
    VALUE_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    value: str
    count: int
    def __init__(self, value: _Optional[str] = ..., count: _Optional[int] = ...) -> None: ...

class DropCollectionRequest(_message.Message):
    __slots__ = ("collection",)
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    collection: str
    def __init__(self, collection: _Optional[str] = ...) -> None: ...

class DropCollectionResponse(_message.Message):
    __slots__ = ("dropped", "generation")
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    dropped: bool
    generation: int
    def __init__(self, dropped: _Optional[bool] = ..., generation: _Optional[int] = ...) -> None: ...

class ListRequest(_message.Message):
    __slots__ = ("collection", "page_size", "page_token", "include_vectors", "include_copy_features")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_VECTORS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_COPY_FEATURES_FIELD_NUMBER: _ClassVar[int]
    collection: str
    page_size: int
    page_token: str
    include_vectors: bool
    include_copy_features: bool
    def __init__(self, collection: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., include_vectors: _Optional[bool] = ..., include_copy_features: _Optional[bool] = ...) -> None: ...

class ListResponse(_message.Message):
    __slots__ = ("items", "next_page_token")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[Item]
    next_page_token: str
    def __init__(self, items: _Optional[_Iterable[_Union[Item, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ListCollectionsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CollectionSummary(_message.Message):
    __slots__ = ("name", "count", "is_default", "regions")
    NAME_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    name: str
    count: int
    is_default: bool
    regions: bool
    def __init__(self, name: _Optional[str] = ..., count: _Optional[int] = ..., is_default: _Optional[bool] = ..., regions: _Optional[bool] = ...) -> None: ...

class ListCollectionsResponse(_message.Message):
    __slots__ = ("collections",)
    COLLECTIONS_FIELD_NUMBER: _ClassVar[int]
    collections: _containers.RepeatedCompositeFieldContainer[CollectionSummary]
    def __init__(self, collections: _Optional[_Iterable[_Union[CollectionSummary, _Mapping]]] = ...) -> None: ...
