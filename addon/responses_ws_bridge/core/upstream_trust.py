"""Where an upstream turn may go: the one place that decides who receives a credential.

With an account pool the bridge authenticates upstream with the account's
token, so the upstream must be one the operator chose, never one the client
chose: the `bridge_upstream` option, the account's own `upstream`, the target
of a reverse-mode listener, or a request destination whose host is on the
trusted list (`bridge_trusted_upstreams`). Any other destination is refused
before anything is sent anywhere. In pass-through mode the credential is the
client's own, so the client's destination is its business, except that the
proxy's own listeners are never an upstream (a request would loop back into
the proxy).

Matching is by exact host name (case-insensitive, a trailing dot ignored). An
entry `*.example.com` opts into every subdomain of example.com (not
example.com itself). Exact by default because a sibling host of an official
one is not necessarily run by the same service or able to speak the
Responses WebSocket protocol: `chatgpt.com` on the list says nothing about
`files.chatgpt.com`, and an operator who wants more says so explicitly. A
client-chosen destination must also use TLS (https/wss): sending an
account's token over cleartext to even the right host leaks it to the path.
No name is resolved here: a host name is trusted for what it says.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

from responses_ws_bridge.core import routing
from responses_ws_bridge.core.openai_errors import HttpError, untrusted_upstream

TRUSTED_UPSTREAMS_OPTION = "bridge_trusted_upstreams"
DEFAULT_TRUSTED_UPSTREAMS = ("chatgpt.com", "api.openai.com")
_TLS_SCHEMES = frozenset({"https", "wss"})
_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain"})


@dataclass(frozen=True)
class Endpoint:
    """A scheme-less host and port: a destination or one of the proxy's own addresses."""

    host: str
    port: int


@dataclass(frozen=True)
class Target:
    """What the flow was addressed to (after any reverse-mode rewrite)."""

    scheme: str
    host: str
    port: int
    path: str  # with its query


@dataclass(frozen=True)
class Trusted:
    """Go to `url`; `source` says who chose it (option, account, reverse, allowlist, client)."""

    url: str
    source: str


@dataclass(frozen=True)
class Refused:
    """Nothing may be sent anywhere; the client gets `error`. Never an account's fault."""

    error: HttpError


Decision = Trusted | Refused


def parse_trusted_hosts(value: str) -> tuple[str, ...]:
    """The option's comma-separated list, normalized; raises ValueError naming a bad entry.

    An empty value means no client-chosen destination is trusted (only the
    option, accounts' upstreams and reverse targets).
    """
    out: list[str] = []
    for raw in value.split(","):
        entry = raw.strip()
        if not entry:
            continue
        host = entry[2:] if entry.startswith("*.") else entry
        name = _normal_host(host)
        if not name or any(c in name for c in "/:@ *") or not name.isprintable():
            raise ValueError(
                f"{TRUSTED_UPSTREAMS_OPTION}: {entry!r} is not a host name "
                "(write host names, or *.domain for its subdomains, separated by commas)"
            )
        out.append(f"*.{name}" if entry.startswith("*.") else name)
    return tuple(dict.fromkeys(out))


def host_is_trusted(host: str, trusted: Iterable[str]) -> bool:
    name = _normal_host(host)
    if not name:
        return False
    for entry in trusted:
        if entry.startswith("*."):
            if name.endswith(entry[1:]) and len(name) > len(entry) - 1:
                return True
        elif name == entry:
            return True
    return False


def is_own_endpoint(host: str, port: int, own: Collection[Endpoint]) -> bool:
    """Whether host:port is one of the proxy's own listeners.

    A listener on a wildcard address (0.0.0.0, ::) answers on every local
    address; of those only the loopback ones are recognizable without
    resolving names. The hook also passes the address the client actually
    connected to, which covers the other local addresses.
    """
    name = _normal_host(host)
    loopback = name in _LOOPBACK_NAMES or _is_loopback_ip(name)
    for endpoint in own:
        if endpoint.port != port:
            continue
        own_name = _normal_host(endpoint.host)
        if own_name == name:
            return True
        if _is_wildcard(own_name) and loopback:
            return True
        if loopback and (own_name in _LOOPBACK_NAMES or _is_loopback_ip(own_name)):
            return True
    return False


