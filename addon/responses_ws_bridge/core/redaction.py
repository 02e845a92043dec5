"""Credential redaction for recorded flows, and reading it back.

Recorded upstream sessions keep which account was used but never its secret:
`Authorization` becomes `Bearer <redacted:ACCOUNT_ID>` (`<redacted:client>` for
the client's own credential in pass-through mode), credential-like headers
lose their values, and known secrets, API keys and JWTs are cut out of every
header value. Pure functions over plain values.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Iterable, Sequence
from typing import Any

from responses_ws_bridge.core.handshake_headers import redact_secrets
from responses_ws_bridge.core.openai_errors import HttpError

REDACTED = "<redacted>"
# The account label of the client's own credential (pass-through mode).
CLIENT_ACCOUNT = "client"

# Their whole value is a credential, whatever it looks like.
CREDENTIAL_HEADERS = frozenset(
    {
        "cookie",
        "set-cookie",
        "x-api-key",
        "api-key",
        "openai-api-key",
        "proxy-authorization",
    }
)

_REDACTED_AUTHORIZATION = re.compile(r"\s*(\S+)\s+<redacted:(.*)>\s*")


def redacted_authorization(account_id: str | None, scheme: str = "Bearer") -> str:
    """The recorded form of an Authorization value used for `account_id`."""
    return f"{scheme} <redacted:{account_id if account_id is not None else CLIENT_ACCOUNT}>"


def account_from_authorization(value: str | None) -> str | None:
    """The account id in a redacted Authorization value; None when it is not one.

    The client's own credential comes back as `CLIENT_ACCOUNT`.
    """
    if value is None:
        return None
    match = _REDACTED_AUTHORIZATION.fullmatch(value)
    if match is None or match.group(1).lower() != "bearer":
        return None
    return match.group(2)


def redact_text(text: str, secrets: Collection[str]) -> str:
    """`text` with every occurrence of a known secret replaced by `<redacted>`."""
    return _cut_out(text, _longest_first(secrets))


def _longest_first(secrets: Collection[str]) -> list[str]:
    # Longest first, so that a secret containing another is cut out whole.
    return sorted((s for s in secrets if s), key=len, reverse=True)


def _cut_out(text: str, ordered: Sequence[str]) -> str:
    for secret in ordered:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def redact_headers(
    headers: Sequence[tuple[str, str]],
    *,
    account_id: str | None,
    secrets: Collection[str],
) -> list[tuple[str, str]]:
    """The headers, in order, as they may be recorded.

    `account_id` is the account whose credential `Authorization` carries; None
    means it is the client's own (pass-through mode).
    """
    out: list[tuple[str, str]] = []
    ordered = _longest_first(secrets)
    for name, value in headers:
        low = name.lower()
        if low == "authorization":
            scheme = value.split(None, 1)[0] if value.strip() else "Bearer"
            # Only the scheme survives: a token without one is still a token.
            if scheme.lower() != "bearer" and " " not in value.strip():
                scheme = "Bearer"
            out.append((name, redacted_authorization(account_id, scheme)))
        elif low in CREDENTIAL_HEADERS:
            out.append((name, REDACTED))
        else:
            out.append((name, redact_secrets(_cut_out(value, ordered))))
    return out


def trie_pattern(words: Iterable[str]) -> str:
    """A regular expression matching any of `words`, shared prefixes factored out.

    `re` tries the alternatives of `a|b|c` one by one at every position of a
    text; as a trie (`eyJ(?:abc|def)|sk-…`) it follows one branch per position,
    so a search costs about the same for three secrets as for a hundred.
    """
    root: dict[str, Any] = {}
    for word in words:
        node = root
        for char in word:
            node = node.setdefault(char, {})
        node[""] = {}  # a word ends here

    def build(node: dict[str, Any]) -> str:
        branches = [re.escape(char) + build(child) for char, child in node.items() if char]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        return f"(?:{body})?" if "" in node else body

    return build(root)


# Scrubbers extended with a client's own key, kept per base scrubber (oldest dropped first).
EXTENSIONS_KEPT = 64

# Secrets are looked for in groups sharing their first PREFIX_CHARS characters, one scan per
# group. `re` finds a pattern's literal prefix with a fast search; a pattern whose words start
# with different characters is tried at every position holding one of them, which in prose
# and JSON is most positions (a 39 KB request: 270 µs in one scan, 50 in three). At most
# SCANS scans: the smallest groups share the last one.
PREFIX_CHARS = 3
SCANS = 4


def prefix_groups(words: Iterable[str]) -> list[list[str]]:
    """`words` grouped by their first `PREFIX_CHARS` characters, largest group first, in at
    most `SCANS` groups (the smallest ones merged into the last)."""
    groups: dict[str, list[str]] = {}
    for word in sorted(set(words)):
        groups.setdefault(word[:PREFIX_CHARS], []).append(word)
    ordered = sorted(groups.values(), key=len, reverse=True)
    if len(ordered) <= SCANS:
        return ordered
    rest = sorted(word for group in ordered[SCANS - 1 :] for word in group)
    return [*ordered[: SCANS - 1], rest]


class SecretScrubber:
    """Cuts every known secret out of text an upstream chose: events, close reasons, error bodies.

    Built once per accounts file from all its secrets (account tokens, client
    keys; refresh tokens too when there are any) and reused for every text:
    one C-level regex scan finds whether anything needs replacing. Secrets are
    also looked for in their JSON-escaped form, since error bodies are JSON.
    Overlapping occurrences (two secrets sharing characters, or one inside
    another) are cut out as their union, so no piece of either survives. API
    keys and JWTs the bridge does not know are cut out by pattern as well.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        forms: set[str] = set()
        for secret in secrets:
            if secret:
                forms.add(secret)
                forms.add(json.dumps(secret)[1:-1])
                forms.add(json.dumps(secret, ensure_ascii=False)[1:-1])
        self._secrets = frozenset(s for s in secrets if s) if forms else frozenset()
        # A few scans per text say whether anything needs replacing: the forms of each
        # prefix group in one pattern shaped as a trie, so the cost grows with the text,
        # not with the secrets.
        groups = prefix_groups(forms)
        self._scans = tuple(re.compile(trie_pattern(group)) for group in groups)
        self._groups = groups
        # Bytes bodies (forwarded answers): built when first needed.
        self._byte_scans: tuple[re.Pattern[bytes], ...] | None = None
        self._bytes: re.Pattern[bytes] | None = None
        # The longest form in bytes: what a body in pieces holds back (`BodyScrubber`).
        self.longest = max((len(f.encode("utf-8", "surrogatepass")) for f in forms), default=0)
        # Only on a hit: a lookahead finds a match at every position, overlapping ones included.
        alternatives = "|".join(map(re.escape, sorted(forms, key=len, reverse=True)))
        self._pattern = re.compile(f"(?=({alternatives}))") if forms else None
        self._extensions: dict[tuple[str, ...], SecretScrubber] = {}

    def __repr__(self) -> str:
        return f"SecretScrubber(<{len(self._secrets)} secrets>)"

    def extended(self, extra: Iterable[str]) -> SecretScrubber:
        """This scrubber plus `extra` (e.g. a pass-through client's own bearer).

        A client sends the same key turn after turn: the last few extensions are
        kept, so that a turn does not build its patterns again."""
        more = tuple(s for s in extra if s and s not in self._secrets)
        if not more:
            return self
        known = self._extensions.get(more)
        if known is None:
            if len(self._extensions) >= EXTENSIONS_KEPT:
                self._extensions.pop(next(iter(self._extensions)))
            known = self._extensions[more] = SecretScrubber([*self._secrets, *more])
        return known

    def __call__(self, text: str) -> str:
        """`text` without any known secret, API key or JWT-looking token (for error texts)."""
        return redact_secrets(self.known(text))

    def known(self, text: str) -> str:
        """`text` without the known secrets only: for any upstream text, events included.

        A C-level scan of the text per prefix group of the secrets and their
        JSON-escaped forms; the text is rebuilt only when it holds one. Unknown
        key-shaped words are left alone here: an event's text is the model's,
        and may rightly talk about `sk-…`.
        """
        for scan in self._scans:
            if scan.search(text) is not None:
                break
        else:
            return text
        assert self._pattern is not None
        # Overlapping occurrences are cut out as their union: no piece of either survives.
        spans: list[list[int]] = []
        for match in self._pattern.finditer(text):
            start, end = match.start(1), match.end(1)
            if spans and start <= spans[-1][1]:
                spans[-1][1] = max(spans[-1][1], end)
            else:
                spans.append([start, end])
        pieces: list[str] = []
        at = 0
        for start, end in spans:
            pieces.append(text[at:start])
            pieces.append(REDACTED)
            at = end
        pieces.append(text[at:])
        return "".join(pieces)

    def spans(self, data: bytes) -> list[tuple[int, int]]:
        """Where known secrets are in `data` (overlapping ones merged), for bodies in pieces."""
        if self._byte_scans is None:
            self._byte_scans = tuple(
                re.compile(trie_pattern(group).encode("utf-8", "surrogatepass"))
                for group in self._groups
            )
        if not any(scan.search(data) is not None for scan in self._byte_scans):
            return []
        if self._bytes is None:
            forms = sorted({f.encode("utf-8", "surrogatepass") for f in self._forms()}, key=len)
            alternatives = b"|".join(re.escape(f) for f in reversed(forms))
            self._bytes = re.compile(b"(?=(" + alternatives + b"))")
        merged: list[tuple[int, int]] = []
        for match in self._bytes.finditer(data):
            start, end = match.start(1), match.end(1)
            if merged and start <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], end))
            else:
                merged.append((start, end))
        return merged

    def _forms(self) -> set[str]:
        forms: set[str] = set()
        for secret in self._secrets:
            forms.update(
                {secret, json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1]}
            )
        return forms

    def known_data(self, data: bytes) -> bytes:
        """`known` for bytes (undecodable bytes kept as they are)."""
        if not self._scans:
            return data
        return self.known(data.decode("utf-8", "surrogateescape")).encode(
            "utf-8", "surrogateescape"
        )

    def data(self, data: bytes) -> bytes:
        """Bytes as text (undecodable bytes kept as they are), scrubbed."""
        return self(data.decode("utf-8", "surrogateescape")).encode("utf-8", "surrogateescape")

    def error(self, error: HttpError) -> HttpError:
        """The error with its body and header values scrubbed."""
        body = self.data(error.body)
        headers = tuple((k, self(v)) for k, v in error.headers)
        if body == error.body and headers == error.headers:
            return error
        return HttpError(error.status, body, headers)


