"""The accounts file: parsing, every error message, client keys, and secret hygiene."""

from __future__ import annotations

import json
from typing import Any

import pytest
from responses_ws_bridge.core.accounts import (
    Account,
    AccountsConfig,
    AccountsFileError,
    client_key_ok,
    parse_accounts,
    secrets_of,
)

TOKEN_A = "eyJSECRET-token-a"
KEY_B = "sk-SECRET-key-b"
CLIENT_KEY = "SECRET-client-key"

README_EXAMPLE = {
    "accounts": [
        {"id": "team-a", "access_token": TOKEN_A, "chatgpt_account_id": "acct-123"},
        {"id": "team-b", "api_key": KEY_B, "upstream": "wss://api.openai.com/v1/responses"},
    ],
    "client_keys": [CLIENT_KEY],
}


def test_parses_the_brief_example() -> None:
    config = parse_accounts(json.dumps(README_EXAMPLE))
    assert config == AccountsConfig(
        accounts=(
            Account("team-a", TOKEN_A, chatgpt_account_id="acct-123"),
            Account("team-b", KEY_B, upstream="wss://api.openai.com/v1/responses"),
        ),
        client_keys=frozenset({CLIENT_KEY}),
    )


def test_client_keys_are_optional() -> None:
    config = parse_accounts('{"accounts": [{"id": "solo", "api_key": "sk-1"}]}')
    assert config.client_keys is None
    assert config.accounts == (Account("solo", "sk-1"),)


@pytest.mark.parametrize(
    "upstream",
    [
        "ws://127.0.0.1:8080/v1/responses",
        "wss://chatgpt.com/backend-api/codex/responses",
        "http://localhost:9000",
        "https://api.openai.com/v1/responses",
    ],
)
def test_upstream_schemes_accepted(upstream: str) -> None:
    text = json.dumps({"accounts": [{"id": "a", "api_key": "k", "upstream": upstream}]})
    assert parse_accounts(text).accounts[0].upstream == upstream


def account(**fields: Any) -> dict[str, Any]:
    return {"id": "team-a", "access_token": TOKEN_A, **fields}


def without(key: str, **fields: Any) -> dict[str, Any]:
    result = account(**fields)
    del result[key]
    return result


ERRORS: list[tuple[str, str]] = [
    ("{", "not valid JSON: Expecting property name enclosed in double quotes (line 1, column 2)"),
    (f'{{"accounts": [{{"id": "a", "api_key": "{KEY_B}"', "not valid JSON"),
    ("[]", "top level: must be a JSON object"),
    ('"accounts"', "top level: must be a JSON object"),
    ("{}", "accounts: missing"),
    (json.dumps({"accounts": []}), "accounts: must be a non-empty list"),
    (json.dumps({"accounts": {"id": "a"}}), "accounts: must be a non-empty list"),
    (
        json.dumps({"accounts": [account()], "acounts": []}),
        "top level: unknown key 'acounts' (expected one of accounts, client_keys)",
    ),
    (json.dumps({"accounts": ["team-a"]}), "accounts[0]: must be an object"),
    (json.dumps({"accounts": [account(), without("id")]}), "accounts[1].id: missing"),
    (json.dumps({"accounts": [account(id="")]}), "accounts[0].id: must be a non-empty string"),
    (json.dumps({"accounts": [account(id="  ")]}), "accounts[0].id: must be a non-empty string"),
    (json.dumps({"accounts": [account(id=7)]}), "accounts[0].id: must be a non-empty string"),
    (
        json.dumps({"accounts": [account(id="a\nb")]}),
        "accounts[0].id: must not contain control characters",
    ),
    (
        json.dumps({"accounts": [account(api_key=KEY_B)]}),
        "accounts[0]: both access_token and api_key given",
    ),
    (
        json.dumps({"accounts": [{"id": "a"}]}),
        "accounts[0]: neither access_token nor api_key given",
    ),
    (
        json.dumps({"accounts": [account(access_token="")]}),
        "accounts[0].access_token: must be a non-empty string without whitespace",
    ),
    (
        json.dumps({"accounts": [{"id": "a", "api_key": f"{KEY_B} x"}]}),
        "accounts[0].api_key: must be a non-empty string without whitespace",
    ),
    (
        json.dumps({"accounts": [{"id": "a", "api_key": 12345}]}),
        "accounts[0].api_key: must be a non-empty string without whitespace",
    ),
    (
        json.dumps({"accounts": [account(access_token=TOKEN_A + "\r\nX-Evil: 1")]}),
        "accounts[0].access_token: must be a non-empty string without whitespace",
    ),
    (
        json.dumps({"accounts": [account(chatgpt_account_id="")]}),
        "accounts[0].chatgpt_account_id: must be a non-empty string without whitespace",
    ),
    (
        json.dumps({"accounts": [account(upstream="ftp://example.com/x")]}),
        "accounts[0].upstream: must be a ws://, wss://, http:// or https:// URL",
    ),
    (
        json.dumps({"accounts": [account(upstream="wss://")]}),
        "accounts[0].upstream: must be a ws://, wss://, http:// or https:// URL",
    ),
    (
        json.dumps({"accounts": [account(upstream="wss://host:port/x")]}),
        "accounts[0].upstream: must be a ws://, wss://, http:// or https:// URL",
    ),
    (
        json.dumps({"accounts": [account(upstream=["wss://a"])]}),
        "accounts[0].upstream: must be a ws://, wss://, http:// or https:// URL",
    ),
    (
        json.dumps({"accounts": [account(), account(id="team-b"), account()]}),
        "accounts[2].id: duplicate 'team-a'",
    ),
    (
        json.dumps({"accounts": [account(), account(acces_token=TOKEN_A)]}),
        "accounts[1]: unknown key 'acces_token' "
        "(expected one of id, access_token, api_key, chatgpt_account_id, upstream, "
        "refresh_token, client_id)",
    ),
    (
        json.dumps({"accounts": [account()], "client_keys": CLIENT_KEY}),
        "client_keys: must be a list of strings",
    ),
    (
        json.dumps({"accounts": [account()], "client_keys": []}),
        "client_keys: must not be empty (omit it to accept any client)",
    ),
    (
        json.dumps({"accounts": [account()], "client_keys": [""]}),
        "client_keys[0]: must be a non-empty string without whitespace",
    ),
    (
        json.dumps({"accounts": [account()], "client_keys": [CLIENT_KEY, 5]}),
        "client_keys[1]: must be a non-empty string without whitespace",
    ),
]