def decide_upstream(
    *,
    pool_mode: bool,
    option: str,
    account_upstream: str | None,
    target: Target,
    reverse_target: Endpoint | None,
    trusted_hosts: Collection[str],
    own_endpoints: Collection[Endpoint],
) -> Decision:
    """The upstream URL for one attempt, or why there is none.

    `reverse_target` is the configured target of the reverse-mode listener the
    client came in on (None in regular and other modes): a destination equal to
    it was chosen by the operator. `own_endpoints` are the proxy's listen
    addresses (and the one the client reached). Raises ValueError only for a
    configured URL that is malformed (the option is validated at configure time).
    """
    configured = option.strip() or (account_upstream or "").strip()
    if configured:
        source = "option" if option.strip() else "account"
        url = routing.upstream_url(
            option=option,
            account_upstream=account_upstream,
            scheme=target.scheme,
            host=target.host,
            port=target.port,
            path=target.path,
        )
        host, port = _url_endpoint(url)
        if is_own_endpoint(host, port, own_endpoints):
            return Refused(untrusted_upstream(f"{source} upstream {host}:{port}", loop=True))
        return Trusted(url, source)

    if is_own_endpoint(target.host, target.port, own_endpoints):
        return Refused(untrusted_upstream(_where(target), loop=True))
    url = routing.upstream_url(
        option="",
        account_upstream=None,
        scheme=target.scheme,
        host=target.host,
        port=target.port,
        path=target.path,
    )
    if not pool_mode:
        return Trusted(url, "client")
    if reverse_target is not None and _same_endpoint(target, reverse_target):
        return Trusted(url, "reverse")
    if not host_is_trusted(target.host, trusted_hosts):
        return Refused(untrusted_upstream(_where(target)))
    if target.scheme.lower() not in _TLS_SCHEMES:
        return Refused(untrusted_upstream(_where(target), cleartext=True))
    return Trusted(url, "allowlist")


def _where(target: Target) -> str:
    host = f"[{target.host}]" if ":" in target.host else target.host
    return f"{target.scheme}://{host}:{target.port}"


def _url_endpoint(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "wss" else 80)
    return parts.hostname or "", port


def _same_endpoint(target: Target, endpoint: Endpoint) -> bool:
    return _normal_host(target.host) == _normal_host(endpoint.host) and target.port == endpoint.port


def _normal_host(host: str) -> str:
    name = host.strip().lower()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    return name[:-1] if name.endswith(".") else name


def _is_loopback_ip(name: str) -> bool:
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def _is_wildcard(name: str) -> bool:
    return name in ("", "0.0.0.0", "::")


class _Place(Protocol):
    @property
    def scheme(self) -> str: ...
    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def path(self) -> str: ...


class Addressed(Protocol):
    """A request as the engines know it: where it was meant to go, and the proxy's own places."""

    @property
    def destination(self) -> _Place: ...
    @property
    def reverse_target(self) -> Endpoint | None: ...
    @property
    def own_endpoints(self) -> Collection[Endpoint]: ...


def refusal_of(
    request: Addressed,
    *,
    pool_mode: bool,
    option: str,
    accounts_own_upstreams: bool,
    trusted_hosts: Collection[str],
) -> HttpError | None:
    """`refusal` for a request's own destination (every engine asks it so)."""
    place = request.destination
    return refusal(
        pool_mode=pool_mode,
        option=option,
        accounts_own_upstreams=accounts_own_upstreams,
        target=Target(place.scheme, place.host, place.port, place.path),
        reverse_target=request.reverse_target,
        trusted_hosts=trusted_hosts,
        own_endpoints=request.own_endpoints,
    )


def refusal(
    *,
    pool_mode: bool,
    option: str,
    accounts_own_upstreams: bool,
    target: Target,
    reverse_target: Endpoint | None,
    trusted_hosts: Collection[str],
    own_endpoints: Collection[Endpoint],
) -> HttpError | None:
    """Why the client's destination may not be served at all (None: it may).

    With a pool, a destination the client chose is used only when trusted;
    when every account names its own upstream, the destination is never used
    and so never matters. The proxy itself is never an upstream.
    """
    try:
        decision = decide_upstream(
            pool_mode=pool_mode,
            option=option,
            account_upstream=None,
            target=target,
            reverse_target=reverse_target,
            trusted_hosts=trusted_hosts,
            own_endpoints=own_endpoints,
        )
    except ValueError:
        return None  # a malformed URL: the attempt says so (bad_url)
    if isinstance(decision, Trusted):
        return None
    if (
        accounts_own_upstreams
        and not option.strip()
        and not is_own_endpoint(target.host, target.port, own_endpoints)
    ):
        return None
    return decision.error
