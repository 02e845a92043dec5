"""Importing a Codex CLI auth.json as an account."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from responses_ws_bridge.core.accounts import (
    AccountsFileError,
    account_from_codex_auth,
    parse_accounts,
)

from tests.support.data import SCRIPTS

AUTH = {
    "OPENAI_API_KEY": None,
    "tokens": {
        "id_token": "id-secret",
        "access_token": "access-secret",
        "refresh_token": "refresh-secret",
        "account_id": "acct-1",
    },
    "last_refresh": "2026-01-01T00:00:00Z",
}


def test_entry_from_auth_json() -> None:
    assert account_from_codex_auth(AUTH, "me") == {
        "id": "me",
        "access_token": "access-secret",
        "refresh_token": "refresh-secret",
        "chatgpt_account_id": "acct-1",
    }


@pytest.mark.parametrize("data", [{}, {"tokens": {"access_token": "a"}}, [], {"tokens": "x"}])
def test_no_login_is_refused_without_quoting(data: object) -> None:
    with pytest.raises(AccountsFileError) as info:
        account_from_codex_auth(data, "me")
    assert "secret" not in str(info.value)


def test_the_script_writes_a_private_accounts_file(tmp_path: Path) -> None:
    import runpy
    import sys

    auth = tmp_path / "auth.json"
    auth.write_text(json.dumps(AUTH))
    out = tmp_path / "accounts.json"
    argv = sys.argv
    sys.argv = ["import", str(auth), "--id", "me", "--accounts", str(out)]
    try:
        with pytest.raises(SystemExit) as exited:
            runpy.run_path(str(SCRIPTS / "import_codex_auth.py"), run_name="__main__")
    finally:
        sys.argv = argv
    assert exited.value.code == 0
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    (account,) = parse_accounts(out.read_text()).accounts
    assert account.refresh_token == "refresh-secret"
