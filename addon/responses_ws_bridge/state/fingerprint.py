"""Affinity keys as the shared store sees them: an HMAC, never the key itself.

Session ids and turn states are bearer-like secrets for a session; the store
(and whoever can read it) only needs to tell two keys apart. The salt is per
namespace, so the same session id gives unrelated fingerprints in two pools.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

SALT_BYTES = 32


def new_salt() -> str:
    return secrets.token_hex(SALT_BYTES)


def fingerprint(salt: str, key: str) -> str:
    return hmac.new(salt.encode(), key.encode(), hashlib.sha256).hexdigest()
