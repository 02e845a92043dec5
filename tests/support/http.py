"""Small HTTP helpers shared by the end-to-end tests."""

from __future__ import annotations

import json

import httpx

from tests.support.data import load_capture

WS_SCHEMES = {"http": "ws", "https": "wss"}


def capture_request(name: str) -> tuple[list[tuple[str, str]], bytes]:
    """A captured Codex CLI HTTP request: its headers (minus framing) and JSON body."""
    capture = load_capture(name)
    headers = [(k, v) for k, v in capture["headers"] if k.lower() not in {"host", "content-length"}]
    return headers, json.dumps(capture["body"]).encode()


def header_values(headers: list[tuple[str, str]], name: str) -> list[str]:
    return [v for k, v in headers if k.lower() == name.lower()]


def client(proxy: str | None = None, timeout: float = 20.0) -> httpx.Client:
    return httpx.Client(proxy=proxy, timeout=timeout, trust_env=False)