@pytest.mark.parametrize(("text", "message"), ERRORS)
def test_error_messages_name_the_field(text: str, message: str) -> None:
    with pytest.raises(AccountsFileError) as info:
        parse_accounts(text)
    assert str(info.value).startswith(message)
    for secret in (TOKEN_A, KEY_B, CLIENT_KEY):
        assert secret not in str(info.value)


def test_bad_json_error_does_not_chain_the_document() -> None:
    # JSONDecodeError keeps the whole text (secrets) in `.doc`; it must not ride along.
    with pytest.raises(AccountsFileError) as info:
        parse_accounts(f'{{"accounts": [{{"id": "a", "api_key": "{KEY_B}"')
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


def test_accounts_file_error_is_a_value_error() -> None:
    assert issubclass(AccountsFileError, ValueError)


def test_repr_never_shows_a_secret() -> None:
    config = parse_accounts(json.dumps(README_EXAMPLE))
    assert repr(config.accounts[0]) == (
        "Account(id='team-a', bearer=<redacted>, chatgpt_account_id='acct-123', upstream=None)"
    )
    for text in (repr(config), str(config), str(config.accounts[1]), f"{config.accounts}"):
        for secret in (TOKEN_A, KEY_B, CLIENT_KEY):
            assert secret not in text
    assert "client_keys=<1 redacted>" in repr(config)


CONFIG = AccountsConfig(
    accounts=(Account("a", "sk-1"),), client_keys=frozenset({"key-one", "key-two"})
)


@pytest.mark.parametrize(
    ("authorization", "ok"),
    [
        ("Bearer key-one", True),
        ("Bearer key-two", True),
        ("bearer key-one", True),
        ("BEARER key-two", True),
        ("  Bearer   key-one  ", True),
        (None, False),
        ("", False),
        ("Bearer", False),
        ("Bearer ", False),
        ("Bearer key-on", False),
        ("Bearer key-one-and-more", False),
        ("Basic key-one", False),
        ("key-one", False),
        ("Bearer KEY-ONE", False),
        ("Bearer kéy-one", False),
        ("Bearer key-one\udcff", False),
    ],
)
def test_client_key_ok(authorization: str | None, ok: bool) -> None:
    assert client_key_ok(CONFIG, authorization) is ok


@pytest.mark.parametrize("authorization", [None, "", "Bearer anything", "Basic x"])
def test_no_client_keys_means_no_check(authorization: str | None) -> None:
    assert client_key_ok(AccountsConfig(accounts=CONFIG.accounts), authorization)


def test_secrets_of_lists_every_bearer_and_client_key() -> None:
    config = parse_accounts(json.dumps(README_EXAMPLE))
    assert sorted(secrets_of(config)) == sorted([TOKEN_A, KEY_B, CLIENT_KEY])
    assert secrets_of(AccountsConfig(accounts=(Account("a", "sk-1"),))) == ["sk-1"]
