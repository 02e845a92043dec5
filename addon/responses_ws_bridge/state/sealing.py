"""Token chains sealed for the shared store: AES-256-GCM under `bridge_state_secret`.

Every instance reads the same secret file; the key is derived from it with
HKDF-SHA256 (bound to the namespace), so any long random string works as the
file's content. Each sealed value has its own random 96-bit nonce and is bound
(as associated data) to its namespace, account and generation: a value copied
to another account's key, or replayed as another generation, does not open.
Whoever reads the store without the secret learns an account's generation
number and nothing else.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import stat
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MIN_SECRET_BYTES = 16
_NONCE_BYTES = 12
_KDF_SALT = b"responses-ws-bridge token chain v1"


class SecretFileError(ValueError):
    """The secret file cannot be used; the message names the file, never its content."""


def read_secret_file(path: str | Path) -> bytes:
    """The secret in `path` (surrounding whitespace removed), or SecretFileError."""
    file = Path(path).expanduser()
    try:
        data = file.read_bytes().strip()
        mode = os.stat(file).st_mode
    except OSError as exc:
        raise SecretFileError(f"cannot read {file}: {exc.strerror or exc}") from exc
    if len(data) < MIN_SECRET_BYTES:
        raise SecretFileError(
            f"{file} holds {len(data)} bytes; a secret of at least {MIN_SECRET_BYTES} random "
            "bytes is needed (e.g. `openssl rand -base64 32 > FILE`)"
        )
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SecretFileError(f"{file} is readable by others; chmod 600 it")
    return data


class TokenSeal:
    """Seals and opens one namespace's token chains."""

    def __init__(self, secret: bytes, namespace: str) -> None:
        key = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=_KDF_SALT, info=namespace.encode()
        ).derive(secret)
        self._aead = AESGCM(key)
        self.namespace = namespace

    def __repr__(self) -> str:
        return f"TokenSeal(namespace={self.namespace!r}, <key redacted>)"

    def _aad(self, account_id: str, generation: int) -> bytes:
        return json.dumps([self.namespace, account_id, generation]).encode()

    def seal(self, account_id: str, generation: int, value: Any) -> str:
        nonce = os.urandom(_NONCE_BYTES)
        plaintext = json.dumps(value, separators=(",", ":")).encode()
        sealed = self._aead.encrypt(nonce, plaintext, self._aad(account_id, generation))
        return base64.b64encode(nonce + sealed).decode("ascii")

    def open(self, account_id: str, generation: int, sealed: str) -> Any | None:
        """The sealed value, or None when it does not open (another key, tampered, garbage)."""
        try:
            raw = base64.b64decode(sealed.encode("ascii"), validate=True)
            plaintext = self._aead.decrypt(
                raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], self._aad(account_id, generation)
            )
            return json.loads(plaintext)
        except (InvalidTag, ValueError, binascii.Error, UnicodeEncodeError):
            return None
