"""`make demo`: one streamed request through the bridge, then exit.

Starts the local upstream and `mitmdump -s addon/bridge.py` on 127.0.0.1, sends
the Codex CLI's captured HTTP headers (with a made-up key) and a small body,
and prints side by side what the client sent and what reached the upstream
WebSocket handshake, then the SSE events the client got back.
"""

from __future__ import annotations

import itertools
import json
import sys

import httpx
from harness.proxy_process import ProxyProcess
from responses_ws_bridge.core.sse import parse_sse
from responses_ws_bridge.local.upstream import ThreadedUpstream

CLIENT_HEADERS = [
    ("accept", "text/event-stream"),
    ("content-type", "application/json"),
    ("authorization", "Bearer sk-demo-not-a-real-key"),
    ("cookie", "session=should-never-go-upstream"),
    ("openai-beta", "responses=experimental"),
    ("session-id", "01a20a0c-2cb0-7f10-9eb8-be1382b0dfae"),
    ("x-client-request-id", "01a20a0c-2cb0-7f10-9eb8-be1382b0dfae"),
    ("originator", "codex_exec"),
    ("user-agent", "codex_exec/0.169.0 (Debian 12.0.0; x86_64) xterm (codex_exec; 0.169.0)"),
]
BODY = {"model": "gpt-5-codex", "input": "Say hello", "stream": True, "store": False}


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def main() -> int:
    with (
        ThreadedUpstream() as upstream,
        ProxyProcess(
            "--mode",
            f"reverse:http://127.0.0.1:{upstream.port}",
            "--set",
            "connection_strategy=lazy",
        ) as proxy,
        httpx.Client(trust_env=False, timeout=20) as http,
    ):
        response = http.post(f"{proxy.url}/v1/responses", headers=CLIENT_HEADERS, json=BODY)
        (record,) = upstream.records()
    sent = [f"{k}: {v}" for k, v in CLIENT_HEADERS]
    received = [f"{k}: {v}" for k, v in record.headers]
    width = 60
    print(f"{'client → bridge (HTTP POST /v1/responses)':<{width}}  bridge → upstream (WebSocket)")
    print(f"{'-' * width}  {'-' * width}")
    for left, right in itertools.zip_longest(sent, received, fillvalue=""):
        print(f"{_clip(left, width):<{width}}  {_clip(right, width)}")
    print(f"\nHTTP {response.status_code} {response.headers.get('content-type')}")
    text = ""
    for event_type, data in parse_sse(response.content):
        event = json.loads(data)
        delta = event.get("delta", "")
        text += delta
        shown = json.dumps(delta) if delta else ""
        print(f"  {event.get('sequence_number', '-'):>3}  {event_type}  {shown}")
    print(f"\ntext: {text!r}")
    print(f"first WebSocket message: {_clip(json.dumps(record.messages[0].data), 120)}")
    return 0 if response.status_code == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
