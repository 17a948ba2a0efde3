"""The HTTP/JSON API's shapes and their translation to and from the protobuf messages the core speaks;
and how gRPC status codes read over HTTP."""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from typing import Annotated, Any, Literal

import grpc
from google.protobuf import json_format, struct_pb2
from pydantic import BaseModel, ConfigDict, Discriminator, Field, JsonValue, Tag, TypeAdapter, ValidationError

from service_kit.status import ServiceError, code_from_int, invalid_argument
from vsearch.v1 import embedder_pb2, gateway_pb2, search_pb2

# ------------------------------------------------------------------------------------------ errors

# google.rpc.Code's documented HTTP mapping.
HTTP_STATUS_BY_CODE: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}

# For errors raised by the HTTP layer itself (unknown route, wrong method, a request over a limit, ...).
# Where HTTP has a more precise status than the code's own, the code is the one gRPC would give the same
# request: 408 DEADLINE_EXCEEDED (the request did not arrive in time), 413 and 431 RESOURCE_EXHAUSTED
# (what gRPC answers a message over its size limit), 499 CANCELLED (the client went away).
CODE_BY_HTTP_STATUS: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    405: grpc.StatusCode.UNIMPLEMENTED,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    409: grpc.StatusCode.ABORTED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    431: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    501: grpc.StatusCode.UNIMPLEMENTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def http_status(code: grpc.StatusCode) -> int:
    return HTTP_STATUS_BY_CODE.get(code, 500)


def code_for_http_status(status: int) -> grpc.StatusCode:
    if status in CODE_BY_HTTP_STATUS:
        return CODE_BY_HTTP_STATUS[status]
    return grpc.StatusCode.INVALID_ARGUMENT if 400 <= status < 500 else grpc.StatusCode.INTERNAL


def error_body(code: grpc.StatusCode, message: str) -> dict[str, Any]:
    return {"error": {"code": code.name, "message": message}}


def format_location(prefix: str, location: tuple[int | str, ...]) -> str:
    """("filter", 0, "value") -> "filter[0].value", leaving out union branch tags."""
    text = prefix
    for part in location:
        if part in UNION_TAGS:
            continue
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def describe_validation_error(error: ValidationError, prefix: str = "") -> str:
    """One line for the caller: which field is wrong and why."""
    problems = []
    for item in error.errors():
        if item["type"] == "json_invalid":
            detail = (item.get("ctx") or {}).get("error", item["msg"])
            return f"{prefix + ': ' if prefix else ''}malformed JSON: {detail}"
        location = format_location(prefix, item["loc"])
        problems.append(f"{location or 'request body'}: {item['msg']}")
    return "; ".join(problems) or "invalid request"


# ------------------------------------------------------------------------------------ request JSON

class CropBody(BaseModel):
    """A rectangle in pixels of the image as displayed (after EXIF orientation)."""

    # strict: JSON integers only, never `true` (1), `1.0` or "1".
    model_config = ConfigDict(extra="forbid", strict=True)
    x: int = Field(0, ge=0, lt=2**32)
    y: int = Field(0, ge=0, lt=2**32)
    width: int = Field(ge=0, lt=2**32)
    height: int = Field(ge=0, lt=2**32)


class ConditionBody(BaseModel):
    """`field op value`; op is one of == != < <= > >= in not_in (or EQ NE LT LE GT GE IN NOT_IN)."""

    model_config = ConfigDict(extra="forbid")
    field: str
    op: str
    value: JsonValue


CONDITIONS_TAG, SHORTHAND_TAG = "conditions", "shorthand"
UNION_TAGS = {CONDITIONS_TAG, SHORTHAND_TAG}


def filter_shape(value: object) -> str | None:
    if isinstance(value, list):
        return CONDITIONS_TAG
    if isinstance(value, dict):
        return SHORTHAND_TAG
    return None


