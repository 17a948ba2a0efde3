"""API keys: their format, the file that holds their hashes, and who a request's key says its caller is.

A key is `vs_<key id>_<secret>`: the key id (16 hex digits) names it in the file, the secret is 32 random
bytes in base64url. The file holds only the SHA-256 of each secret, one JSON object a line:

    {"name": "shop-frontend", "key_id": "3f9c0a1b2c3d4e5f", "hash": "sha256:<hex>", "scopes": ["search"],
     "created": "2025-01-31T12:00:00Z"}

(blank lines and lines starting with `#` are skipped). A plain SHA-256 is enough: the secrets are 256-bit
random tokens, not passwords, so there is nothing to guess and no reason for a slow hash on every request;
the presented secret's hash is compared with `hmac.compare_digest`.

Scopes: `search` (Search, SearchBatch, Stats, ListImages, ListCollections, the page's thumbnails), `write`
(AddImages, DeleteImages) and `admin` (DropCollection), which implies the other two. `GATEWAY_API_KEY`, when set,
is one more key with every scope. With no keys at all (no file, no `GATEWAY_API_KEY`) nothing is checked."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import grpc
from prometheus_client import CollectorRegistry

from gateway.metrics import AuthMetrics
from service_kit.status import ServiceError

if TYPE_CHECKING:  # the settings read this module's key files, so no import at run time
    from gateway.settings import GatewaySettings

logger = logging.getLogger(__name__)

Clock = Callable[[], float]

SCOPES = ("search", "write", "admin")
# What each scope grants: admin is a superset, so one operator key can do everything.
GRANTS: dict[str, frozenset[str]] = {
    "search": frozenset({"search"}),
    "write": frozenset({"write"}),
    "admin": frozenset(SCOPES),
}
# The scope each operation needs, on either protocol (`GetFile` is HTTP's /v1/files, the page's thumbnails).
OPERATION_SCOPES: dict[str, str] = {
    "Search": "search",
    "SearchBatch": "search",
    "Stats": "search",
    "ListImages": "search",
    "ListCollections": "search",
    "GetFile": "search",
    "AddImages": "write",
    "DeleteImages": "write",
    "DropCollection": "admin",
}

TOKEN_PREFIX = "vs"
KEY_ID_RE = re.compile(r"[0-9a-f]{16}")
SECRET_BYTES = 32
HASH_PREFIX = "sha256:"
HASH_RE = re.compile(r"sha256:[0-9a-f]{64}")
MAX_NAME_LENGTH = 64
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# The name `GATEWAY_API_KEY` goes by, in metrics and messages.
LEGACY_KEY_NAME = "GATEWAY_API_KEY"


class KeyFileError(ValueError):
    """The keys file cannot be read or holds something that is not a key entry (a ValueError, so that
    the settings report it as an invalid GATEWAY_AUTH__KEYS_FILE)."""


# ------------------------------------------------------------------------------------------- keys

def hash_secret(secret: str) -> str:
    return HASH_PREFIX + hashlib.sha256(secret.encode()).hexdigest()


def split_token(token: str) -> tuple[str, str] | None:
    """(key id, secret) of a `vs_<key id>_<secret>` token; None for anything else."""
    prefix, _, rest = token.partition("_")
    key_id, _, secret = rest.partition("_")
    if prefix != TOKEN_PREFIX or not KEY_ID_RE.fullmatch(key_id) or not secret:
        return None
    return key_id, secret


def check_name(name: str) -> str:
    if len(name) > MAX_NAME_LENGTH or not NAME_RE.fullmatch(name):
        raise ValueError(
            f"a key name is 1-{MAX_NAME_LENGTH} letters, digits, '.', '_' or '-', starting with a letter or digit; "
            f"got {name!r}"
        )
    return name


def check_scopes(scopes: Iterable[str]) -> tuple[str, ...]:
    given = tuple(dict.fromkeys(scopes))
    unknown = [scope for scope in given if scope not in SCOPES]
    if unknown or not given:
        raise ValueError(f"scopes must be one or more of {', '.join(SCOPES)}; got {', '.join(given) or 'none'}")
    return given


@dataclass(frozen=True)
class ApiKeyEntry:
    """One line of the keys file: everything about a key except the key."""

    name: str
    key_id: str
    hash: str
    scopes: tuple[str, ...]
    created: str

    def json_line(self) -> str:
        return json.dumps(dataclasses.asdict(self) | {"scopes": list(self.scopes)}, separators=(", ", ": "))

    @property
    def granted(self) -> frozenset[str]:
        return frozenset().union(*(GRANTS[scope] for scope in self.scopes))


def new_key(name: str, scopes: Iterable[str], now: datetime | None = None) -> tuple[str, ApiKeyEntry]:
    """A fresh key (to show once) and the entry that stores its hash."""
    key_id = secrets.token_hex(8)
    secret = base64.urlsafe_b64encode(secrets.token_bytes(SECRET_BYTES)).rstrip(b"=").decode()
    created = (now or datetime.now(timezone.utc)).strftime("%Y-%m-%dT%H:%M:%SZ")
    entry = ApiKeyEntry(check_name(name), key_id, hash_secret(secret), check_scopes(scopes), created)
    return f"{TOKEN_PREFIX}_{key_id}_{secret}", entry


def parse_entry(line: str, where: str) -> ApiKeyEntry:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as error:
        raise KeyFileError(f"{where}: not JSON ({error.msg})") from None
    fields = {field.name for field in dataclasses.fields(ApiKeyEntry)}
    if not isinstance(value, dict) or set(value) != fields:
        raise KeyFileError(f"{where}: expected an object with exactly the fields {', '.join(sorted(fields))}")
    if not all(isinstance(value[name], str) for name in fields - {"scopes"}) or not isinstance(value["scopes"], list):
        raise KeyFileError(f"{where}: name, key_id, hash and created are strings, scopes a list")
    try:
        entry = ApiKeyEntry(
            check_name(value["name"]), value["key_id"], value["hash"], check_scopes(value["scopes"]), value["created"]
        )
    except (ValueError, TypeError) as error:
        raise KeyFileError(f"{where}: {error}") from None
    if not KEY_ID_RE.fullmatch(entry.key_id):
        raise KeyFileError(f"{where}: key_id must be 16 lowercase hex digits")
    if not HASH_RE.fullmatch(entry.hash):
        raise KeyFileError(f"{where}: hash must be sha256: and 64 lowercase hex digits")
    return entry


def parse_key_file(text: str, path: Path) -> list[ApiKeyEntry]:
    entries: list[ApiKeyEntry] = []
    seen_ids: set[str] = set()
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        entry = parse_entry(line, f"{path}: line {number}")
        if entry.key_id in seen_ids:
            raise KeyFileError(f"{path}: line {number}: key id {entry.key_id} appears twice")
        seen_ids.add(entry.key_id)
        entries.append(entry)
    return entries


def read_key_file(path: Path) -> list[ApiKeyEntry]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise KeyFileError(f"cannot read the keys file {path}: {error}") from None
    return parse_key_file(text, path)


def write_key_file(path: Path, entries: Sequence[ApiKeyEntry], header: Sequence[str] = ()) -> None:
    """Replaces the file at once (a temporary file renamed over it), so a gateway reading it sees the
    old or the new keys, never half a file."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    lines = [*header, *(entry.json_line() for entry in entries)]
    try:
        with open(temporary, "w", encoding="utf-8") as out:
            # Hashes only, useless for calling the gateway: readable by the gateway's user (10001 in
            # the images) wherever the file is mounted.
            os.fchmod(out.fileno(), 0o644)
            out.write("".join(line + "\n" for line in lines))
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------ callers

