"""Redaction of recorded headers and message bodies, and reading the account back."""

from __future__ import annotations

import json
import re

import pytest
from responses_ws_bridge.core.accounts import parse_accounts
from responses_ws_bridge.core.pool_state import PoolState
from responses_ws_bridge.core.redaction import (
    EXTENSIONS_KEPT,
    REDACTED,
    SCANS,
    BodyScrubber,
    SecretScrubber,
    account_from_authorization,
    prefix_groups,
    redact_headers,
    redact_text,
    redacted_authorization,
    trie_pattern,
)

JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjMifQ.c2lnbmF0dXJlLWJ5dGVz"
SECRET = "opaque-account-secret-42"


@pytest.mark.parametrize(
    ("header", "account", "expected"),
    [
        (("Authorization", f"Bearer {SECRET}"), "team-a", "Bearer <redacted:team-a>"),
        (("authorization", "Bearer sk-live-abcdefghijkl"), None, "Bearer <redacted:client>"),
        (("Authorization", "Basic dXNlcjpwYXNz"), "team-b", "Basic <redacted:team-b>"),
        # A bare token without a scheme is still a token.
        (("Authorization", "sk-bare-abcdefghijkl"), "team-a", "Bearer <redacted:team-a>"),
        (("Cookie", "session=abc; other=def"), "team-a", "<redacted>"),
        (("set-cookie", "id=1; HttpOnly"), None, "<redacted>"),
        (("X-Api-Key", "anything"), None, "<redacted>"),
        (("api-key", "anything"), None, "<redacted>"),
        (("OpenAI-Api-Key", "anything"), None, "<redacted>"),
        (("Proxy-Authorization", "Basic Zm9vOmJhcg=="), None, "<redacted>"),
        # A known secret anywhere in another header.
        (("x-debug", f"token={SECRET};"), "team-a", "token=<redacted>;"),
        # Anything that looks like an API key or a JWT.
        (("x-other", "key sk-proj-abcdefghijklmnop here"), None, "key <redacted> here"),
        (("x-forwarded-token", JWT), None, "<redacted>"),
        # Words that merely contain "sk-" stay.
        (("x-codex-window-id", "task-12345678:0"), None, "task-12345678:0"),
        (
            ("openai-beta", "responses_websockets=2026-02-06"),
            None,
            "responses_websockets=2026-02-06",
        ),
        (("session-id", "01a20a0c-ddf0-77e1"), "team-a", "01a20a0c-ddf0-77e1"),
    ],
)
def test_redact_headers(header: tuple[str, str], account: str | None, expected: str) -> None:
    out = redact_headers([header], account_id=account, secrets=[SECRET])
    assert out == [(header[0], expected)]


def test_redact_headers_keeps_order_names_and_repeats() -> None:
    headers = [
        ("Host", "chatgpt.com"),
        ("Authorization", "Bearer tok"),
        ("x-a", "1"),
        ("Cookie", "a=1"),
        ("x-a", "2"),
    ]
    assert redact_headers(headers, account_id="acc", secrets=["tok"]) == [
        ("Host", "chatgpt.com"),
        ("Authorization", "Bearer <redacted:acc>"),
        ("x-a", "1"),
        ("Cookie", "<redacted>"),
        ("x-a", "2"),
    ]


@pytest.mark.parametrize(
    ("text", "secrets", "expected"),
    [
        ("no secrets here", ["abc123"], "no secrets here"),
        ('{"key":"abc123"}', ["abc123"], '{"key":"<redacted>"}'),
        ("abc123 and abc123", ["abc123"], "<redacted> and <redacted>"),
        # The longer secret wins over one it contains.
        ("abc123456", ["abc123", "abc123456"], "<redacted>"),
        # An empty secret must not redact everything.
        ("keep", [""], "keep"),
        # Only known secrets: message bodies are not scanned for key shapes.
        ("sk-looks-like-a-key-but-is-text", [], "sk-looks-like-a-key-but-is-text"),
    ],
)
def test_redact_text(text: str, secrets: list[str], expected: str) -> None:
    assert redact_text(text, secrets) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Bearer <redacted:team-a>", "team-a"),
        ("bearer <redacted:team-a>", "team-a"),
        ("Bearer <redacted:client>", "client"),
        ("Bearer <redacted:>", ""),
        ("Bearer sk-real-token", None),
        ("Basic <redacted:team-a>", None),
        ("<redacted>", None),
        ("", None),
        (None, None),
    ],
)
def test_account_from_authorization(value: str | None, expected: str | None) -> None:
    assert account_from_authorization(value) == expected


