"""The accounts file on disk: load it, and notice when it changes.

Parsing and validation are `accounts.parse_accounts` (pure); this only reads
the file and remembers its (mtime, size) so an edit can be picked up without a
restart.
"""

from __future__ import annotations

import os
from pathlib import Path

from responses_ws_bridge.core.accounts import AccountsConfig, AccountsFileError, parse_accounts


class AccountsFile:
    def __init__(self, path: str) -> None:
        self.path = Path(path).expanduser()
        self._stamp: tuple[int, int] | None = None

    def load(self) -> AccountsConfig:
        """Reads and validates the file; raises AccountsFileError with a clear message."""
        try:
            stat = os.stat(self.path)
            text = self.path.read_text(encoding="utf-8")
        except OSError as exc:
            raise AccountsFileError(f"cannot read {self.path}: {exc.strerror or exc}") from exc
        except UnicodeDecodeError as exc:
            raise AccountsFileError(f"{self.path} is not UTF-8 text") from exc
        config = parse_accounts(text)
        self._stamp = (stat.st_mtime_ns, stat.st_size)
        return config

    def changed(self) -> bool:
        """Whether the file differs from the one last loaded (a failed load counts as not)."""
        try:
            stat = os.stat(self.path)
        except OSError:
            return False
        return (stat.st_mtime_ns, stat.st_size) != self._stamp

    def mark_seen(self) -> None:
        """Remember the current file even though it did not load, so it is not retried."""
        try:
            stat = os.stat(self.path)
        except OSError:
            return
        self._stamp = (stat.st_mtime_ns, stat.st_size)
