"""Every upstream event loses the known secrets before a client, a flow or a log sees it."""

from __future__ import annotations

import json
from typing import Any

from responses_ws_bridge.core.event_relay import JsonRelay, SseRelay
from responses_ws_bridge.core.redaction import SecretScrubber

TOKEN = "account-token-echoed-1"
SCRUB = SecretScrubber([TOKEN, "client-key-1"])


def frame(type_: str, seq: int, **fields: Any) -> str:
    return json.dumps({"type": type_, "sequence_number": seq, **fields}, separators=(",", ":"))


CREATED = frame("response.created", 0, response={"id": "resp_1"})
ECHO = frame("response.output_text.delta", 1, delta=f"your token is {TOKEN}")
ITEM = frame(
    "response.output_item.done",
    2,
    output_index=0,
    item={"type": "message", "content": [{"type": "output_text", "text": TOKEN}]},
)
DONE = frame("response.completed", 3, response={"id": "resp_1", "output": []})


def test_an_echoed_token_never_reaches_the_sse_stream() -> None:
    relay = SseRelay(SCRUB, lambda: 0.0)
    step = relay.take([CREATED, ECHO, ITEM, DONE])
    assert step.events == 4 and step.terminal == "response.completed"
    assert TOKEN.encode() not in step.out
    assert b"your token is <redacted>" in step.out


def test_an_echoed_token_never_reaches_the_json_answer() -> None:
    relay = JsonRelay(SCRUB, lambda: 0.0)
    step = relay.take([CREATED, ECHO, ITEM, DONE])
    assert step.body is not None
    assert TOKEN.encode() not in step.body
    assert json.loads(step.body)["output"][0]["content"][0]["text"] == "<redacted>"


def test_frames_without_a_secret_pass_as_they_came() -> None:
    relay = SseRelay(SCRUB, lambda: 0.0)
    plain = frame("response.output_text.delta", 1, delta="about sk-proj-abcdefghijklmnop")
    step = relay.take([CREATED, plain])
    assert json.dumps("about sk-proj-abcdefghijklmnop").encode() in step.out
