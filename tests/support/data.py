"""Paths of the repository's test data, and loaders that fail loudly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
FLOWS = ROOT / "flows"
SCRIPTS = ROOT / "scripts"
BRIDGE_SCRIPT = ROOT / "addon" / "bridge.py"
CAPTURES = ROOT / "tests" / "data" / "codex-cli-0.169.0"

# Every capture the tests read. Listed, not globbed, so that a missing file
# fails a test instead of silently collecting nothing.
CAPTURE_NAMES = (
    "backend-api-codex-http-sse.json",
    "backend-api-codex-websocket.json",
    "builtin-openai-provider-websocket.json",
    "http-sse.json",
    "tool-roundtrip-http-sse.json",
    "tool-roundtrip-websocket.json",
    "websocket-prewarm-answered-with-text.json",
    "websocket.json",
    "ws-rejected-404-fallback-http.json",
)


def load_capture(name: str) -> dict[str, Any]:
    """One Codex CLI capture from `tests/data/`; a missing file is an error."""
    path = CAPTURES / name
    if not path.is_file():
        raise FileNotFoundError(f"test data missing: {path}")
    data: dict[str, Any] = json.loads(path.read_text())
    return data
