"""API keys and scopes, shared by REST and gRPC (neither transport imports the other).

Keys are kept only as SHA-256 digests: config parsing turns each `key[:scopes]` entry into
`sha256:<hex>:<scopes>`, so the plaintext does not outlive it (a deployment may also give the
digest form directly and never hold the plaintext at all).

Every REST route and every RPC declares the scope it needs: `score`, `admin`, `any` (any valid
key) or `open` (no key: health, the API schema). Whatever declares nothing needs `admin`
(UNDECLARED), so a forgotten declaration can lock a route down but never open it.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

from rewardserve.schemas.errors import PermissionDenied, Unauthenticated

SCORE, ADMIN = "score", "admin"
SCOPES = (SCORE, ADMIN)
ANY = "any"
OPEN = "open"
REQUIREMENTS = (*SCOPES, ANY, OPEN)
UNDECLARED = ADMIN

DIGEST_PREFIX = "sha256:"
_HEX64 = re.compile(r"[0-9a-f]{64}")
# What an HTTP header and gRPC metadata can carry unchanged: visible ASCII; ':' ',' ';' split
# entries and scope lists in the setting.
_KEY_CHARS = re.compile(r"[\x21-\x7e]+")
FIELD = "authorization"


def digest(key: str | bytes) -> str:
    """The hex SHA-256 of a key, as the `sha256:<hex>` form of the api_keys setting takes it."""
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    digest: bytes
    scopes: frozenset[str]

    def entry(self) -> str:
        return f"{DIGEST_PREFIX}{self.digest.hex()}:{','.join(sorted(self.scopes))}"


def split_entry(entry: str) -> tuple[str, str | None]:
    """`key[:scopes]` or `sha256:<hex>[:scopes]` -> (key part, scope list or None)."""
    if entry.startswith(DIGEST_PREFIX):
        rest = entry[len(DIGEST_PREFIX) :]
        hexd, sep, scopes = rest.partition(":")
        return DIGEST_PREFIX + hexd, scopes if sep else None
    key, sep, scopes = entry.partition(":")
    return key, scopes if sep else None


def parse_api_key(entry: str) -> ApiKey:
    """One entry of the api_keys setting; ValueError with a message naming what is wrong.

    A key without a scope list grants every scope."""
    key, scope_list = split_entry(entry.strip())
    if key.startswith(DIGEST_PREFIX):
        hexd = key[len(DIGEST_PREFIX) :].lower()
        if not _HEX64.fullmatch(hexd):
            raise ValueError(f"'{key[:16]}...' is not sha256: followed by 64 hex digits")
        raw = bytes.fromhex(hexd)
    else:
        key = key.strip()
        if not key:
            raise ValueError("an API key is empty")
        if not _KEY_CHARS.fullmatch(key):
            raise ValueError(
                "an API key may hold only visible ASCII characters (no spaces), as an "
                "Authorization header carries them"
            )
        raw = hashlib.sha256(key.encode()).digest()
    if scope_list is None:
        return ApiKey(raw, frozenset(SCOPES))
    scopes = [s.strip() for s in scope_list.split(",")]
    if not any(scopes):
        raise ValueError(
            "an API key has an empty scope list ('key:'); name scopes "
            f"({', '.join(SCOPES)}) or drop the ':' to grant all"
        )
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown:
        raise ValueError(f"unknown scope '{unknown[0]}' (scopes: {', '.join(SCOPES)})")
    return ApiKey(raw, frozenset(scopes))


def bearer_token(authorization: str | bytes | None) -> bytes:
    """The token of an `Authorization: Bearer <token>` value, as bytes (any bytes at all: a
    header with non-ASCII in it is just a key that matches nothing)."""
    if authorization is None:
        raise Unauthenticated("missing 'Authorization: Bearer <api key>'", field=FIELD)
    raw = authorization.encode() if isinstance(authorization, str) else authorization
    scheme, _, token = raw.strip().partition(b" ")
    token = token.strip()
    if scheme.lower() != b"bearer" or not token:
        raise Unauthenticated("expected 'Authorization: Bearer <api key>'", field=FIELD)
    return token


class KeyRing:
    """The configured keys, plus the short-lived ones the jobs manager grants its workers.
    No configured keys: auth is off and every request holds every scope. One instance is
    shared by both transports (Runtime.keyring), so a granted key works on REST and gRPC."""

    def __init__(self, keys: Iterable[ApiKey] = ()) -> None:
        self._keys = tuple(keys)
        self._configured = bool(self._keys)

    def grant(self, scopes: Iterable[str] = SCOPES) -> str:
        """A new random key holding `scopes` until revoked (a job worker's, for one attempt).
        Only its digest is kept. With auth off it is accepted like any other bearer."""
        key = "rsw_" + secrets.token_urlsafe(32)
        self._keys = (*self._keys, ApiKey(hashlib.sha256(key.encode()).digest(), frozenset(scopes)))
        return key

    def revoke(self, key: str) -> None:
        d = hashlib.sha256(key.encode()).digest()
        self._keys = tuple(k for k in self._keys if k.digest != d)

    @classmethod
    def from_entries(cls, entries: Iterable[str]) -> KeyRing:
        return cls(parse_api_key(e) for e in entries)

    @property
    def enabled(self) -> bool:
        """Whether keys were configured (granted worker keys alone do not turn auth on)."""
        return self._configured

    def authorize(self, authorization: str | bytes | None, required: str) -> frozenset[str]:
        """The scopes the caller holds; Unauthenticated / PermissionDenied unless they meet
        `required` (a scope, ANY or OPEN)."""
        if required == OPEN or not self._configured:
            return frozenset(SCOPES)
        given = hashlib.sha256(bearer_token(authorization)).digest()
        granted: frozenset[str] = frozenset()
        for key in self._keys:
            # Every key is compared, always (no early exit), and the compared values are
            # digests, so the timing tells nothing about how much of a key was right.
            if hmac.compare_digest(key.digest, given):
                granted = granted | key.scopes
        if not granted:
            raise Unauthenticated("invalid API key", field=FIELD)
        if required != ANY and required not in granted:
            raise PermissionDenied(f"this API key lacks the '{required}' scope", field=FIELD)
        return granted
