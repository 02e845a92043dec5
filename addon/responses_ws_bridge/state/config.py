"""The `bridge_state` URL and namespace: which store, and which keys in it are this pool's.

Empty URL: in-memory state. Otherwise `redis://`, `rediss://` or `unix://`.
The namespace is `bridge_state_namespace` when set, else the non-numeric
path segment of a `redis(s)://` URL (`redis://host:6379/0/team-a` is db 0,
namespace `team-a`), else `bridge`. The URL handed to the client has the
namespace segment removed, since redis-py reads the path as the db number.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

DEFAULT_NAMESPACE = "bridge"
SCHEMES = ("redis", "rediss", "unix")
_NAMESPACE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class StateConfig:
    """Where shared state lives. `url` is None for in-memory state."""

    url: str | None
    namespace: str

    @property
    def shared(self) -> bool:
        return self.url is not None

    def display_url(self) -> str:
        """The URL without its password, for the log."""
        if self.url is None:
            return "memory"
        parts = urlsplit(self.url)
        if parts.password is None:
            return self.url
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
        user = f"{parts.username}:***@" if parts.username else ":***@"
        return urlunsplit(parts._replace(netloc=f"{user}{host}{port}"))


def parse_state_config(url: str, namespace: str = "") -> StateConfig:
    """The configuration the two options describe; ValueError with a message a user reads."""
    if namespace and not _NAMESPACE.match(namespace):
        raise ValueError(
            f"namespace {namespace!r} must be 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    url = url.strip()
    if not url:
        return StateConfig(None, namespace or DEFAULT_NAMESPACE)
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES:
        raise ValueError(f"{url.split(':', 1)[0]!r} is not redis://, rediss:// or unix://")
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError("a unix:// URL needs the socket path, e.g. unix:///run/valkey.sock")
        return StateConfig(url, namespace or DEFAULT_NAMESPACE)
    if not parts.hostname:
        raise ValueError(f"{parts.scheme}:// URL has no host")
    segments = [s for s in parts.path.split("/") if s]
    db = [s for s in segments if s.isdigit()]
    names = [s for s in segments if not s.isdigit()]
    if len(db) > 1 or len(names) > 1 or (db and names and segments[0] != db[0]):
        raise ValueError(f"URL path {parts.path!r} must be /DB, /NAMESPACE or /DB/NAMESPACE")
    from_path = names[0] if names else ""
    if from_path and not _NAMESPACE.match(from_path):
        raise ValueError(f"namespace {from_path!r} in the URL path is not a valid name")
    client_url = urlunsplit(parts._replace(path=f"/{db[0]}" if db else ""))
    return StateConfig(client_url, namespace or from_path or DEFAULT_NAMESPACE)
