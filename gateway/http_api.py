"""HTTP/JSON API and the web page, served by the gateway process beside gRPC. Handlers call the same
`VisualSearchCore` as the gRPC servicer; every error answers `{"error": {"code", "message"}}` with the
HTTP status of its gRPC code."""

from __future__ import annotations

import logging
import time
from importlib import resources
from typing import Any, AsyncIterable, AsyncIterator, Callable
from urllib.parse import parse_qsl

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.api_keys import UNCHECKED, Authenticator, Caller, bearer_token
from gateway.core import VisualSearchCore
from gateway.http_limits import CLOSE, RequestBodyTimeout, RequestBodyTooLarge, RequestGuard
from gateway.http_models import (
    AddImagesBody,
    AddImagesResponseBody,
    CollectionsResponseBody,
    DeleteResponseBody,
    DropCollectionResponseBody,
    ErrorResponse,
    HealthBody,
    SearchBatchBody,
    SearchBatchEnvelope,
    SearchBatchResponseBody,
    SearchBody,
    SearchResponseBody,
    StatsResponseBody,
    ON_COPY,
    batch_query_to_proto,
    check_k,
    code_for_http_status,
    collections_json,
    delete_json,
    describe_validation_error,
    error_body,
    image_body_to_proto,
    metadata_to_struct,
    parse_bool,
    parse_crop_text,
    parse_filter_json,
    parse_float,
    parse_int,
    parse_json_text,
    parse_mode,
    parse_on_copy,
    search_body_to_proto,
    search_response_json,
    search_results_json,
    service_error_json,
    shown,
    stats_json,
    stream_options,
    summary_json,
)
from gateway.local_files import LocalImageFiles
from gateway.metrics import HttpMetrics
from gateway.rate_limit import RateLimited, RateLimiter
from gateway.readiness import Readiness
from gateway.settings import GatewaySettings
from service_kit.status import ServiceError, invalid_argument
from vsearch.v1 import gateway_pb2, search_pb2

logger = logging.getLogger(__name__)

SEARCH_FORM_FIELDS = {
    "image", "item_id", "text", "k", "min_score", "min_probability", "crop", "filter", "collection", "mode",
    "page_token",
}
# A multipart batch: several query images, the same options for each (no page_token: each query pages alone).
PER_QUERY_FORM_FIELDS = frozenset({"image", "item_id", "text", "page_token"})
BATCH_FORM_FIELDS = {"images", *SEARCH_FORM_FIELDS - PER_QUERY_FORM_FIELDS}
ADD_FILE_FIELDS = frozenset({"images", "image"})
ADD_FORM_FIELDS = {*ADD_FILE_FIELDS, "ids", "metadata", "image_uris", "collection", "on_copy", "regions"}
FORM_CONTENT_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
# nginx's status for a request whose client went away before the answer; CANCELLED in gRPC's terms.
CLIENT_CLOSED_REQUEST = 499

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in [
        (400, "Bad request (INVALID_ARGUMENT)"),
        (401, "No API key, or a wrong one (UNAUTHENTICATED)"),
        (403, "The API key lacks the scope this call needs (PERMISSION_DENIED)"),
        (404, "Not found (NOT_FOUND)"),
        (408, "The request was not all received in time (DEADLINE_EXCEEDED)"),
        (413, "Request body too large (RESOURCE_EXHAUSTED)"),
        (429, "Over the API key's rate limit; Retry-After says when to retry (RESOURCE_EXHAUSTED)"),
        (431, "Request line and headers too large (RESOURCE_EXHAUSTED)"),
        (503, "A downstream service is unavailable, or too many connections (UNAVAILABLE)"),
        (504, "A downstream call ran out of time (DEADLINE_EXCEEDED)"),
    ]
}

SEARCH_FORM_SCHEMA = {
    "type": "object",
    "properties": {
        "image": {"type": "string", "format": "binary", "description": "The query image."},
        "item_id": {"type": "string", "description": "Instead of an image: search with this item's stored vector."},
        "text": {"type": "string", "description": "Instead of an image: search by words (stats' text_search says how)."},
        "collection": {"type": "string", "description": "Which catalog; empty for the default one."},
        "k": {"type": "integer", "minimum": 1},
        "min_score": {"type": "number"},
        "min_probability": {"type": "number", "description": "0..1; needs a calibrated model (stats' calibrated)."},
        "crop": {"type": "string", "description": "x,y,width,height in pixels", "example": "10,10,200,150"},
        "filter": {
            "type": "string",
            "description": 'JSON: [{"field": "category", "op": "==", "value": "shoes"}] or {"category": "shoes"}',
        },
        "mode": {
            "type": "string", "enum": ["similar", "copy"], "default": "similar",
            "description": "copy: is the query (image or item_id) a copy of catalog images? Copies first, by "
                           "copy_score; hits carry is_copy, copy_score and matched_box.",
        },
        "page_token": {
            "type": "string",
            "description": "A previous response's next_page_token, with the same query, for the next hits.",
        },
    },
}