# A list of conditions (all must hold), or the shorthand {"category": "shoes", "brand": ["a", "b"]}
# (a list value means `in`, anything else `==`). Told apart by shape, so an error names one of them.
FilterBody = Annotated[
    Annotated[list[ConditionBody], Tag(CONDITIONS_TAG)] | Annotated[dict[str, JsonValue], Tag(SHORTHAND_TAG)],
    Discriminator(
        filter_shape,
        custom_error_type="filter_shape",
        custom_error_message="must be a list of conditions or an object of field: value",
    ),
]
FILTER_ADAPTER: TypeAdapter[FilterBody] = TypeAdapter(FilterBody)


class SearchBody(BaseModel):
    """Search by an image (base64), by the stored vector of an indexed item, or by words."""

    model_config = ConfigDict(extra="forbid")
    image_base64: str | None = None
    item_id: str | None = None
    text: str | None = Field(
        None, description="Search by words (\"a red running shoe\"), when the model supports it (stats' text_search); "
        "at most 500 characters, no control characters."
    )
    # strict: a JSON integer (number) only; `true` is not 1, nor "5" five.
    k: int | None = Field(
        None, strict=True, description="Hits wanted (1..max_k); the gateway's default_k when left out."
    )
    crop: CropBody | None = None
    filter: FilterBody | None = None
    min_score: float | None = Field(None, strict=True, allow_inf_nan=False)
    min_probability: float | None = Field(
        None, strict=True, allow_inf_nan=False,
        description="Only hits whose match_probability is at least this (0..1); needs a calibrated model (stats' "
        "calibrated), else 400 FAILED_PRECONDITION.",
    )
    collection: str = Field("", description="Which catalog; empty for the default one.")
    mode: Literal["similar", "copy"] = Field(
        "similar", description='"similar" (the default): the most similar images. "copy": is the query (an image or '
        "an item_id, not a text) a copy of catalog images, cropped, mirrored, greyed, recompressed? Copies come "
        "first, by copy_score; hits carry is_copy, copy_score and, for copies, matched_box.",
    )
    page_token: str = Field(
        "", description="Empty for the first page; else a previous response's next_page_token, sent with the same "
        "query (every other field as it was; k may change). After a write to the collection it is 400 "
        "FAILED_PRECONDITION: search again from the first page. An altered token, or one sent with another query, "
        "is 400 INVALID_ARGUMENT.",
    )


class SearchBatchBody(BaseModel):
    """Several searches in one call, each answered as POST /v1/search answers it."""

    model_config = ConfigDict(extra="forbid")
    queries: list[SearchBody] = Field(
        description="1..GATEWAY_MAX_BATCH_QUERIES (32) bodies of POST /v1/search (JSON: images as image_base64). "
        "Each counts against the API key's search rate limit."
    )


class SearchBatchEnvelope(BaseModel):
    """The batch's shape, before each query is read on its own (so that a bad one fails alone)."""

    model_config = ConfigDict(extra="forbid")
    queries: list[JsonValue]


OnCopyText = Literal["keep", "flag", "skip"]


class ImageBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image_base64: str
    id: str | None = Field(None, description="Defaults to the sha256 (hex) of the image bytes.")
    metadata: dict[str, JsonValue] | None = None
    image_uri: str | None = None


class AddImagesBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    images: list[ImageBody]
    collection: str = Field("", description="Which catalog the images go to; empty for the default one.")
    on_copy: OnCopyText = Field(
        "keep", description='An image that is a verified copy of one already in the collection (or of an earlier one '
        'of this request): "keep" writes it unchecked, "flag" writes it with metadata copy_of (the id it copies), '
        '"skip" leaves it out; flagged and skipped ones are listed in the summary\'s copies.',
    )
    regions: bool = Field(
        False, description="Also index each image's regions (parts of it), so that a crop of a small part finds it. "
        "The collection remembers it: once it has regions, every later request makes them.",
    )


# ----------------------------------------------------------------------------------- response JSON

class ErrorDetail(BaseModel):
    code: str = Field(description="gRPC status code name, e.g. INVALID_ARGUMENT")
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