@pytest.mark.parametrize("account", ["team-a", "user@example.com", None])
def test_account_round_trips_through_redaction(account: str | None) -> None:
    [(_, value)] = redact_headers(
        [("Authorization", "Bearer secret")], account_id=account, secrets=()
    )
    assert value == redacted_authorization(account)
    assert account_from_authorization(value) == (account if account is not None else "client")


# --- SecretScrubber -------------------------------------------------------------------------

TOKEN = "acct-token-0123456789"
CLIENT_KEY = "client-key-abcdef"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("nothing here", "nothing here"),
        (f"bad token {TOKEN}", "bad token <redacted>"),
        (f"{TOKEN}{TOKEN}", "<redacted>"),
        (f"reason: Bearer {CLIENT_KEY}.", "reason: Bearer <redacted>."),
        # A secret that contains another is cut out whole.
        (f"x{TOKEN}-suffix-x", "x<redacted>x"),
        # Two secrets sharing characters: their union goes, no piece of either survives.
        ("..abcdefgh-overlap..", "..<redacted>.."),
        # JSON-escaped forms, as in an upstream error body.
        ('{"m":"q\\"uote-secret"}', '{"m":"<redacted>"}'),
        # Unknown keys and JWTs by pattern.
        ("sk-proj-ABCDEFGHIJKLMNOP", "<redacted>"),
        (JWT, "<redacted>"),
    ],
)
def test_scrubber(text: str, expected: str) -> None:
    scrub = SecretScrubber(
        [TOKEN, CLIENT_KEY, f"{TOKEN}-suffix-", "abcdefgh", "efgh-overlap", 'q"uote-secret', ""]
    )
    assert scrub(text) == expected


def test_scrubber_bytes_errors_and_extension() -> None:
    from responses_ws_bridge.core.openai_errors import upstream_rejected

    scrub = SecretScrubber([TOKEN])
    assert scrub.data(b"\xff" + TOKEN.encode()) == b"\xff<redacted>"
    error = upstream_rejected(
        429, f'{{"error":{{"message":"token {TOKEN}"}}}}'.encode(), {"retry-after": TOKEN}
    )
    clean = scrub.error(error)
    assert TOKEN.encode() not in clean.body
    assert all(TOKEN not in v for _, v in clean.headers)
    passthrough = scrub.extended(["client-own-bearer-xyz"])
    assert passthrough("client-own-bearer-xyz and " + TOKEN) == "<redacted> and <redacted>"
    assert scrub.extended([TOKEN, ""]) is scrub
    assert TOKEN not in repr(scrub)


def test_the_pool_states_scrubber_knows_every_secret_and_follows_rotations() -> None:
    state = PoolState()
    accounts = [{"id": "a", "access_token": "plainaccess", "refresh_token": "plainrefresh"}]
    state.set_accounts(parse_accounts(json.dumps({"accounts": accounts, "client_keys": ["ck1"]})))
    live = ["plainrotated"]
    state.live_secrets = lambda: live
    first = state.scrubber()
    assert first("plainaccess plainrefresh ck1 plainrotated") == " ".join(["<redacted>"] * 4)
    assert state.scrubber() is first  # built once while the secrets stay the same
    live.append("plainrotatedagain")
    assert state.scrubber()("plainrotatedagain") == "<redacted>"


# -- secrets in every upstream text, events included ---------------------------------------

ESCAPED = 'tok/with"quote'


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"type":"response.output_text.delta","delta":"hi"}', None),
        (
            f'{{"type":"response.output_text.delta","delta":"{SECRET}"}}',
            '{"type":"response.output_text.delta","delta":"<redacted>"}',
        ),
        (f"a {SECRET} b {SECRET}", "a <redacted> b <redacted>"),
        # In a JSON string the secret is escaped: that form is cut out too.
        (json.dumps({"delta": ESCAPED}), '{"delta": "<redacted>"}'),
        # Unknown key-shaped words are the model's to say in an event.
        ('{"delta":"use sk-proj-abcdefghijklmnop"}', None),
        (f'{{"delta":"{JWT}"}}', None),
    ],
)
def test_known_secrets_leave_every_event(text: str, expected: str | None) -> None:
    scrub = SecretScrubber([SECRET, ESCAPED])
    got = scrub.known(text)
    if expected is None:
        assert got is text  # nothing found: the frame goes on untouched, not rebuilt
    else:
        assert got == expected


