"""List's pages: the page size a request asks for and the opaque page token, which carries the stored
id (item_codec.encode_id) the previous page ended at; both backends list in stored-id order and resume
after it (keyset pagination), so a page costs the same however deep into the collection it is."""

from __future__ import annotations

import base64
import binascii
import hashlib

from search_svc import columns
from search_svc.filters import has_control_chars
from service_kit.status import invalid_argument

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
_TOKEN_PREFIX = "v1:"


def page_size(requested: int) -> int:
    """1..MAX_PAGE_SIZE; 0 means the default."""
    if requested == 0:
        return DEFAULT_PAGE_SIZE
    if requested > MAX_PAGE_SIZE:
        raise invalid_argument(f"page_size must be 1..{MAX_PAGE_SIZE} (0 for {DEFAULT_PAGE_SIZE}), not {requested}")
    return requested


def _check(payload: str) -> str:
    return hashlib.sha256(payload.encode()).hexdigest()[:8]


def page_token(last_stored_id: str) -> str:
    # With a short check, so that a token altered by hand is refused rather than silently resumed elsewhere.
    payload = _TOKEN_PREFIX + last_stored_id
    return base64.urlsafe_b64encode(f"{payload}|{_check(payload)}".encode()).decode("ascii")


def after_stored_id(token: str) -> str:
    """The stored id a page token resumes after; "" for no token (the first page)."""
    if not token:
        return ""
    try:
        payload, _, check = base64.urlsafe_b64decode(token.encode("ascii")).decode().rpartition("|")
    except (ValueError, binascii.Error, UnicodeError):
        payload, check = "", ""
    stored_id = payload[len(_TOKEN_PREFIX):]
    if (check != _check(payload) or not payload.startswith(_TOKEN_PREFIX) or not stored_id or len(stored_id.encode()) > columns.ID_MAX_BYTES
            or has_control_chars(stored_id)):  # stored ids have their control characters encoded
        raise invalid_argument(
            f"page_token {token[:40]!r} is not a token this service made: pass a previous page's next_page_token "
            "as it is, or none for the first page"
        )
    return stored_id