@dataclass(frozen=True)
class Caller:
    """Who a request comes from: a key (by name), or nobody in particular where no key is needed.
    `bucket` names its rate-limit buckets; None: not rate limited."""

    name: str
    scopes: frozenset[str]
    bucket: str | None


# No keys configured (nothing is checked), or the internal listener: allowed everything, never limited.
UNCHECKED = Caller("", frozenset(SCOPES), None)


class KeyFile:
    """The keys file's entries by key id, reread when the file changes: at most every `check_interval_s`
    a stat of the path (following symlinks, so a Kubernetes Secret volume's swap of its `..data` link
    counts), and a reread only when inode, size or mtime differ. A file that no longer reads keeps the
    keys loaded before (logged), so a half-edited file locks nobody out."""

    def __init__(self, path: Path, check_interval_s: float, clock: Clock = time.monotonic) -> None:
        self.path = Path(path)
        self.check_interval_s = check_interval_s
        self.clock = clock
        self._signature = self._stat()
        self._by_id = {entry.key_id: entry for entry in read_key_file(self.path)}
        self._next_check = clock() + check_interval_s

    def _stat(self) -> tuple[int, int, int, int] | None:
        try:
            stat = os.stat(self.path)
        except OSError:
            return None
        return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns

    def __len__(self) -> int:
        return len(self._by_id)

    def get(self, key_id: str) -> ApiKeyEntry | None:
        if self.clock() >= self._next_check:
            self.reload_if_changed()
        return self._by_id.get(key_id)

    def reload_if_changed(self) -> bool:
        self._next_check = self.clock() + self.check_interval_s
        signature = self._stat()
        if signature == self._signature:
            return False
        self._signature = signature
        try:
            entries = read_key_file(self.path)
        except KeyFileError as error:
            logger.error("API keys not reloaded, keeping the %d loaded before: %s", len(self._by_id), error)
            return False
        self._by_id = {entry.key_id: entry for entry in entries}
        logger.info("API keys reloaded from %s: %d keys", self.path, len(self._by_id))
        return True


