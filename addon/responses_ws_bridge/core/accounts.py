"""The accounts file: parsing, validation, client keys, secret listing.

Pure code: `parse_accounts` takes the file's text and returns an `AccountsConfig`
or raises `AccountsFileError` naming the offending field. Nothing here reads
files, logs, or ever puts a secret into a message or a repr.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from responses_ws_bridge.core.http_fields import bearer_token

_ACCOUNT_KEYS = (
    "id",
    "access_token",
    "api_key",
    "chatgpt_account_id",
    "upstream",
    "refresh_token",
    "client_id",
)
_TOP_KEYS = ("accounts", "client_keys")
_UPSTREAM_SCHEMES = ("ws", "wss", "http", "https")


@dataclass(frozen=True, repr=False)
class Account:
    """One upstream account. `bearer` is its access_token or api_key.

    With a `refresh_token` (ChatGPT logins) the bearer is only where the
    account starts: the refresher keeps the live access token, and `bearer`
    may be empty until the first refresh.
    """

    id: str
    bearer: str
    chatgpt_account_id: str | None = None
    upstream: str | None = None
    refresh_token: str | None = None
    client_id: str | None = None

    @property
    def refreshable(self) -> bool:
        return self.refresh_token is not None

    def __repr__(self) -> str:
        return (
            f"Account(id={self.id!r}, bearer=<redacted>, "
            f"chatgpt_account_id={self.chatgpt_account_id!r}, upstream={self.upstream!r}"
            + (", refresh_token=<redacted>" if self.refresh_token else "")
            + ")"
        )

    __str__ = __repr__


@dataclass(frozen=True, repr=False)
class AccountsConfig:
    """A parsed accounts file. `client_keys` None means clients are not checked."""

    accounts: tuple[Account, ...]
    client_keys: frozenset[str] | None = None

    def __repr__(self) -> str:
        keys = "None" if self.client_keys is None else f"<{len(self.client_keys)} redacted>"
        return f"AccountsConfig(accounts={self.accounts!r}, client_keys={keys})"

    __str__ = __repr__


class AccountsFileError(ValueError):
    """The accounts file is invalid; the message names the field, never a secret."""


def parse_accounts(text: str) -> AccountsConfig:
    """Parse and validate the JSON accounts file."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        # e.msg is the parser's complaint only; the document (secrets) stays out, and
        # `from None` keeps the JSONDecodeError, which holds the whole text, unchained.
        raise AccountsFileError(
            f"not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})"
        ) from None
    if not isinstance(data, dict):
        raise AccountsFileError("top level: must be a JSON object")
    _reject_unknown_keys("top level", data, _TOP_KEYS)

    if "accounts" not in data:
        raise AccountsFileError("accounts: missing")
    raw_accounts = data["accounts"]
    if not isinstance(raw_accounts, list) or not raw_accounts:
        raise AccountsFileError("accounts: must be a non-empty list")
    accounts: list[Account] = []
    seen: set[str] = set()
    for index, raw in enumerate(raw_accounts):
        account = _parse_account(f"accounts[{index}]", raw)
        if account.id in seen:
            raise AccountsFileError(f"accounts[{index}].id: duplicate {account.id!r}")
        seen.add(account.id)
        accounts.append(account)

    client_keys: frozenset[str] | None = None
    if "client_keys" in data:
        raw_keys = data["client_keys"]
        if not isinstance(raw_keys, list):
            raise AccountsFileError("client_keys: must be a list of strings")
        if not raw_keys:
            # An empty list would lock every client out; omitting the field is the way to
            # accept any client, so an empty list is almost certainly a mistake.
            raise AccountsFileError("client_keys: must not be empty (omit it to accept any client)")
        for index, key in enumerate(raw_keys):
            if not _is_token(key):
                raise AccountsFileError(
                    f"client_keys[{index}]: must be a non-empty string without whitespace"
                )
        client_keys = frozenset(raw_keys)
    return AccountsConfig(accounts=tuple(accounts), client_keys=client_keys)


