"""What the worker needs to know about the pool's JWT: when it expires. It never verifies it
(only the pool can), it only decodes the payload to renew in time."""

from __future__ import annotations

import base64
import json


def token_expiry(token: str) -> float | None:
    """The `exp` claim of a JWT, or None when the token has none or isn't a JWT."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (ValueError, UnicodeDecodeError):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    return float(exp) if isinstance(exp, (int, float)) else None