class BodyScrubber:
    """Known secrets cut out of a body that arrives in pieces, one straddling two included.

    Each piece goes out but for its last `longest form - 1` bytes, held for the
    next one: a secret that starts in what goes out ends in it too.
    """

    def __init__(self, scrub: SecretScrubber) -> None:
        self._scrub = scrub
        self._held = b""
        self._keep = max(0, scrub.longest - 1)

    def feed(self, data: bytes) -> bytes:
        if not self._keep:
            return data
        buffer = self._held + data
        cut = max(0, len(buffer) - self._keep)
        spans = self._scrub.spans(buffer)
        for start, end in spans:
            if start < cut < end:
                cut = end
        self._held = buffer[cut:]
        return _replaced(buffer[:cut], [(a, b) for a, b in spans if b <= cut])

    def end(self) -> bytes:
        rest, self._held = self._held, b""
        return _replaced(rest, self._scrub.spans(rest)) if rest else b""


def _replaced(data: bytes, spans: Sequence[tuple[int, int]]) -> bytes:
    if not spans:
        return data
    pieces: list[bytes] = []
    at = 0
    for start, end in spans:
        pieces += [data[at:start], REDACTED.encode()]
        at = end
    pieces.append(data[at:])
    return b"".join(pieces)


NO_SECRETS = SecretScrubber()