def _parse_account(where: str, raw: Any) -> Account:
    if not isinstance(raw, dict):
        raise AccountsFileError(f"{where}: must be an object")
    _reject_unknown_keys(where, raw, _ACCOUNT_KEYS)

    if "id" not in raw:
        raise AccountsFileError(f"{where}.id: missing")
    account_id = raw["id"]
    if not isinstance(account_id, str) or not account_id.strip():
        raise AccountsFileError(f"{where}.id: must be a non-empty string")
    if not account_id.isprintable():
        raise AccountsFileError(f"{where}.id: must not contain control characters")

    has_token, has_key = "access_token" in raw, "api_key" in raw
    has_refresh = "refresh_token" in raw
    if has_token and has_key:
        raise AccountsFileError(f"{where}: both access_token and api_key given")
    if has_key and has_refresh:
        raise AccountsFileError(f"{where}: refresh_token goes with access_token, not api_key")
    if not has_token and not has_key and not has_refresh:
        raise AccountsFileError(f"{where}: neither access_token nor api_key given")
    # The bearer goes into an Authorization header: whitespace or control
    # characters would corrupt it, so they are refused here, not at handshake time.
    bearer = ""
    if has_token or has_key:
        field = "access_token" if has_token else "api_key"
        bearer = raw[field]
        if not _is_token(bearer):
            raise AccountsFileError(
                f"{where}.{field}: must be a non-empty string without whitespace"
            )
    refresh_token = raw.get("refresh_token")
    if has_refresh and not _is_token(refresh_token):
        raise AccountsFileError(
            f"{where}.refresh_token: must be a non-empty string without whitespace"
        )
    client_id = raw.get("client_id")
    if client_id is not None and (not has_refresh or not _is_token(client_id)):
        raise AccountsFileError(
            f"{where}.client_id: must be a non-empty string without whitespace, "
            "next to a refresh_token"
        )

    chatgpt_account_id = raw.get("chatgpt_account_id")
    if chatgpt_account_id is not None and not _is_token(chatgpt_account_id):
        raise AccountsFileError(
            f"{where}.chatgpt_account_id: must be a non-empty string without whitespace"
        )

    upstream = raw.get("upstream")
    if upstream is not None and not _is_upstream_url(upstream):
        raise AccountsFileError(
            f"{where}.upstream: must be a ws://, wss://, http:// or https:// URL"
        )
    return Account(
        id=account_id,
        bearer=bearer,
        chatgpt_account_id=chatgpt_account_id,
        upstream=upstream,
        refresh_token=refresh_token,
        client_id=client_id,
    )


def _reject_unknown_keys(where: str, raw: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    for key in raw:
        if key not in allowed:
            raise AccountsFileError(
                f"{where}: unknown key {key!r} (expected one of {', '.join(allowed)})"
            )


def _is_token(value: Any) -> bool:
    return (
        isinstance(value, str)
        and value != ""
        and value.isprintable()
        and not any(c.isspace() for c in value)
    )


def _is_upstream_url(value: Any) -> bool:
    if not isinstance(value, str) or not value.isprintable() or " " in value:
        return False
    try:
        parts = urlsplit(value)
        _ = parts.port  # raises ValueError on a malformed port
    except ValueError:
        return False
    return parts.scheme in _UPSTREAM_SCHEMES and bool(parts.hostname)


def client_key_ok(config: AccountsConfig, authorization: str | None) -> bool:
    """Whether a client's `Authorization` header carries one of the client keys.

    Always true when the file has no `client_keys`. Every key is compared, in
    constant time, so the answer's timing says nothing about which key nearly matched.
    """
    if config.client_keys is None:
        return True
    token = bearer_token(authorization)
    if token is None:
        return False
    presented = token.encode("utf-8", "surrogateescape")
    matched = False
    for key in config.client_keys:
        matched |= hmac.compare_digest(presented, key.encode("utf-8", "surrogateescape"))
    return matched


def secrets_of(config: AccountsConfig) -> list[str]:
    """Every secret value in the config (bearers, client keys), for scrubbing logs."""
    found = [account.bearer for account in config.accounts if account.bearer]
    found.extend(a.refresh_token for a in config.accounts if a.refresh_token)
    if config.client_keys is not None:
        found.extend(sorted(config.client_keys))
    return found


def account_from_codex_auth(data: Any, account_id: str) -> dict[str, str]:
    """An accounts-file entry from a Codex CLI `auth.json` (its ChatGPT login tokens).

    Raises `AccountsFileError` when the file holds no ChatGPT login; the
    message never quotes the file.
    """
    tokens = data.get("tokens") if isinstance(data, dict) else None
    if not isinstance(tokens, dict):
        raise AccountsFileError('auth.json: no ChatGPT login ("tokens") in it')
    entry = {"id": account_id}
    for source, target in (
        ("access_token", "access_token"),
        ("refresh_token", "refresh_token"),
        ("account_id", "chatgpt_account_id"),
    ):
        value = tokens.get(source)
        if isinstance(value, str) and _is_token(value):
            entry[target] = value
    if "refresh_token" not in entry:
        raise AccountsFileError("auth.json: tokens.refresh_token missing")
    _parse_account("auth.json", entry)  # the entry must be one the accounts file accepts
    return entry