class HitBody(BaseModel):
    id: str
    score: float
    image_uri: str
    metadata: dict[str, JsonValue]
    match_probability: float | None = Field(
        None, description="The probability that the hit is relevant (has the query's label), from the model's "
        "calibration; null when the model has none, and for text queries."
    )
    is_copy: bool | None = Field(
        None, description='Copy mode only (absent otherwise): the query is a copy of (a part of) this image.'
    )
    copy_score: float | None = Field(
        None, description="Copy mode only (absent otherwise): 0..1, growing with the local features that agree; "
        "0.5 is the is_copy threshold."
    )
    matched_box: CropBody | None = Field(
        None, description="Copy mode only (absent otherwise; null when not a copy): where the query lies inside "
        "this image, in its pixels."
    )
    matched_region: CropBody | None = Field(
        None, description="In a collection with regions: the part of this image that matched best (a region of "
        "its grid, in its pixels), when it beat the whole image; null when the whole image matched."
    )


class TimingBody(BaseModel):
    embed_ms: float
    search_ms: float
    total_ms: float


class SearchResponseBody(BaseModel):
    hits: list[HitBody]
    from_cache: bool
    embedding_from_cache: bool
    timing: TimingBody
    index_generation: int
    model_version: str
    next_page_token: str = Field(
        "", description="Send it as page_token, with the same query, for the next hits; empty when there are none "
        "(or GATEWAY_MAX_PAGING_DEPTH is reached)."
    )
    understood_as: str = Field("", description="For a text query: what the text was understood as")
    no_match_reason: str = Field("", description="Why there is no good match (e.g. the text names nothing the model knows)")
    no_good_match: bool = Field(
        False, description="No hit, or the best hit's match_probability is below the gateway's threshold "
        "(GATEWAY_NO_GOOD_MATCH_BELOW, 0.5); false when there are hits without probabilities."
    )


class SearchResultBody(BaseModel):
    """One query's answer: `response` as POST /v1/search gives it, or its `error`."""

    response: SearchResponseBody | None = None
    error: ErrorDetail | None = None


class SearchBatchResponseBody(BaseModel):
    results: list[SearchResultBody] = Field(description="One per query, in order.")


class ItemFailureBody(BaseModel):
    id: str
    code: str
    message: str
    index: int


class IngestCopyBody(BaseModel):
    id: str
    index: int = Field(description="0-based position of the image in the request")
    copy_of: str = Field(description="The id of the item it copies (the best verified one)")
    copy_score: float
    skipped: bool = Field(description='With on_copy "skip": the image was not written')


class AddImagesResponseBody(BaseModel):
    received: int
    indexed: int
    failed: int
    failures: list[ItemFailureBody]
    index_generation: int
    unchanged: int = Field(0, description="Images already stored as they are (not embedded or written again)")
    skipped_copies: int = Field(0, description='Images left out as copies (on_copy "skip")')
    copies: list[IngestCopyBody] = Field([], description='With on_copy "flag" or "skip": the images found to be copies')


class DeleteResponseBody(BaseModel):
    deleted: int
    index_generation: int


class ValueCountBody(BaseModel):
    value: str = Field(description='The value as text (bools as "true" / "false")')
    count: int


class FieldSummaryBody(BaseModel):
    name: str
    type: str = Field(description='"string", "float", "int" or "bool", as search_svc declares it')
    present: int = Field(description="Items that have the field")
    top_values: list[ValueCountBody] = Field(
        description="String and bool fields: the most frequent values, most frequent first (ties by value), at most 50"
    )
    more_values: bool = Field(description="The field has more distinct values than top_values lists")
    min: float | None = Field(description="Number fields: the smallest value; null otherwise, or when no item has it")
    max: float | None = Field(description="Number fields: the largest value; null otherwise, or when no item has it")


