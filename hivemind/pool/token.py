"""What the worker needs to know about the pool's JWT: when it was issued and when it expires. It
never verifies it (only the pool can), it only decodes the payload to renew in time."""

from __future__ import annotations

import base64
import json
from typing import Any


def _claims(token: str) -> dict[str, Any]:
    parts = token.split(".")
    if len(parts) != 3:
        return {}
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (ValueError, UnicodeDecodeError):
        return {}
    return claims if isinstance(claims, dict) else {}


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def token_expiry(token: str) -> float | None:
    """The `exp` claim of a JWT, or None when the token has none or isn't a JWT."""
    return _number(_claims(token).get("exp"))


def token_issued_at(token: str) -> float | None:
    """The `iat` claim (the 2025-10 pool's tokens have none)."""
    return _number(_claims(token).get("iat"))