ADD_FORM_SCHEMA = {
    "type": "object",
    "required": ["images"],
    "properties": {
        "images": {"type": "array", "items": {"type": "string", "format": "binary"}},
        "ids": {"type": "string", "description": "JSON list of ids, one per file (default: sha256 of the bytes)"},
        "metadata": {"type": "string", "description": "JSON: one object for every file, or a list of one per file"},
        "image_uris": {"type": "string", "description": "JSON list of image URIs, one per file"},
        "collection": {"type": "string", "description": "Which catalog; empty for the default one."},
        "on_copy": {
            "type": "string", "enum": list(ON_COPY), "default": "keep",
            "description": "An image that is a verified copy of one already stored: keep (unchecked), flag "
                           "(metadata copy_of) or skip (not written).",
        },
        "regions": {"type": "boolean", "default": False, "description": "Also index each image's regions."},
    },
}


BATCH_FORM_SCHEMA = {
    "type": "object",
    "properties": {
        "images": {"type": "array", "items": {"type": "string", "format": "binary"},
                   "description": "The query images, one query each (1..GATEWAY_MAX_BATCH_QUERIES)."},
        **{name: schema for name, schema in SEARCH_FORM_SCHEMA["properties"].items()
           if name not in PER_QUERY_FORM_FIELDS},
    },
}


def request_body_doc(json_model: type[BaseModel], form_schema: dict[str, Any] | None = None) -> dict[str, Any]:
    content: dict[str, Any] = {"application/json": {"schema": {"$ref": f"#/components/schemas/{json_model.__name__}"}}}
    if form_schema is not None:
        content["multipart/form-data"] = {"schema": form_schema}
    return {"requestBody": {"required": True, "content": content}}


class HttpMetricsMiddleware:
    """Counts and times HTTP requests by route template (not raw path: ids would explode the labels)."""

    def __init__(self, app: ASGIApp, registry: CollectorRegistry) -> None:
        self.app = app
        self.metrics = HttpMetrics(registry)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.observe(scope["method"], route, status, time.perf_counter() - started)


def json_error(code: grpc.StatusCode, message: str, status: int) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status)


def content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def is_json(media_type: str) -> bool:
    return media_type == "application/json" or media_type.endswith("+json")


def check_form_fields(form: FormData, known: set[str], repeatable: frozenset[str] = frozenset()) -> None:
    """Unknown fields, and a field sent more than once that takes one value, are refused (rather than
    one of its values silently used)."""
    unknown = sorted(set(form.keys()) - known)
    if unknown:
        raise invalid_argument(f"unknown form field(s) {', '.join(unknown)}; expected {', '.join(sorted(known))}")
    for name in sorted(set(form.keys()) - repeatable):
        if (count := len(form.getlist(name))) > 1:
            raise invalid_argument(f"form field {name!r} was sent {count} times; send it once")


def form_text(form: FormData, name: str) -> str | None:
    value = form.get(name)
    if value is None:
        return None
    if isinstance(value, UploadFile):
        raise invalid_argument(f"form field {name!r} must be text, not a file")
    return value


async def search_request_from_form(form: FormData) -> gateway_pb2.VisualSearchRequest:
    check_form_fields(form, SEARCH_FORM_FIELDS)
    request = gateway_pb2.VisualSearchRequest()
    image = form.get("image")
    item_id = form_text(form, "item_id")
    text = form_text(form, "text")
    present = (("an image", image is not None), ("an item_id", item_id), ("a text", text is not None))
    given = [name for name, value in present if value]
    if len(given) > 1:
        raise invalid_argument(f"give either {given[0]} or {given[1]}, not both")
    if image is not None:
        if not isinstance(image, UploadFile):
            raise invalid_argument("form field 'image' must be a file")
        request.image = await image.read()
    elif text is not None:  # an empty one is refused as such ("text is empty")
        request.text = text
    elif item_id is not None:
        request.item_id = item_id
    read_search_options(form, request)
    return request


