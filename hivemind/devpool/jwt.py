"""HS256 JSON Web Tokens with the standard library (RFC 7519 subset the node pool uses).

Only HS256 is accepted: a token whose header names another algorithm (`none` included) is
rejected before its signature is looked at. Error messages never contain the token.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from typing import Any

from hivemind.errors import HivemindError

_HEADER = {"alg": "HS256", "typ": "JWT"}


class InvalidToken(HivemindError):
    """The token is malformed, forged or expired; the message says which, never the token."""


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise InvalidToken("malformed token") from None


def _json_part(text: str) -> dict[str, Any]:
    try:
        value = json.loads(_b64decode(text))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InvalidToken("malformed token") from None
    if not isinstance(value, dict):
        raise InvalidToken("malformed token")
    return value


def _sign(signing_input: str, key: bytes) -> str:
    return _b64encode(hmac.new(key, signing_input.encode("ascii"), hashlib.sha256).digest())


def encode(claims: dict[str, Any], key: bytes) -> str:
    """A compact HS256 token over `claims` (JSON-serialisable)."""
    header = _b64encode(json.dumps(_HEADER, separators=(",", ":")).encode())
    payload = _b64encode(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
    signing_input = f"{header}.{payload}"
    return f"{signing_input}.{_sign(signing_input, key)}"


def unverified_claims(token: str) -> dict[str, Any]:
    """The payload without checking the signature: for a client reading its own token's `exp`."""
    parts = token.split(".")
    if len(parts) != 3:
        raise InvalidToken("malformed token")
    return _json_part(parts[1])


def decode(token: str, key: bytes, now: float) -> dict[str, Any]:
    """Verify signature and expiry at time `now`; return the claims or raise InvalidToken."""
    parts = token.split(".")
    if len(parts) != 3 or not token.isascii():
        raise InvalidToken("malformed token")
    header = _json_part(parts[0])
    if header.get("alg") != "HS256":
        raise InvalidToken("unsupported token algorithm")
    if not hmac.compare_digest(_sign(f"{parts[0]}.{parts[1]}", key), parts[2]):
        raise InvalidToken("bad token signature")
    claims = _json_part(parts[1])
    exp = claims.get("exp")
    if not isinstance(exp, (int, float)) or isinstance(exp, bool):
        raise InvalidToken("token has no expiry")
    if now >= exp:
        raise InvalidToken("token expired")
    return claims