class StatsResponseBody(BaseModel):
    count: int
    index_type: str
    metric: str
    index_generation: int
    dimension: int
    model_name: str
    model_version: str
    filterable_fields: list[str]
    text_search: str = Field("", description='How text queries work: "" (not supported), "dual_encoder" or "classifier"')
    calibrated: bool = Field(False, description="Whether hits carry match_probability (the model has a calibration)")
    regions: bool = Field(False, description="Whether the collection's images are indexed with regions (hits carry "
                          "matched_region)")
    field_summaries: list[FieldSummaryBody] | None = Field(
        None, description="Only with field_summaries=true: what each filterable field holds (values and counts, or "
        "a range), in filterable_fields' order; enough to offer filters (category chips, a price range)."
    )


class CollectionBody(BaseModel):
    name: str
    count: int = Field(description="Images in it")
    is_default: bool = Field(description="The default collection (requests that name none; never dropped)")
    regions: bool = Field(description="Indexed with regions")


class CollectionsResponseBody(BaseModel):
    collections: list[CollectionBody] = Field(description="Every collection, ordered by name; the default one always")


class DropCollectionResponseBody(BaseModel):
    dropped: bool = Field(description="Always true: a collection that did not exist answers 404")
    index_generation: int = Field(description="The collection's index generation after the drop")


class HealthBody(BaseModel):
    status: str = Field(description="SERVING or NOT_SERVING")
    reason: str | None = Field(None, description="Why not SERVING: starting, draining or downstream unavailable")
    unavailable: list[str] | None = Field(
        None, description="The downstream services (embedder, search) unavailable for longer than the grace period"
    )


# --------------------------------------------------------------------------------- JSON -> protobuf

OPERATORS: dict[str, int] = {
    "==": search_pb2.EQ, "=": search_pb2.EQ, "!=": search_pb2.NE,
    "<": search_pb2.LT, "<=": search_pb2.LE, ">": search_pb2.GT, ">=": search_pb2.GE,
    "in": search_pb2.IN, "not_in": search_pb2.NOT_IN, "not in": search_pb2.NOT_IN,
    **{name.lower(): value for name, value in search_pb2.Operator.items() if value != search_pb2.OPERATOR_UNSPECIFIED},
}
LIST_OPERATORS = {search_pb2.IN, search_pb2.NOT_IN}


def operator_from_text(op: str) -> int:
    operator = OPERATORS.get(op.strip().lower())
    if operator is None:
        raise invalid_argument(f"unknown filter op {op!r}; use one of == != < <= > >= in not_in")
    return operator


def condition_to_proto(field: str, op: str, value: JsonValue, where: str) -> search_pb2.Condition:
    operator = operator_from_text(op)
    if operator in LIST_OPERATORS and not isinstance(value, list):
        raise invalid_argument(f"{where}: op {op!r} needs a list value")
    if operator not in LIST_OPERATORS and (value is None or isinstance(value, (list, dict))):
        raise invalid_argument(f"{where}: op {op!r} needs a string, number or boolean value")
    if isinstance(value, float) and not math.isfinite(value):
        raise invalid_argument(f"{where}: value must be a finite number")
    condition = search_pb2.Condition(field=field, op=operator)
    json_format.ParseDict(value, condition.value)
    return condition


def filter_to_proto(body: FilterBody | None) -> search_pb2.Filter:
    search_filter = search_pb2.Filter()
    if body is None:
        return search_filter
    if isinstance(body, dict):
        for field, value in body.items():
            op = "in" if isinstance(value, list) else "=="
            search_filter.conditions.append(condition_to_proto(field, op, value, f"filter.{field}"))
        return search_filter
    for position, condition in enumerate(body):
        search_filter.conditions.append(
            condition_to_proto(condition.field, condition.op, condition.value, f"filter[{position}]")
        )
    return search_filter