def read_search_options(form: FormData, request: gateway_pb2.VisualSearchRequest) -> None:
    """A search form's fields other than the query itself, into `request`."""
    if (k := form_text(form, "k")) not in (None, ""):
        request.k = check_k(parse_int(k, "k"))
    if (min_score := form_text(form, "min_score")) not in (None, ""):
        request.min_score = parse_float(min_score, "min_score")
    if (min_probability := form_text(form, "min_probability")) not in (None, ""):
        request.min_probability = parse_float(min_probability, "min_probability")
    if (crop := parse_crop_text(form_text(form, "crop") or "")) is not None:
        request.crop.CopyFrom(crop)
    request.filter.CopyFrom(parse_filter_json(form_text(form, "filter") or ""))
    request.collection = form_text(form, "collection") or ""
    request.mode = parse_mode(form_text(form, "mode") or "")
    request.page_token = form_text(form, "page_token") or ""


async def batch_requests_from_form(form: FormData) -> list[gateway_pb2.VisualSearchRequest]:
    """A multipart batch: one query per file of `images`, every other field (as /v1/search's form takes
    them) applying to each."""
    check_form_fields(form, BATCH_FORM_FIELDS, repeatable=frozenset({"images"}))
    files = form.getlist("images")
    if not files:
        raise invalid_argument("send the query images as file fields named 'images' (or a JSON batch)")
    if any(not isinstance(file, UploadFile) for file in files):
        raise invalid_argument("form field 'images' must hold files")
    options = gateway_pb2.VisualSearchRequest()
    read_search_options(form, options)
    requests = []
    for file in files:
        request = gateway_pb2.VisualSearchRequest()
        request.CopyFrom(options)
        request.image = await file.read()
        requests.append(request)
    return requests


def optional_json_list(form: FormData, name: str, count: int) -> list[Any] | None:
    text = form_text(form, name)
    if text is None or not text.strip():
        return None
    value = parse_json_text(text, name)
    if not isinstance(value, list) or len(value) != count:
        raise invalid_argument(f"{name} must be a JSON list with one entry per file ({count})")
    return value


def add_requests_from_form(form: FormData) -> AsyncIterator[gateway_pb2.AddImageRequest]:
    check_form_fields(form, ADD_FORM_FIELDS, repeatable=ADD_FILE_FIELDS)
    files = [*form.getlist("images"), *form.getlist("image")]
    if not files:
        raise invalid_argument("send the images as file field(s) named 'images'")
    if any(not isinstance(file, UploadFile) for file in files):
        raise invalid_argument("form field 'images' must hold files")
    ids = optional_json_list(form, "ids", len(files))
    uris = optional_json_list(form, "image_uris", len(files))
    metadata_text = form_text(form, "metadata")
    metadata: list[Any] = [None] * len(files)
    if metadata_text and metadata_text.strip():
        parsed = parse_json_text(metadata_text, "metadata")
        if isinstance(parsed, list):
            if len(parsed) != len(files):
                raise invalid_argument(f"metadata must be one object, or a list of one per file ({len(files)})")
            metadata = parsed
        else:
            metadata = [parsed] * len(files)
    structs = [
        None if entry is None else metadata_to_struct(entry, f"metadata[{n}]") for n, entry in enumerate(metadata)
    ]
    for n, value in enumerate(ids or []):
        if not isinstance(value, str):
            raise invalid_argument(f"ids[{n}] must be a string")
    for n, value in enumerate(uris or []):
        if not isinstance(value, str):
            raise invalid_argument(f"image_uris[{n}] must be a string")
    collection = form_text(form, "collection") or ""
    on_copy = parse_on_copy(form_text(form, "on_copy") or "")
    regions = parse_bool(form_text(form, "regions") or "", "regions")

    async def requests() -> AsyncIterator[gateway_pb2.AddImageRequest]:
        for n, file in enumerate(files):
            request = gateway_pb2.AddImageRequest(
                id=ids[n] if ids else "", image=await file.read(), image_uri=uris[n] if uris else ""
            )
            if structs[n] is not None:
                request.metadata.CopyFrom(structs[n])
            yield stream_options(request, collection, on_copy, regions) if n == 0 else request

    return requests()


