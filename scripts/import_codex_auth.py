"""Adds a Codex CLI login (`~/.codex/auth.json`) to an accounts file as a refreshable account.

    .venv/bin/python scripts/import_codex_auth.py ~/.codex/auth.json --id me \
        --accounts accounts.json

The login's refresh token is single-use: once the bridge refreshes it, the
copy Codex CLI keeps is spent. Log Codex CLI in again (or stop using that
login there) after importing it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from responses_ws_bridge.core.accounts import (
    AccountsFileError,
    account_from_codex_auth,
    parse_accounts,
)
from responses_ws_bridge.shell.token_refresher import write_private_json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("auth_json", type=Path)
    parser.add_argument("--id", required=True, help="the account id in the accounts file")
    parser.add_argument("--accounts", type=Path, required=True, help="created when missing")
    args = parser.parse_args(argv)
    try:
        entry = account_from_codex_auth(json.loads(args.auth_json.read_text()), args.id)
        data = json.loads(args.accounts.read_text()) if args.accounts.exists() else {}
        accounts = [a for a in data.get("accounts", []) if a.get("id") != args.id]
        data["accounts"] = [*accounts, entry]
        parse_accounts(json.dumps(data))  # the result must load
    except (OSError, ValueError, AccountsFileError) as exc:
        # Never quote the files: they hold secrets.
        message = str(exc) if isinstance(exc, AccountsFileError) else type(exc).__name__
        print(f"cannot import: {message}", file=sys.stderr)
        return 1
    write_private_json(args.accounts, data)
    print(f"account {args.id!r} added to {args.accounts} (mode 0600)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