def parse_filter_json(text: str) -> search_pb2.Filter:
    """A filter sent as a JSON text (multipart form field)."""
    if not text.strip():
        return search_pb2.Filter()
    try:
        body = FILTER_ADAPTER.validate_json(text)
    except ValidationError as error:
        raise invalid_argument(describe_validation_error(error, prefix="filter")) from None
    return filter_to_proto(body)


# Numbers in form fields: plain decimal text, not all Python's int() and float() take ("1_000", "١٢").
INTEGER_TEXT = re.compile(r"[+-]?[0-9]+")
NUMBER_TEXT = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")


def parse_crop_text(text: str) -> embedder_pb2.CropBox | None:
    """ "x,y,width,height" in pixels; empty means no crop."""
    if not text.strip():
        return None
    parts = [part.strip() for part in text.split(",")]
    if len(parts) != 4 or not all(INTEGER_TEXT.fullmatch(part) and len(part) <= 20 for part in parts):
        raise invalid_argument(f"crop must be four non-negative integers x,y,width,height, not {shown(text)}")
    x, y, width, height = (int(part) for part in parts)
    if min(x, y, width, height) < 0 or max(x, y, width, height) >= 2**32:
        raise invalid_argument(f"crop must be four non-negative integers x,y,width,height, not {shown(text)}")
    return embedder_pb2.CropBox(x=x, y=y, width=width, height=height)


def decode_base64(text: str, where: str) -> bytes:
    """Standard base64, optionally as a data URL ("data:image/png;base64,...")."""
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise invalid_argument(f"{where} is not valid base64") from None


def metadata_to_struct(metadata: object, where: str) -> struct_pb2.Struct:
    if not isinstance(metadata, dict):
        raise invalid_argument(f"{where} must be a JSON object")
    struct = struct_pb2.Struct()
    try:
        struct.update(metadata)
    except (TypeError, ValueError) as error:
        raise invalid_argument(f"{where}: {error}") from None
    return struct


def check_k(k: int) -> int:
    """Only what the proto's uint32 cannot hold; the core checks 1..max_k with the same message as gRPC."""
    if not 0 <= k < 2**32:
        raise invalid_argument(f"k must be 1..max_k, not {k}")
    return k


SEARCH_MODES = {"similar": gateway_pb2.SEARCH_MODE_SIMILAR, "copy": gateway_pb2.SEARCH_MODE_COPY}


def parse_mode(text: str) -> int:
    """A search mode as a form field: "similar" or "copy"; empty means similar."""
    if not text.strip():
        return gateway_pb2.SEARCH_MODE_SIMILAR
    mode = SEARCH_MODES.get(text.strip().lower())
    if mode is None:
        raise invalid_argument(f"mode must be 'similar' or 'copy', not {shown(text)}")
    return mode


def search_body_to_proto(body: SearchBody) -> gateway_pb2.VisualSearchRequest:
    given = [name for name in ("image_base64", "item_id", "text") if getattr(body, name) is not None]
    if len(given) > 1:
        raise invalid_argument(f"give either {given[0]} or {given[1]}, not both")
    request = gateway_pb2.VisualSearchRequest(
        filter=filter_to_proto(body.filter), collection=body.collection, mode=SEARCH_MODES[body.mode],
        page_token=body.page_token,
    )
    if body.k is not None:
        request.k = check_k(body.k)
    if body.image_base64 is not None:
        request.image = decode_base64(body.image_base64, "image_base64")
    elif body.item_id is not None:
        request.item_id = body.item_id
    elif body.text is not None:
        request.text = body.text
    if body.crop is not None:
        request.crop.CopyFrom(embedder_pb2.CropBox(**body.crop.model_dump()))
    if body.min_score is not None:
        request.min_score = body.min_score
    if body.min_probability is not None:
        request.min_probability = body.min_probability
    return request