def unauthenticated(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.UNAUTHENTICATED, message)


class Authenticator:
    """Turns the key a request presents into its `Caller`, and refuses what the key may not do. The
    messages never repeat the presented key."""

    MISSING = "missing API key: send it as 'Authorization: Bearer KEY' (or 'X-API-Key: KEY')"
    WRONG = "wrong API key: not a key this gateway knows (mistyped, revoked or never created)"

    def __init__(self, key_file: KeyFile | None, legacy_key: str | None, metrics: AuthMetrics | None = None) -> None:
        self.key_file = key_file
        self.metrics = metrics
        self._legacy_hash = hashlib.sha256(legacy_key.encode()).digest() if legacy_key else None
        # Its rate-limit buckets: named by the key's hash, so deployments sharing a Redis with different
        # keys do not share buckets.
        self._legacy_bucket = f"legacy-{self._legacy_hash.hex()[:16]}" if self._legacy_hash else None

    @property
    def required(self) -> bool:
        return self.key_file is not None or self._legacy_hash is not None

    def authenticate(self, token: str | None) -> Caller:
        if not self.required:
            return UNCHECKED
        if not token:
            raise unauthenticated(self.MISSING)
        parts = split_token(token)
        if parts is not None and self.key_file is not None:
            entry = self.key_file.get(parts[0])
            if entry is not None and hmac.compare_digest(hash_secret(parts[1]).encode(), entry.hash.encode()):
                return Caller(entry.name, entry.granted, entry.key_id)
        # Both sides hashed first, so the comparison takes the same time whatever the lengths.
        presented = hashlib.sha256(token.encode()).digest()
        if self._legacy_hash is not None and hmac.compare_digest(presented, self._legacy_hash):
            return Caller(LEGACY_KEY_NAME, frozenset(SCOPES), self._legacy_bucket)
        raise unauthenticated(self.WRONG)

    @staticmethod
    def authorize(caller: Caller, operation: str) -> None:
        scope = OPERATION_SCOPES[operation]
        if scope not in caller.scopes:
            raise ServiceError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"API key {caller.name!r} may not call {operation}: that needs the {scope!r} scope "
                f"(the key has {', '.join(sorted(caller.scopes)) or 'none'})",
            )

    def admit(self, token: str | None, operation: str | None) -> Caller:
        """The caller, if its key may call `operation` (None: any operation, as for an unknown path)."""
        try:
            caller = self.authenticate(token)
            if operation is not None:
                self.authorize(caller, operation)
        except ServiceError as error:
            if self.metrics is not None:
                self.metrics.refused.labels(error.code.name.lower()).inc()
            raise
        return caller


def create_authenticator(settings: GatewaySettings, registry: CollectorRegistry) -> Authenticator:
    auth = settings.auth
    key_file = KeyFile(auth.keys_file, auth.reload_interval_s) if auth.keys_file is not None else None
    legacy_key = settings.api_key.get_secret_value() if settings.api_key is not None else None
    return Authenticator(key_file, legacy_key, AuthMetrics(registry))


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer TOKEN` value; None for another scheme or none."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def token_from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The key a gRPC call carries: `authorization: Bearer KEY`, else `x-api-key: KEY`."""
    values = {key.lower(): value for key, value in metadata or () if isinstance(value, str)}
    return bearer_token(values.get("authorization")) or (values.get("x-api-key") or "").strip() or None
