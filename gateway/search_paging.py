"""Search's pages (VisualSearchRequest.page_token, VisualSearchResponse.next_page_token): which ranked hits
a page holds, and the opaque token that asks for the next one.

A page is a slice of the query's ranking: hits [offset, end). Each page is searched afresh, as deep as its
end (plus one hit, to know whether another page follows), and cut out of that answer; so pages join up
exactly while the index stays at one generation, which the token carries and the next page checks (the
index generation the result cache uses). A token is the urlsafe base64 of a version, the next page's
offset, that generation, the copy shortlist the pages walk (copy mode; 0 in similar mode), a fingerprint
of the query (every request field except `page_token` and `k`, the image by its sha256) and a check
over all of it: a token altered by hand, or sent with another query, is refused rather than followed
somewhere else."""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from dataclasses import dataclass

import grpc

from service_kit.status import ServiceError, invalid_argument
from vsearch.v1 import gateway_pb2

_VERSION = 1
# version, offset, generation, copy shortlist, query fingerprint.
_BODY = struct.Struct(">BIQH16s")
_CHECK_BYTES = 8
_CHECK_SALT = b"vsearch page token"


def _check(body: bytes) -> bytes:
    return hashlib.sha256(_CHECK_SALT + body).digest()[:_CHECK_BYTES]


def query_fingerprint(request: gateway_pb2.VisualSearchRequest, text: str = "", image_sha256: str = "") -> bytes:
    """What makes two requests the same query for paging: every field but `page_token` and `k`, the image
    by its sha256 (`image_sha256`, hex, when the caller has it already: hashing a large image again would
    cost a cache hit a good part of its time), a text as normalised (`text`), no mode as similar mode."""
    same = gateway_pb2.VisualSearchRequest()
    same.CopyFrom(request)
    same.ClearField("page_token")
    same.ClearField("k")
    if same.WhichOneof("query") == "image":
        same.image = bytes.fromhex(image_sha256) if image_sha256 else hashlib.sha256(request.image).digest()
    elif same.WhichOneof("query") == "text":
        same.text = text or request.text
    if same.mode == gateway_pb2.SEARCH_MODE_UNSPECIFIED:
        same.mode = gateway_pb2.SEARCH_MODE_SIMILAR
    return hashlib.sha256(same.SerializeToString(deterministic=True)).digest()[:16]


@dataclass(frozen=True)
class PageToken:
    offset: int
    generation: int
    # Copy mode: the depth of the shortlist every page ranks (the first page's); 0 in similar mode.
    copy_shortlist: int
    fingerprint: bytes

    def encode(self) -> str:
        body = _BODY.pack(_VERSION, self.offset, self.generation, self.copy_shortlist, self.fingerprint)
        return base64.urlsafe_b64encode(body + _check(body)).decode("ascii").rstrip("=")

    @classmethod
    def decode(cls, text: str) -> PageToken:
        """INVALID_ARGUMENT naming page_token for anything this gateway did not make."""
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        except (ValueError, binascii.Error):
            raw = b""
        body, check = raw[:_BODY.size], raw[_BODY.size:]
        if len(raw) != _BODY.size + _CHECK_BYTES or check != _check(body) or body[0] != _VERSION:
            raise invalid_argument(
                f"page_token {text[:40]!r} is not a token this gateway made: send a previous response's "
                "next_page_token as it is, with the same query, or none for the first page"
            )
        _version, offset, generation, copy_shortlist, fingerprint = _BODY.unpack(body)
        return cls(offset, generation, copy_shortlist, fingerprint)

    def check_query(self, fingerprint: bytes) -> None:
        if fingerprint != self.fingerprint:
            raise invalid_argument(
                "page_token was made for another query: send it with the same query as the page it came with "
                "(every field as it was, except k), or search without it for the first page"
            )

    def check_generation(self, current: int) -> None:
        if current != self.generation:
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"page_token: the index changed since the first page was computed (index_generation "
                f"{self.generation}, now {current}); search again from the first page",
            )


@dataclass(frozen=True)
class Page:
    """The ranked hits [offset, end) a request asks for, and how deep its pages may go (`limit`)."""

    offset: int
    end: int
    limit: int

    @classmethod
    def of(cls, offset: int, k: int, limit: int) -> Page:
        """A first page holds k hits (however large); the next ones end at `limit` at most."""
        return cls(offset, offset + k if offset == 0 else min(offset + k, limit), limit)

    @property
    def may_continue(self) -> bool:
        """Whether a next page may follow this one (it would start before `limit`)."""
        return self.end < self.limit

    @property
    def fetch(self) -> int:
        """Hits to rank: up to the page's end, and one more when a next page may follow, to know whether
        there is one."""
        return self.end + 1 if self.may_continue else self.end