def batch_query_to_proto(query: JsonValue, position: int) -> gateway_pb2.VisualSearchRequest | ServiceError:
    """One query of POST /v1/search/batch, or its INVALID_ARGUMENT (naming queries[position]): it fails
    alone. Read as JSON again, so that it is held to exactly what POST /v1/search accepts."""
    try:
        return search_body_to_proto(SearchBody.model_validate_json(json.dumps(query)))
    except ValidationError as error:
        return invalid_argument(describe_validation_error(error, prefix=f"queries[{position}]"))
    except ServiceError as error:
        return ServiceError(error.code, f"queries[{position}]: {error.message}")


ON_COPY = {"keep": gateway_pb2.ON_COPY_KEEP, "flag": gateway_pb2.ON_COPY_FLAG, "skip": gateway_pb2.ON_COPY_SKIP}


def parse_on_copy(text: str) -> int:
    """on_copy as a form field: "keep", "flag" or "skip"; empty means keep."""
    if not text.strip():
        return gateway_pb2.ON_COPY_KEEP
    on_copy = ON_COPY.get(text.strip().lower())
    if on_copy is None:
        raise invalid_argument(f"on_copy must be 'keep', 'flag' or 'skip', not {shown(text)}")
    return on_copy


def parse_bool(text: str, where: str) -> bool:
    """A form field's true/false (also 1/0, yes/no, on/off); empty means false."""
    value = text.strip().lower()
    if value in ("", "false", "0", "no", "off"):
        return False
    if value in ("true", "1", "yes", "on"):
        return True
    raise invalid_argument(f"{where} must be true or false, not {shown(text)}")


def stream_options(
    first: gateway_pb2.AddImageRequest, collection: str, on_copy: int, regions: bool
) -> gateway_pb2.AddImageRequest:
    """The request's collection, on_copy and regions, on the stream's first message (they apply to the
    whole stream, as in gRPC's AddImages)."""
    first.collection = collection
    first.on_copy = on_copy
    first.regions = regions
    return first


def image_body_to_proto(body: ImageBody, position: int) -> gateway_pb2.AddImageRequest:
    request = gateway_pb2.AddImageRequest(
        id=body.id or "",
        image=decode_base64(body.image_base64, f"images[{position}].image_base64"),
        image_uri=body.image_uri or "",
    )
    if body.metadata is not None:
        request.metadata.CopyFrom(metadata_to_struct(body.metadata, f"images[{position}].metadata"))
    return request