def http_operation(path: str) -> str | None:
    """The operation a /v1/ path stands for, whose scope its key needs (see gateway/api_keys.py); None
    for a path that is none (it then only needs a valid key, and gets its 404 or 405)."""
    if path == "/v1/search":
        return "Search"
    if path == "/v1/search/batch":
        return "SearchBatch"
    if path == "/v1/stats":
        return "Stats"
    if path == "/v1/collections":
        return "ListCollections"
    if path.startswith("/v1/collections/"):
        return "DropCollection"
    if path == "/v1/files":
        return "GetFile"
    if path == "/v1/images":
        return "AddImages"
    if path.startswith("/v1/images/"):
        return "DeleteImages"
    return None


def caller_of(request: Request) -> Caller:
    """Who sent the request, as `ApiKeyMiddleware` found out."""
    return getattr(request.state, "caller", UNCHECKED)


class ApiKeyMiddleware:
    """With API keys configured, every /v1/ call must carry a key (`X-API-Key: KEY` or
    `Authorization: Bearer KEY`) whose scopes cover it: 401 UNAUTHENTICATED without a valid key, 403
    PERMISSION_DENIED outside its scopes. The caller it finds is left in the request's state for the
    rate limits. The page, the docs, /healthz and /metrics stay open (probes and scrapers carry no key;
    the NetworkPolicy limits who reaches /metrics)."""

    def __init__(self, app: ASGIApp, authenticator: Authenticator) -> None:
        self.app = app
        self.authenticator = authenticator

    @staticmethod
    def _presented(scope: Scope) -> str | None:
        if scope["path"] == "/v1/files":
            # <img> tags cannot send headers: thumbnails carry the key as a query parameter.
            for name, value in parse_qsl(scope.get("query_string", b"").decode("latin-1")):
                if name == "api_key":
                    return value
        headers = dict(scope.get("headers") or [])
        if b"x-api-key" in headers:
            return headers[b"x-api-key"].decode("latin-1").strip()
        return bearer_token(headers.get(b"authorization", b"").decode("latin-1"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/") and self.authenticator.required:
            try:
                caller = self.authenticator.admit(self._presented(scope), http_operation(scope["path"]))
            except ServiceError as error:
                status, body = service_error_json(error)
                response = JSONResponse(body, status_code=status)
                if status == 401:
                    response.headers["WWW-Authenticate"] = "Bearer"
                await response(scope, receive, send)
                return
            scope.setdefault("state", {})["caller"] = caller
        await self.app(scope, receive, send)


def create_app(
    core: VisualSearchCore,
    settings: GatewaySettings,
    registry: CollectorRegistry,
    readiness: Callable[[], Readiness],
    authenticator: Authenticator | None = None,
    limiter: RateLimiter | None = None,
) -> FastAPI:
    """Without an authenticator nothing is checked; without a limiter nothing is limited."""
    app = FastAPI(
        title="vsearch gateway",
        version="1",
        description="Visual search: send an image, get visually similar catalog images back.",
        responses=ERROR_RESPONSES,
    )
    app.add_middleware(
        RequestGuard, max_head_bytes=settings.http.max_header_bytes, max_bytes=settings.http_max_body_bytes,
        timeout_s=settings.http.body_timeout_s,
    )
    if authenticator is not None and authenticator.required:
        app.add_middleware(ApiKeyMiddleware, authenticator=authenticator)
    if settings.cors.allow_origins:
        # Outside the key check: preflights carry no key, and a 401 or 429 must be readable by the page.
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors.allow_origins, allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type"], expose_headers=["Retry-After"],
            max_age=settings.cors.max_age_s,
        )
    app.add_middleware(HttpMetricsMiddleware, registry=registry)
    index_html = resources.files("gateway").joinpath("static/index.html").read_text(encoding="utf-8")

    # ---------------------------------------------------------------------------- error handling

    @app.exception_handler(ServiceError)
    async def on_service_error(_request: Request, error: ServiceError) -> JSONResponse:
        status, body = service_error_json(error)
        return JSONResponse(body, status_code=status)

    @app.exception_handler(RateLimited)
    async def on_rate_limited(_request: Request, error: RateLimited) -> JSONResponse:
        return JSONResponse(
            error_body(error.code, error.message), status_code=429, headers={"Retry-After": error.retry_after_header}
        )

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_request: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in item['loc'])}: {item['msg']}" for item in error.errors()
        )
        return json_error(grpc.StatusCode.INVALID_ARGUMENT, problems or "invalid request", 400)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_request: Request, error: StarletteHTTPException) -> JSONResponse:
        return json_error(code_for_http_status(error.status_code), str(error.detail), error.status_code)

    @app.exception_handler(RequestBodyTooLarge)
    async def on_body_too_large(_request: Request, error: RequestBodyTooLarge) -> JSONResponse:
        return json_error(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error), 413)

    @app.exception_handler(RequestBodyTimeout)
    async def on_body_timeout(request: Request, error: RequestBodyTimeout) -> JSONResponse:
        # The connection closes: a client this slow is not waited for any longer.
        logger.info("HTTP 408 in %s %s: %s", request.method, request.url.path, error)
        return JSONResponse(
            error_body(grpc.StatusCode.DEADLINE_EXCEEDED, str(error)), status_code=408, headers=CLOSE
        )

    @app.exception_handler(ClientDisconnect)
    async def on_client_disconnect(request: Request, _error: ClientDisconnect) -> Response:
        # The client went away before its request was read: nothing to answer, nothing wrong here.
        # 499 ("client closed request") is what /metrics counts; nobody receives it.
        logger.debug("client disconnected during %s %s", request.method, request.url.path)
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, _error: Exception) -> JSONResponse:
        logger.exception("unhandled error in %s %s", request.method, request.url.path)
        return json_error(grpc.StatusCode.INTERNAL, f"internal error in {request.method} {request.url.path}", 500)

    def require_body_type(request: Request) -> str:
        media_type = content_type(request)
        if not (is_json(media_type) or media_type in FORM_CONTENT_TYPES):
            raise invalid_argument(
                f"unsupported content type {shown(media_type) if media_type else '(none)'}: "
                "send application/json or multipart/form-data"
            )
        return media_type

    async def parse_json_body(request: Request, model: type[BaseModel]) -> Any:
        try:
            return model.model_validate_json(await request.body())
        except ValidationError as error:
            raise invalid_argument(describe_validation_error(error)) from None

    # -------------------------------------------------------------------------------------- API

    @app.post(
        "/v1/search", response_model=SearchResponseBody, tags=["search"],
        summary="Search by image (multipart or base64 JSON), by an indexed item's id, or by words (`text`)",
        openapi_extra=request_body_doc(SearchBody, SEARCH_FORM_SCHEMA),
    )
    async def search(request: Request) -> JSONResponse:
        if limiter is not None:  # before the body is read: a refused search costs nothing more
            await limiter.limit_search(caller_of(request))
        if is_json(require_body_type(request)):
            search_request = search_body_to_proto(await parse_json_body(request, SearchBody))
        else:
            async with request.form(max_part_size=settings.http_max_body_bytes) as form:
                search_request = await search_request_from_form(form)
        return JSONResponse(search_response_json(await core.search(search_request)))

    @app.post(
        "/v1/search/batch", response_model=SearchBatchResponseBody, tags=["search"],
        summary="Several searches in one call, each answered as /v1/search answers it, in order; a query that "
        "fails gets its own error. JSON: any queries; multipart: several image files (`images`) with the same "
        "options. Each query counts against the API key's search rate limit.",
        openapi_extra=request_body_doc(SearchBatchBody, BATCH_FORM_SCHEMA),
    )
    async def search_batch(request: Request) -> JSONResponse:
        if is_json(require_body_type(request)):
            envelope: SearchBatchEnvelope = await parse_json_body(request, SearchBatchEnvelope)
            queries = [batch_query_to_proto(query, position) for position, query in enumerate(envelope.queries)]
        else:
            async with request.form(max_part_size=settings.http_max_body_bytes) as form:
                queries = await batch_requests_from_form(form)
        caller = caller_of(request)
        charge = None if limiter is None else (lambda: limiter.limit_search(caller))  # once per query
        return JSONResponse(search_results_json(await core.search_batch(queries, charge=charge)))

    @app.post(
        "/v1/images", response_model=AddImagesResponseBody, tags=["catalog"],
        summary="Add (or replace) images; bad items are reported in the summary, not fatal",
        openapi_extra=request_body_doc(AddImagesBody, ADD_FORM_SCHEMA),
    )
    async def add_images(request: Request) -> JSONResponse:
        caller = caller_of(request)

        def charged(requests: AsyncIterable[gateway_pb2.AddImageRequest]) -> AsyncIterable[gateway_pb2.AddImageRequest]:
            # Each item's image bytes go to the caller's write bucket as the core reads it.
            return requests if limiter is None else limiter.charging_writes(caller, requests)

        if is_json(require_body_type(request)):
            body: AddImagesBody = await parse_json_body(request, AddImagesBody)
            decoded = [image_body_to_proto(image, n) for n, image in enumerate(body.images)]
            if decoded:
                stream_options(decoded[0], body.collection, ON_COPY[body.on_copy], body.regions)

            async def from_json() -> AsyncIterator[gateway_pb2.AddImageRequest]:
                for item in decoded:
                    yield item

            summary = await core.add_images(charged(from_json()))
        else:
            # The files are read one by one as the core consumes them, so the form stays open until then.
            async with request.form(max_part_size=settings.http_max_body_bytes) as form:
                summary = await core.add_images(charged(add_requests_from_form(form)))
        return JSONResponse(summary_json(summary))

    @app.delete(
        # `:path` so that ids holding "/" (sent as %2F or plainly) can be deleted too.
        "/v1/images/{image_id:path}", response_model=DeleteResponseBody, tags=["catalog"],
        summary="Delete one image; 404 if there was none with this id",
    )
    async def delete_image(image_id: str, collection: str = "") -> JSONResponse:
        response = await core.delete_images(gateway_pb2.DeleteImagesRequest(ids=[image_id], collection=collection))
        if response.deleted == 0:
            return json_error(grpc.StatusCode.NOT_FOUND, f"no image with id {image_id!r}", 404)
        return JSONResponse(delete_json(response))

    local_files = LocalImageFiles(settings.image_roots)

    @app.get(
        "/v1/files", tags=["catalog"], response_class=FileResponse,
        summary="An indexed image stored as a file:// URI under GATEWAY_IMAGE_ROOTS (404 for anything else)",
    )
    async def local_file(uri: str) -> Response:
        found = local_files.resolve(uri) if local_files.enabled else None
        if found is None:
            return json_error(grpc.StatusCode.NOT_FOUND, "no servable image at that uri", 404)
        path, media_type = found
        return FileResponse(path, media_type=media_type, headers={"Cache-Control": "private, max-age=3600"})

    @app.get(
        "/v1/stats", response_model=StatsResponseBody, tags=["catalog"],
        summary="Index and model statistics; with field_summaries=true, what each filterable field holds",
    )
    async def stats(collection: str = "", field_summaries: bool = False) -> JSONResponse:
        response = await core.stats(
            gateway_pb2.VisualStatsRequest(collection=collection, with_field_summaries=field_summaries)
        )
        return JSONResponse(stats_json(response, with_field_summaries=field_summaries))

    @app.get(
        "/v1/collections", response_model=CollectionsResponseBody, tags=["catalog"],
        summary="The collections the catalog holds, ordered by name (the default one always)",
    )
    async def collections() -> JSONResponse:
        return JSONResponse(collections_json(await core.list_collections()))

    @app.delete(
        "/v1/collections/{name}", response_model=DropCollectionResponseBody, tags=["catalog"],
        summary="Drop a whole collection (the admin scope); 404 if there was none by that name, 400 "
        "FAILED_PRECONDITION for the default one",
    )
    async def drop_collection(name: str) -> JSONResponse:
        response = await core.drop_collection(search_pb2.DropCollectionRequest(collection=name))
        if not response.dropped:
            return json_error(grpc.StatusCode.NOT_FOUND, f"no collection named {name!r}", 404)
        return JSONResponse({"dropped": True, "index_generation": response.generation})

    @app.get(
        "/healthz", response_model=HealthBody, tags=["operations"],
        summary="200 once both downstream services answered; 503 before that, while one has been unavailable "
        "for longer than GATEWAY_DOWNSTREAM_GRACE_S (named in `unavailable`), and while draining",
    )
    async def healthz() -> JSONResponse:
        state = readiness()
        return JSONResponse(state.json(), status_code=200 if state.serving else 503)

    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics", response_class=Response)
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def web_page() -> HTMLResponse:
        return HTMLResponse(index_html)

    # The JSON request bodies are parsed by hand (one path takes JSON or multipart), so their schemas
    # are added to the OpenAPI components here for the `$ref`s in `request_body_doc`.
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            _, definitions = models_json_schema(
                [(SearchBody, "validation"), (SearchBatchBody, "validation"), (AddImagesBody, "validation")],
                ref_template="#/components/schemas/{model}",
            )
            schemas = schema.setdefault("components", {}).setdefault("schemas", {})
            schemas.update(definitions.get("$defs", {}))
            # Validation errors answer 400 with the common error shape, never FastAPI's 422.
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
            schemas.pop("HTTPValidationError", None)
            schemas.pop("ValidationError", None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
