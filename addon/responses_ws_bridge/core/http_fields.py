"""Reading HTTP fields from plain `(name, value)` pairs: one lookup, one Bearer parser.

Names compare without case (RFC 9110 §5.1); values are returned as sent.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping


def values(headers: Iterable[tuple[str, str]] | Mapping[str, str], name: str) -> list[str]:
    """Every value of the field `name`, in order."""
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    name = name.lower()
    return [v for k, v in pairs if k.lower() == name]


def header(headers: Iterable[tuple[str, str]] | Mapping[str, str], name: str) -> str | None:
    """The first value of the field `name` (None: absent)."""
    found = values(headers, name)
    return found[0] if found else None


def has(headers: Iterable[tuple[str, str]] | Mapping[str, str], name: str) -> bool:
    return header(headers, name) is not None


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` value; None for anything else."""
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token