def parse_json_text(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise invalid_argument(f"{where}: malformed JSON: {error}") from None


def shown(text: str, limit: int = 40) -> str:
    """A caller's text quoted in an error message, cut short."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


def parse_int(text: str, where: str) -> int:
    """Decimal digits with an optional sign (not Python's "1_000" nor "١٢")."""
    text = text.strip()
    if not INTEGER_TEXT.fullmatch(text):
        raise invalid_argument(f"{where} must be an integer, not {shown(text)}")
    if len(text) > 20:  # and int() refuses beyond 4300 digits
        raise invalid_argument(f"{where} is out of range: {shown(text)}")
    return int(text)


def parse_float(text: str, where: str) -> float:
    if not NUMBER_TEXT.fullmatch(text.strip()):
        raise invalid_argument(f"{where} must be a finite number, not {shown(text)}")
    value = float(text.strip())
    if not math.isfinite(value):  # 1e999
        raise invalid_argument(f"{where} must be a finite number")
    return value


# --------------------------------------------------------------------------------- protobuf -> JSON

def float32_json(value: float) -> float:
    """A float32 as the shortest decimal that reads back to it (0.9, not 0.8999999761581421)."""
    return float(f"{value:.7g}") if math.isfinite(value) else value


def struct_json(struct: struct_pb2.Struct) -> dict[str, Any]:
    return json_format.MessageToDict(struct)


def box_json(box: embedder_pb2.CropBox) -> dict[str, int]:
    return {"x": box.x, "y": box.y, "width": box.width, "height": box.height}


def hit_json(hit: gateway_pb2.SearchHit) -> dict[str, Any]:
    body = {
        "id": hit.id, "score": float32_json(hit.score), "image_uri": hit.image_uri,
        "metadata": struct_json(hit.metadata),
        "match_probability": float32_json(hit.match_probability) if hit.HasField("match_probability") else None,
        "matched_region": box_json(hit.matched_region) if hit.HasField("matched_region") else None,
    }
    if hit.HasField("is_copy"):  # copy mode: every hit has a verdict
        box = hit.matched_box
        body["is_copy"] = hit.is_copy
        body["copy_score"] = float32_json(hit.copy_score)
        body["matched_box"] = box_json(box) if hit.HasField("matched_box") else None
    return body


def search_response_json(response: gateway_pb2.VisualSearchResponse) -> dict[str, Any]:
    return {
        "hits": [hit_json(hit) for hit in response.hits],
        "from_cache": response.from_cache,
        "embedding_from_cache": response.embedding_from_cache,
        "timing": {
            "embed_ms": response.timing.embed_ms,
            "search_ms": response.timing.search_ms,
            "total_ms": response.timing.total_ms,
        },
        "index_generation": response.index_generation,
        "model_version": response.model_version,
        "understood_as": response.understood_as,
        "no_match_reason": response.no_match_reason,
        "no_good_match": response.no_good_match,
        "next_page_token": response.next_page_token,
    }


def search_results_json(results: list[gateway_pb2.VisualSearchResult]) -> dict[str, Any]:
    return {"results": [
        {"response": search_response_json(result.response)} if result.code == grpc.StatusCode.OK.value[0]
        else error_body(code_from_int(result.code), result.message)
        for result in results
    ]}


def summary_json(summary: gateway_pb2.AddImagesSummary) -> dict[str, Any]:
    return {
        "received": summary.received,
        "indexed": summary.indexed,
        "failed": summary.failed,
        "failures": [
            {
                "id": failure.id, "code": code_from_int(failure.code).name, "message": failure.message,
                "index": failure.index,
            }
            for failure in summary.failures
        ],
        "index_generation": summary.index_generation,
        "unchanged": summary.unchanged,
        "skipped_copies": summary.skipped_copies,
        "copies": [
            {"id": copy.id, "index": copy.index, "copy_of": copy.copy_of, "copy_score": float32_json(copy.copy_score),
             "skipped": copy.skipped}
            for copy in summary.copies
        ],
    }


def delete_json(response: gateway_pb2.DeleteImagesResponse) -> dict[str, Any]:
    return {"deleted": response.deleted, "index_generation": response.index_generation}


def field_summary_json(summary: search_pb2.FieldSummary) -> dict[str, Any]:
    return {
        "name": summary.name,
        "type": summary.type,
        "present": summary.present,
        "top_values": [{"value": value.value, "count": value.count} for value in summary.top_values],
        "more_values": summary.more_values,
        "min": summary.min if summary.HasField("min") else None,
        "max": summary.max if summary.HasField("max") else None,
    }


def collections_json(response: search_pb2.ListCollectionsResponse) -> dict[str, Any]:
    return {"collections": [
        {"name": summary.name, "count": summary.count, "is_default": summary.is_default, "regions": summary.regions}
        for summary in response.collections
    ]}


def stats_json(stats: gateway_pb2.VisualStatsResponse, with_field_summaries: bool = False) -> dict[str, Any]:
    """`field_summaries` only when they were asked for."""
    body = {
        "count": stats.count,
        "index_type": stats.index_type,
        "metric": stats.metric,
        "index_generation": stats.index_generation,
        "dimension": stats.dimension,
        "model_name": stats.model_name,
        "model_version": stats.model_version,
        "filterable_fields": list(stats.filterable_fields),
        "text_search": stats.text_search,
        "calibrated": stats.calibrated,
        "regions": stats.regions,
    }
    if with_field_summaries:
        body["field_summaries"] = [field_summary_json(summary) for summary in stats.field_summaries]
    return body


def service_error_json(error: ServiceError) -> tuple[int, dict[str, Any]]:
    return http_status(error.code), error_body(error.code, error.message)
