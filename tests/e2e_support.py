"""Shared pieces of the end-to-end tests: capture data and small HTTP helpers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx

# shared/ sits beside the checkout (so it does in CI's clean clone).
CAPTURES = Path(__file__).resolve().parents[2] / "shared" / "captures" / "codex-cli-0.169.0"

WS_SCHEMES = {"http": "ws", "https": "wss"}


def load_capture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((CAPTURES / name).read_text())
    return data


def capture_request(name: str) -> tuple[list[tuple[str, str]], bytes]:
    """A captured Codex CLI HTTP request: its headers (minus framing) and JSON body."""
    capture = load_capture(name)
    headers = [(k, v) for k, v in capture["headers"] if k.lower() not in {"host", "content-length"}]
    return headers, json.dumps(capture["body"]).encode()


def header_values(headers: list[tuple[str, str]], name: str) -> list[str]:
    return [v for k, v in headers if k.lower() == name.lower()]


def client(proxy: str | None = None, timeout: float = 20.0) -> httpx.Client:
    return httpx.Client(proxy=proxy, timeout=timeout, trust_env=False)
