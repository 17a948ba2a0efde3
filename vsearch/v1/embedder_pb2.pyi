from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CropBox(_message.Message):
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

class ImageInput(_message.Message):
    __slots__ = ("data", "crop")
    DATA_FIELD_NUMBER: _ClassVar[int]
    CROP_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    crop: CropBox
    def __init__(self, data: _Optional[bytes] = ..., crop: _Optional[_Union[CropBox, _Mapping]] = ...) -> None: ...

class EmbedImagesRequest(_message.Message):
    __slots__ = ("images", "with_copy_features", "copy_features_for_query", "with_regions")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    WITH_COPY_FEATURES_FIELD_NUMBER: _ClassVar[int]
    COPY_FEATURES_FOR_QUERY_FIELD_NUMBER: _ClassVar[int]
    WITH_REGIONS_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[ImageInput]
    with_copy_features: bool
    copy_features_for_query: bool
    with_regions: bool
    def __init__(self, images: _Optional[_Iterable[_Union[ImageInput, _Mapping]]] = ..., with_copy_features: _Optional[bool] = ..., copy_features_for_query: _Optional[bool] = ..., with_regions: _Optional[bool] = ...) -> None: ...

class ItemError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class Embedding(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class EmbedResult(_message.Message):
    __slots__ = ("embedding", "error", "copy_features", "regions")
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    COPY_FEATURES_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    embedding: Embedding
    error: ItemError
    copy_features: bytes
    regions: _containers.RepeatedCompositeFieldContainer[RegionEmbedding]
    def __init__(self, embedding: _Optional[_Union[Embedding, _Mapping]] = ..., error: _Optional[_Union[ItemError, _Mapping]] = ..., copy_features: _Optional[bytes] = ..., regions: _Optional[_Iterable[_Union[RegionEmbedding, _Mapping]]] = ...) -> None: ...

class RegionEmbedding(_message.Message):
    __slots__ = ("box", "embedding")
    BOX_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    box: CropBox
    embedding: Embedding
    def __init__(self, box: _Optional[_Union[CropBox, _Mapping]] = ..., embedding: _Optional[_Union[Embedding, _Mapping]] = ...) -> None: ...

class EmbedImagesResponse(_message.Message):
    __slots__ = ("results", "model_version")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[EmbedResult]
    model_version: str
    def __init__(self, results: _Optional[_Iterable[_Union[EmbedResult, _Mapping]]] = ..., model_version: _Optional[str] = ...) -> None: ...

class EmbedTextsRequest(_message.Message):
    __slots__ = ("texts",)
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, texts: _Optional[_Iterable[str]] = ...) -> None: ...

class EmbedTextResult(_message.Message):
    __slots__ = ("embedding", "error", "understood_as")
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    UNDERSTOOD_AS_FIELD_NUMBER: _ClassVar[int]
    embedding: Embedding
    error: ItemError
    understood_as: str
    def __init__(self, embedding: _Optional[_Union[Embedding, _Mapping]] = ..., error: _Optional[_Union[ItemError, _Mapping]] = ..., understood_as: _Optional[str] = ...) -> None: ...

class EmbedTextsResponse(_message.Message):
    __slots__ = ("results", "model_version")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[EmbedTextResult]
    model_version: str
    def __init__(self, results: _Optional[_Iterable[_Union[EmbedTextResult, _Mapping]]] = ..., model_version: _Optional[str] = ...) -> None: ...

class Calibration(_message.Message):
    __slots__ = ("score_knots", "probability_knots", "rank_scale", "description")
    SCORE_KNOTS_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_KNOTS_FIELD_NUMBER: _ClassVar[int]
    RANK_SCALE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    score_knots: _containers.RepeatedScalarFieldContainer[float]
    probability_knots: _containers.RepeatedScalarFieldContainer[float]
    rank_scale: float
    description: str
    def __init__(self, score_knots: _Optional[_Iterable[float]] = ..., probability_knots: _Optional[_Iterable[float]] = ..., rank_scale: _Optional[float] = ..., description: _Optional[str] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("model_name", "model_version", "dimension", "preprocessing", "backend", "max_batch_size", "text_search", "calibration", "copy_min_inliers", "regions_per_image")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    PREPROCESSING_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    TEXT_SEARCH_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_FIELD_NUMBER: _ClassVar[int]
    COPY_MIN_INLIERS_FIELD_NUMBER: _ClassVar[int]
    REGIONS_PER_IMAGE_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: str
    dimension: int
    preprocessing: str
    backend: str
    max_batch_size: int
    text_search: str
    calibration: Calibration
    copy_min_inliers: int
    regions_per_image: int
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., dimension: _Optional[int] = ..., preprocessing: _Optional[str] = ..., backend: _Optional[str] = ..., max_batch_size: _Optional[int] = ..., text_search: _Optional[str] = ..., calibration: _Optional[_Union[Calibration, _Mapping]] = ..., copy_min_inliers: _Optional[int] = ..., regions_per_image: _Optional[int] = ...) -> None: ...

class VerifyCopiesRequest(_message.Message):
    __slots__ = ("query", "candidates", "mirror_depth", "first_rank", "min_inliers")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    MIRROR_DEPTH_FIELD_NUMBER: _ClassVar[int]
    FIRST_RANK_FIELD_NUMBER: _ClassVar[int]
    MIN_INLIERS_FIELD_NUMBER: _ClassVar[int]
    query: bytes
    candidates: _containers.RepeatedScalarFieldContainer[bytes]
    mirror_depth: int
    first_rank: int
    min_inliers: int
    def __init__(self, query: _Optional[bytes] = ..., candidates: _Optional[_Iterable[bytes]] = ..., mirror_depth: _Optional[int] = ..., first_rank: _Optional[int] = ..., min_inliers: _Optional[int] = ...) -> None: ...

class CopyVerdict(_message.Message):
    __slots__ = ("is_copy", "copy_score", "matched_box", "mirrored", "inliers")
    IS_COPY_FIELD_NUMBER: _ClassVar[int]
    COPY_SCORE_FIELD_NUMBER: _ClassVar[int]
    MATCHED_BOX_FIELD_NUMBER: _ClassVar[int]
    MIRRORED_FIELD_NUMBER: _ClassVar[int]
    INLIERS_FIELD_NUMBER: _ClassVar[int]
    is_copy: bool
    copy_score: float
    matched_box: CropBox
    mirrored: bool
    inliers: int
    def __init__(self, is_copy: _Optional[bool] = ..., copy_score: _Optional[float] = ..., matched_box: _Optional[_Union[CropBox, _Mapping]] = ..., mirrored: _Optional[bool] = ..., inliers: _Optional[int] = ...) -> None: ...

class VerifyCopiesResponse(_message.Message):
    __slots__ = ("verdicts",)
    VERDICTS_FIELD_NUMBER: _ClassVar[int]
    verdicts: _containers.RepeatedCompositeFieldContainer[CopyVerdict]
    def __init__(self, verdicts: _Optional[_Iterable[_Union[CopyVerdict, _Mapping]]] = ...) -> None: ...