def test_error_texts_also_lose_anything_key_shaped() -> None:
    scrub = SecretScrubber([SECRET])
    assert scrub(f"{SECRET} sk-proj-abcdefghijklmnop {JWT}") == "<redacted> <redacted> <redacted>"
    assert scrub.known_data(f"x{SECRET}".encode()) == b"x<redacted>"
    assert SecretScrubber().known("anything") == "anything"


@pytest.mark.parametrize(
    "words",
    [
        ["abc"],
        ["abc", "abd", "ab", "b"],
        ["eyJa.b.c", "eyJa.b.d", "sk-1", "sk-12", "x.y*z"],
        ["a\\\\b", 'q"uote', "ünï"],
    ],
)
def test_the_trie_pattern_finds_exactly_the_words(words: list[str]) -> None:
    pattern = re.compile(trie_pattern(words))
    for word in words:
        assert pattern.search(f"<<{word}>>") is not None, word
        assert pattern.fullmatch(word) is not None, word
    assert pattern.search("<<zzz>>") is None


@pytest.mark.parametrize(
    ("words", "groups"),
    [
        ([], []),
        (["sk-b", "sk-a", "rt_x", "eyJ1", "sk-a"], [["sk-a", "sk-b"], ["eyJ1"], ["rt_x"]]),
        # Short words are a prefix of their own.
        (["ab", "abcd", "abce", "x"], [["abcd", "abce"], ["ab"], ["x"]]),
        # More prefixes than scans: the smallest groups share the last scan.
        (
            ["sk-1", "sk-2", "sk-3", "eyJ1", "eyJ2", "rt_1", "rt_2", "aaa1", "bbb1", "ccc1"],
            [
                ["sk-1", "sk-2", "sk-3"],
                ["eyJ1", "eyJ2"],
                ["rt_1", "rt_2"],
                ["aaa1", "bbb1", "ccc1"],
            ],
        ),
    ],
)
def test_secrets_are_looked_for_in_a_few_groups_by_prefix(
    words: list[str], groups: list[list[str]]
) -> None:
    assert SCANS == 4
    assert prefix_groups(words) == groups


def test_every_secret_of_every_group_is_found_in_a_long_text() -> None:
    prefixes = ["sk-", "eyJ", "rt_", "ak_", "xy.", "0x1", "tok"]
    secrets = [f"{p}{n}-secret-{n * 7919}" for p in prefixes for n in range(3)]
    scrub = SecretScrubber(secrets)
    filler = "You are a coding agent working in a repository. " * 800
    assert scrub.known(filler) is filler
    assert scrub.spans(filler.encode()) == []
    for secret in secrets:
        text = f"{filler}{secret}{filler}"
        assert scrub.known(text) == f"{filler}{REDACTED}{filler}", secret
        (span,) = scrub.spans(text.encode())
        assert text.encode()[span[0] : span[1]] == secret.encode()


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 11, 64])
def test_a_body_in_pieces_loses_every_secret_wherever_the_pieces_break(size: int) -> None:
    escaped = json.dumps(ESCAPED)[1:-1]
    body = f'{{"a":"{SECRET}","b":"x{SECRET}{SECRET}y","c":"{escaped}"}}'
    scrubber = BodyScrubber(SecretScrubber([SECRET, ESCAPED]))
    data = body.encode()
    out = b"".join(scrubber.feed(data[i : i + size]) for i in range(0, len(data), size))
    out += scrubber.end()
    assert out == b'{"a":"<redacted>","b":"x<redacted><redacted>y","c":"<redacted>"}'


def test_a_body_without_secrets_to_look_for_goes_as_it_is() -> None:
    scrubber = BodyScrubber(SecretScrubber())
    assert scrubber.feed(b"abc") == b"abc" and scrubber.end() == b""


def test_extending_with_the_same_key_again_reuses_the_scrubber_and_keeps_a_bounded_few() -> None:
    scrub = SecretScrubber([TOKEN])
    first = scrub.extended(["client-key-1"])
    assert scrub.extended(["client-key-1"]) is first
    assert scrub.extended(["client-key-2"]) is not first
    for n in range(EXTENSIONS_KEPT + 5):
        scrub.extended([f"other-{n}"])
    # The oldest went first: the key seen long ago is built again, and still scrubbed.
    again = scrub.extended(["client-key-1"])
    assert again is not first
    assert again.known("a client-key-1 b") == f"a {REDACTED} b"
