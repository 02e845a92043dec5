"""The local upstream's plain HTTP endpoints, in the Responses API's shapes. Pure.

What a Responses host answers besides the WebSocket: `GET …/models` (the
API's list, or the Codex backend's `{"models": [...]}` under
`/backend-api/codex/`), `POST …/responses/compact` (a `response.compaction`:
the user messages, then one `compaction` item whose encrypted content only
the account that made it can read), reads and controls of one stored
response (`GET …/responses/{id}`, `…/input_items`, `POST …/cancel`,
`DELETE`), and a side endpoint whose objects belong to the account that
created them (`POST …/files`, `GET …/files/{id}`). Objects of another account
are not found, as the real API answers.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from responses_ws_bridge.local.response_events import DEFAULT_MODEL, http_error_body, usage_for

MODELS_BODY: dict[str, Any] = {
    "object": "list",
    "data": [{"id": DEFAULT_MODEL, "object": "model", "created": 0, "owned_by": "openai"}],
}
CODEX_MODELS_BODY: dict[str, Any] = {
    "models": [{"slug": DEFAULT_MODEL, "display_name": DEFAULT_MODEL, "visibility": "list"}]
}
MODELS_ETAG = '"models-1"'


@dataclass
class Stored:
    """A completed response as the upstream keeps it (`store` not false)."""

    account: str | None
    request: Mapping[str, Any]
    response: Mapping[str, Any]


@dataclass
class Objects:
    """What the HTTP side reads back: stored responses and created files, by id."""

    responses: dict[str, Stored] = field(default_factory=dict)
    files: dict[str, tuple[str | None, dict[str, Any]]] = field(default_factory=dict)
    # Response id -> the account that produced it (stored or not), for previous_response_id.
    owners: Mapping[str, str | None] = field(default_factory=dict)


@dataclass(frozen=True)
class Answer:
    status: int
    body: Mapping[str, Any] | None
    headers: tuple[tuple[str, str], ...] = ()


def _not_found(kind: str, object_id: str) -> Answer:
    return Answer(404, http_error_body(404, f"No {kind} found with id '{object_id}'."))


def _json(body: bytes) -> dict[str, Any] | None:
    try:
        parsed = json.loads(body or b"{}")
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None


def answer(
    method: str, path: str, body: bytes, account: str | None, objects: Objects, *, now: int
) -> Answer:
    """The answer to one plain HTTP request of `account` (None: any, when tokens are off)."""
    parts = path.partition("?")[0].rstrip("/").split("/")
    last = parts[-1]
    if method == "GET" and (last == "models" or (len(parts) > 2 and parts[-2] == "models")):
        return _models(path, last)
    if last == "responses":
        return Answer(
            426,
            http_error_body(426, "This endpoint expects a WebSocket upgrade."),
            (("Upgrade", "websocket"),),
        )
    if method == "POST" and last == "compact" and parts[-2] == "responses":
        return _compact(body, account, objects, now=now)
    if len(parts) > 2 and parts[-2] == "responses":
        return _one_response(method, last, None, account, objects)
    if len(parts) > 3 and parts[-3] == "responses":
        return _one_response(method, parts[-2], last, account, objects)
    if last == "files" and method == "POST":
        return _create_file(body, account, objects, now=now)
    if len(parts) > 2 and parts[-2] == "files" and method == "GET":
        owner, file = objects.files.get(last, (None, None))
        if file is None or owner != account:
            return _not_found("file", last)
        return Answer(200, file)
    return Answer(404, http_error_body(404, f"Invalid URL ({method} {path})", code="not_found"))


def _models(path: str, last: str) -> Answer:
    etag = (("ETag", MODELS_ETAG),)
    if "/backend-api/codex/" in path:
        return Answer(200, CODEX_MODELS_BODY, etag)
    if last == "models":
        return Answer(200, MODELS_BODY, etag)
    for model in MODELS_BODY["data"]:
        if model["id"] == last:
            return Answer(200, model, etag)
    return _not_found("model", last)


def _user_items(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, str):
        return [
            {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": value}],
            }
        ]
    if not isinstance(value, list):
        return []
    return [i for i in value if isinstance(i, dict) and i.get("role") == "user"]


def _compact(body: bytes, account: str | None, objects: Objects, *, now: int) -> Answer:
    request = _json(body)
    if request is None:
        return Answer(400, http_error_body(400, "We could not parse the JSON body."))
    if not request.get("model"):
        return Answer(
            400, http_error_body(400, "Missing required parameter: 'model'.", code="missing")
        )
    items: list[dict[str, Any]] = []
    previous = request.get("previous_response_id")
    if previous is not None:
        if previous not in objects.owners or objects.owners[previous] != account:
            return Answer(
                400,
                http_error_body(
                    400,
                    f"Previous response with id '{previous}' not found.",
                    code="previous_response_not_found",
                ),
            )
        stored = objects.responses.get(previous)
        if stored is not None:
            items += _user_items(stored.request.get("input"))
    items += _user_items(request.get("input"))
    compaction_id = f"cmp_{uuid.uuid4().hex}"
    sealed = base64.b64encode(f"{account}:{compaction_id}".encode()).decode()
    items.append({"type": "compaction", "id": compaction_id, "encrypted_content": sealed})
    return Answer(
        200,
        {
            "id": compaction_id,
            "object": "response.compaction",
            "created_at": now,
            "output": items,
            "usage": usage_for(request, 8),
        },
    )


def _one_response(
    method: str, response_id: str, action: str | None, account: str | None, objects: Objects
) -> Answer:
    stored = objects.responses.get(response_id)
    if stored is None or stored.account != account:
        return _not_found("response", response_id)
    if action is None and method == "GET":
        return Answer(200, stored.response)
    if action is None and method == "DELETE":
        del objects.responses[response_id]
        return Answer(200, {"id": response_id, "object": "response", "deleted": True})
    if action == "input_items" and method == "GET":
        data = [
            {"id": f"msg_{response_id}_{n}", **item}
            for n, item in enumerate(_user_items(stored.request.get("input")))
        ]
        return Answer(
            200,
            {
                "object": "list",
                "data": data,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
                "has_more": False,
            },
        )
    if action == "cancel" and method == "POST":
        return Answer(
            400,
            http_error_body(400, "Only responses created with background=true can be cancelled."),
        )
    return Answer(404, http_error_body(404, "Invalid URL", code="not_found"))


def _create_file(body: bytes, account: str | None, objects: Objects, *, now: int) -> Answer:
    file_id = f"file-{uuid.uuid4().hex[:24]}"
    file = {
        "id": file_id,
        "object": "file",
        "bytes": len(body),
        "created_at": now,
        "filename": "upload",
        "purpose": "user_data",
    }
    objects.files[file_id] = (account, file)
    return Answer(200, file)
