"""The benchmark's load generator, its checks, and the figures it reports.

Lean on purpose, so that hundreds of streams on two cores measure the proxy and
not the client: raw asyncio streams with a small HTTP/1.1 response reader
(`ResponseReader`: chunked, length or close-delimited) and SSE splitter
(`SseSplitter`), or a `websockets` client for the direct path. Every turn is
checked against what the local upstreams generate (`TurnChecker`: event
sequence, the joined delta text, the terminal event) and timed: time to first
event from the request's first byte, and per stamped event the receive time
minus the upstream's `x_sent_ns`.

`Fleet` runs N concurrent streams of one target, each a keep-alive connection
doing turns one after another; the request picks its workload through
`metadata` (see `response_events.workload_metadata`). The pure figure, target
and table functions at the end turn results into the report of
`scripts/bench.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import math
import os
import ssl
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from responses_ws_bridge.local.response_events import DEFAULT_TEXT, split_text, workload_metadata
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import WebSocketException

# Events of a text turn besides its deltas: created, in_progress, item added,
# part added, text done, part done, item done, completed.
FRAMING_EVENTS = 8
TERMINAL_TYPES = frozenset(
    {"response.completed", "response.failed", "response.incomplete", "error"}
)
DELTA_TYPE = "response.output_text.delta"
_READ_SIZE = 262144


class ProtocolError(Exception):
    """The server's answer is not valid HTTP/1.1 as this reader understands it."""


# -- HTTP/1.1 response reader (no I/O) ---------------------------------------------


class ResponseReader:
    """Parses one HTTP/1.1 response fed in pieces; `feed` returns decoded body bytes.

    Handles interim 1xx answers, `Transfer-Encoding: chunked` (extensions and
    trailers skipped), `Content-Length`, and bodies that end with the
    connection. `done` is set once the body is complete.
    """

    def __init__(self, *, head_request: bool = False) -> None:
        self.status: int | None = None
        self.headers: list[tuple[str, str]] = []
        self.keep_alive = True
        self.done = False
        self._head_request = head_request
        self._buf = bytearray()
        self._mode: Literal["head", "chunked", "length", "close"] = "head"
        self._chunk: Literal["size", "data", "crlf", "trailer"] = "size"
        self._remaining = 0

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k == name), None)

    def feed(self, data: bytes) -> bytes:
        if self.done:
            if data:
                raise ProtocolError("bytes after the end of the response")
            return b""
        self._buf += data
        out = bytearray()
        while not self.done:
            if self._mode == "head":
                if not self._parse_head():
                    break
            elif self._mode == "length":
                take = min(self._remaining, len(self._buf))
                out += self._buf[:take]
                del self._buf[:take]
                self._remaining -= take
                if self._remaining == 0:
                    self._finish()
                break
            elif self._mode == "close":
                out += self._buf
                self._buf.clear()
                break
            elif not self._parse_chunked(out):
                break
        return bytes(out)

    def feed_eof(self) -> None:
        """The connection ended: fine for a close-delimited body, an error otherwise."""
        if self.done:
            return
        if self._mode == "close":
            self._finish()
            return
        raise ProtocolError("connection closed before the response was complete")

    def _finish(self) -> None:
        self.done = True
        if self._buf:
            raise ProtocolError("bytes after the end of the response")

    def _parse_head(self) -> bool:
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buf) > 65536:
                raise ProtocolError("response head too large")
            return False
        head = bytes(self._buf[:end]).decode("latin-1")
        del self._buf[: end + 4]
        status_line, *lines = head.split("\r\n")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise ProtocolError(f"bad status line {status_line!r}")
        status = int(parts[1])
        headers: list[tuple[str, str]] = []
        for line in lines:
            name, sep, value = line.partition(":")
            if not sep:
                raise ProtocolError(f"bad header line {line!r}")
            headers.append((name.strip().lower(), value.strip()))
        if 100 <= status < 200:
            return True  # an interim answer: the real one follows
        self.status, self.headers = status, headers
        connection = (self.header("connection") or "").lower()
        self.keep_alive = parts[0] == "HTTP/1.1" and "close" not in connection
        encoding = (self.header("transfer-encoding") or "").lower()
        length = self.header("content-length")
        if self._head_request or status in (204, 304):
            self._mode, self._remaining = "length", 0
            self._finish()
        elif "chunked" in encoding:
            self._mode = "chunked"
        elif length is not None:
            if not length.isdigit():
                raise ProtocolError(f"bad content-length {length!r}")
            self._mode, self._remaining = "length", int(length)
            if self._remaining == 0:
                self._finish()
        else:
            self._mode = "close"
            self.keep_alive = False
        return True

    def _parse_chunked(self, out: bytearray) -> bool:
        """One step of the chunked decoder; False when it needs more bytes."""
        if self._chunk == "data":
            if not self._buf:
                return False
            take = min(self._remaining, len(self._buf))
            out += self._buf[:take]
            del self._buf[:take]
            self._remaining -= take
            if self._remaining == 0:
                self._chunk = "crlf"
            return True
        if self._chunk == "crlf":
            if len(self._buf) < 2:
                return False
            if self._buf[:2] != b"\r\n":
                raise ProtocolError("chunk not followed by CRLF")
            del self._buf[:2]
            self._chunk = "size"
            return True
        end = self._buf.find(b"\r\n")
        if end < 0:
            if len(self._buf) > 4096:
                raise ProtocolError("chunk size line too long")
            return False
        line = bytes(self._buf[:end])
        del self._buf[: end + 2]
        if self._chunk == "trailer":
            if not line:
                self._finish()
            return True
        size_text = line.split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise ProtocolError(f"bad chunk size {size_text!r}") from None
        if size == 0:
            self._chunk = "trailer"
        else:
            self._chunk, self._remaining = "data", size
        return True


# -- SSE splitter (no I/O) -----------------------------------------------------------


class SseSplitter:
    """Splits an event stream fed in pieces into (event type, data) pairs.

    Events end with a blank line; `:` comments (keep-alives) and events
    without data are dropped, as a client would. CRLF line ends are accepted.
    """

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[tuple[str | None, str]]:
        buf = self._buf + data
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n")
        blocks = buf.split(b"\n\n")
        self._buf = blocks.pop()
        events: list[tuple[str | None, str]] = []
        for block in blocks:
            event_type: str | None = None
            data_lines: list[str] = []
            for line in block.decode("utf-8").split("\n"):
                if line.startswith("data:"):
                    data_lines.append(line[6:] if line.startswith("data: ") else line[5:])
                elif line.startswith("event:"):
                    event_type = line[6:].lstrip(" ") or None
            if data_lines:
                events.append((event_type, "\n".join(data_lines)))
        return events

    @property
    def pending(self) -> bytes:
        """Bytes of an event not yet terminated."""
        return self._buf


# -- checking one turn (no I/O) ------------------------------------------------------


@functools.cache
def expected_text(deltas: int) -> str:
    """The joined delta text a local upstream sends for a turn of `deltas` deltas."""
    return "".join(split_text(DEFAULT_TEXT, deltas))


@dataclass
class TurnResult:
    """One turn as the client saw it; `error` is None for a complete, exact turn."""

    error: str | None
    events: int
    ttfe_ns: int | None
    duration_ns: int
    # Per stamped event: receive time minus the upstream's send time, and the receive time.
    latencies_ns: list[int] = field(default_factory=list)
    received_ns: list[int] = field(default_factory=list)

    @property
    def first_event_ns(self) -> int | None:
        """When the first stamped event arrived (wall clock)."""
        return self.received_ns[0] if self.received_ns else None

    @property
    def ok(self) -> bool:
        return self.error is None


class TurnChecker:
    """Checks a turn's events as they arrive against what the local upstream generated."""

    def __init__(self, deltas: int, start_ns: int) -> None:
        self.deltas = deltas
        self.start_ns = start_ns
        self.events = 0
        self.first_ns: int | None = None
        self.last_ns = start_ns
        self.terminal: str | None = None
        self.error: str | None = None
        self.latencies_ns: list[int] = []
        self.received_ns: list[int] = []
        self._pieces: list[str] = []
        self._done_text: str | None = None

    def event(self, event_type: str | None, data: str, recv_ns: int) -> bool:
        """Takes one event; True once the turn has ended (terminal event or error)."""
        if self.first_ns is None:
            self.first_ns = recv_ns
        self.last_ns = recv_ns
        if self.terminal is not None:
            self._fail(f"event after the terminal {self.terminal}")
            return True
        try:
            body = json.loads(data)
        except ValueError:
            self._fail(f"event {self.events} is not JSON")
            return True
        if not isinstance(body, dict):
            self._fail(f"event {self.events} is not a JSON object")
            return True
        kind = body.get("type")
        if event_type is not None and event_type != kind:
            self._fail(f"event {self.events}: SSE type {event_type!r} but data type {kind!r}")
        if body.get("sequence_number") != self.events:
            self._fail(f"event {self.events} has sequence_number {body.get('sequence_number')!r}")
        sent = body.get("x_sent_ns")
        if isinstance(sent, int):
            self.latencies_ns.append(recv_ns - sent)
            self.received_ns.append(recv_ns)
        self.events += 1
        if kind == DELTA_TYPE:
            self._pieces.append(str(body.get("delta", "")))
        elif kind == "response.output_text.done":
            self._done_text = str(body.get("text"))
        elif kind in TERMINAL_TYPES:
            self.terminal = str(kind)
            self._check_end()
            return True
        return False

    def end_of_stream(self) -> None:
        """The stream ended (body complete or connection gone)."""
        if self.terminal is None:
            self._fail(f"stream ended after {self.events} events, before a terminal event")

    def fail(self, message: str) -> None:
        self._fail(message)

    def result(self) -> TurnResult:
        return TurnResult(
            error=self.error,
            events=self.events,
            ttfe_ns=None if self.first_ns is None else self.first_ns - self.start_ns,
            duration_ns=self.last_ns - self.start_ns,
            latencies_ns=self.latencies_ns,
            received_ns=self.received_ns,
        )

    def _check_end(self) -> None:
        if self.terminal != "response.completed":
            self._fail(f"turn ended with {self.terminal}")
            return
        if self.events != self.deltas + FRAMING_EVENTS:
            self._fail(f"{self.events} events, expected {self.deltas + FRAMING_EVENTS}")
        text = "".join(self._pieces)
        if text != expected_text(self.deltas):
            self._fail(f"joined delta text differs ({len(text)} characters)")
        elif self._done_text != text:
            self._fail("response.output_text.done text differs from the deltas")

    def _fail(self, message: str) -> None:
        if self.error is None:
            self.error = message


# -- the requests ----------------------------------------------------------------------

# Shaped like Codex CLI 0.169.0's requests (captures/codex-cli-0.169.0/http-sse.json
# and websocket.json: the same header names in the same order, the same body
# fields), with short texts. `{key}` is the stream's session id.
CODEX_HTTP_HEADERS: tuple[tuple[str, str], ...] = (
    ("x-codex-beta-features", "remote_compaction_v2"),
    ("x-codex-window-id", "{key}:0"),
    ("x-codex-turn-metadata", '{{"session_id":"{key}","request_kind":"turn"}}'),
    ("x-client-request-id", "{key}"),
    ("session-id", "{key}"),
    ("thread-id", "{key}"),
    ("accept", "text/event-stream"),
    ("content-type", "application/json"),
    ("authorization", "Bearer sk-bench-client-key"),
    ("originator", "codex_exec"),
    ("user-agent", "codex_exec/0.169.0 (Linux; x86_64) bench"),
)
CODEX_WS_HEADERS: tuple[tuple[str, str], ...] = (
    ("authorization", "Bearer sk-bench-client-key"),
    ("user-agent", "codex_exec/0.169.0 (Linux; x86_64) bench"),
    ("originator", "codex_exec"),
    ("openai-beta", "responses_websockets=2026-02-06"),
    ("x-codex-turn-metadata", '{{"session_id":"{key}","request_kind":"turn"}}'),
    ("x-codex-beta-features", "remote_compaction_v2"),
    ("x-client-request-id", "{key}"),
    ("session-id", "{key}"),
    ("thread-id", "{key}"),
    ("x-codex-window-id", "{key}:0"),
)


# Codex CLI's first request of a session carried 39,491 bytes (captures/http-sse.json).
CODEX_BODY_BYTES = 39_491


def codex_body(key: str, metadata: Mapping[str, str], size: int = 0) -> dict[str, Any]:
    """A Codex-like streamed Responses request body asking for a workload.

    `size`: pad the developer instructions so the JSON body has about this many
    bytes (Codex sends its whole prompt and history every turn).
    """
    body = _codex_body(key, metadata, "")
    missing = size - len(json.dumps(body, separators=(",", ":")))
    if missing > 0:
        sentence = "You are a coding agent working in a repository. "
        filler = (sentence * (missing // len(sentence) + 1))[:missing]
        body = _codex_body(key, metadata, filler)
    return body


def _codex_body(key: str, metadata: Mapping[str, str], filler: str) -> dict[str, Any]:
    return {
        "model": "gpt-5-codex",
        "stream": True,
        "input": [
            {
                "type": "message",
                "role": "developer",
                "content": [{"type": "input_text", "text": "You are a coding agent." + filler}],
            },
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]},
        ],
        "tools": [
            {
                "type": "function",
                "name": "exec_command",
                "description": "Runs a command in a PTY, returning output or a session ID.",
                "strict": False,
                "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}},
            }
        ],
        "tool_choice": "auto",
        "parallel_tool_calls": True,
        "reasoning": {"summary": "auto"},
        "store": False,
        "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": key,
        "metadata": dict(metadata),
        "client_metadata": {"session_id": key, "thread_id": key},
    }


def fill(headers: Sequence[tuple[str, str]], key: str) -> list[tuple[str, str]]:
    return [(name, value.format(key=key)) for name, value in headers]


def http_request_bytes(
    host: str, port: int, path: str, headers: Sequence[tuple[str, str]], body: bytes
) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"host: {host}:{port}"]
    lines += [f"{name}: {value}" for name, value in headers]
    lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def ws_message(body: Mapping[str, Any]) -> str:
    """The `response.create` a WebSocket client sends for an HTTP body."""
    fields = {k: v for k, v in body.items() if k not in ("stream", "background")}
    return json.dumps({"type": "response.create", **fields}, separators=(",", ":"))


# -- clients ---------------------------------------------------------------------------


class HttpTurnClient:
    """One keep-alive HTTP/1.1 connection; reconnects when the server ended the last one."""

    def __init__(self, host: str, port: int, path: str, timeout_s: float) -> None:
        self.host, self.port, self.path = host, port, path
        self.timeout_s = timeout_s
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def turn(
        self, headers: Sequence[tuple[str, str]], body: bytes, deltas: int, *, fresh: bool = False
    ) -> TurnResult:
        """One turn; `fresh`: on a new connection, its connect part of the time to first event."""
        request = http_request_bytes(self.host, self.port, self.path, headers, body)
        if fresh:
            await self.close()
        checker = TurnChecker(deltas, time.time_ns())
        try:
            async with asyncio.timeout(self.timeout_s):
                if self._writer is None:
                    self._reader, self._writer = await asyncio.open_connection(
                        self.host, self.port, limit=_READ_SIZE
                    )
                if not fresh:
                    checker.start_ns = time.time_ns()
                self._writer.write(request)
                await self._read(checker)
        except (OSError, ProtocolError, TimeoutError, UnicodeDecodeError) as exc:
            checker.fail(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
            await self.close()
        return checker.result()

    async def get(self, path: str) -> str | None:
        """A plain GET on the connection (a warm-up); the error, or None for a 200."""
        request = f"GET {path} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\n\r\n".encode()
        try:
            async with asyncio.timeout(self.timeout_s):
                if self._writer is None:
                    self._reader, self._writer = await asyncio.open_connection(
                        self.host, self.port, limit=_READ_SIZE
                    )
                assert self._reader is not None
                self._writer.write(request)
                response = ResponseReader()
                while not response.done:
                    data = await self._reader.read(_READ_SIZE)
                    if data:
                        response.feed(data)
                    else:
                        response.feed_eof()
        except (OSError, ProtocolError, TimeoutError) as exc:
            await self.close()
            return f"{type(exc).__name__}: {exc}"
        if not response.keep_alive:
            await self.close()
        return None if response.status == 200 else f"HTTP {response.status} on GET {path}"

    async def _read(self, checker: TurnChecker) -> None:
        assert self._reader is not None
        response = ResponseReader()
        sse = SseSplitter()
        error_body = bytearray()
        while not response.done:
            data = await self._reader.read(_READ_SIZE)
            now = time.time_ns()
            if data:
                body = response.feed(data)
            else:
                response.feed_eof()
                body = b""
            if response.status is None:
                continue
            if response.status != 200:
                error_body += body
                continue
            for event_type, event_data in sse.feed(body):
                checker.event(event_type, event_data, now)
        if response.status != 200:
            checker.fail(f"HTTP {response.status}: {bytes(error_body[:200])!r}")
        else:
            checker.end_of_stream()
        if not response.keep_alive:
            await self.close()

    async def close(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


class WsTurnClient:
    """One WebSocket connection to the upstream itself, a turn at a time (the direct path)."""

    def __init__(
        self,
        url: str,
        headers: Sequence[tuple[str, str]],
        timeout_s: float,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.url = url
        self.headers = list(headers)
        self.timeout_s = timeout_s
        self.ssl_context = ssl_context
        self._ws: ClientConnection | None = None

    async def turn(self, message: str, deltas: int) -> TurnResult:
        checker = TurnChecker(deltas, time.time_ns())
        try:
            async with asyncio.timeout(self.timeout_s):
                if self._ws is None:
                    tls: dict[str, Any] = (
                        {"ssl": self.ssl_context} if self.url.startswith("wss:") else {}
                    )
                    self._ws = await connect(
                        self.url,
                        additional_headers=self.headers,
                        compression=None,
                        max_size=None,
                        ping_interval=None,
                        **tls,
                    )
                checker.start_ns = time.time_ns()
                await self._ws.send(message)
                async for frame in self._ws:
                    text = frame if isinstance(frame, str) else frame.decode()
                    if checker.event(None, text, time.time_ns()):
                        break
                else:
                    checker.end_of_stream()
        except (OSError, WebSocketException, TimeoutError) as exc:
            checker.fail(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
            await self.close()
        return checker.result()

    async def close(self) -> None:
        ws, self._ws = self._ws, None
        if ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 5)


@dataclass(frozen=True)
class Target:
    """Where a path's requests go: `http` (through a proxy) or `ws` (the upstream itself)."""

    name: str
    kind: Literal["http", "ws"]
    host: str
    port: int
    path: str = "/v1/responses"
    # The direct path's upstream speaks TLS: the context that trusts it.
    ssl_context: ssl.SSLContext | None = None

    @property
    def ws_url(self) -> str:
        scheme = "wss" if self.ssl_context is not None else "ws"
        return f"{scheme}://{self.host}:{self.port}{self.path}"


class Fleet:
    """`streams` concurrent clients of one target; stream i uses the key `{prefix}-{i}`.

    Each stream keeps its connection between turns, so a warm-up `run` leaves
    connections (and, through a bridge with reuse, upstream sessions) open for
    the measured one.
    """

    def __init__(
        self,
        target: Target,
        streams: int,
        prefix: str,
        timeout_s: float = 60.0,
        body_bytes: int = CODEX_BODY_BYTES,
    ):
        self.target = target
        self.body_bytes = body_bytes
        self.keys = [f"{prefix}-{i}" for i in range(streams)]
        self.timeout_s = timeout_s
        self._http = [
            HttpTurnClient(target.host, target.port, target.path, timeout_s) for _ in self.keys
        ]
        self._ws = [
            WsTurnClient(target.ws_url, fill(CODEX_WS_HEADERS, key), timeout_s, target.ssl_context)
            for key in self.keys
        ]

    async def run(
        self,
        *,
        deltas: int,
        pace_ms: float = 0.0,
        turns: int = 1,
        stamp: bool = True,
        fresh: bool = False,
        key_per_turn: bool = False,
        gap_s: float = 0.0,
    ) -> list[TurnResult]:
        """Every stream does `turns` turns one after another, all streams at once.

        `fresh`: each HTTP turn on a new client connection (so a plain proxy opens
        a new upstream connection too), its connect counted; `key_per_turn`: each
        turn a new session (so a bridge has no idle session for it); `gap_s`:
        a pause between a stream's turns, not counted.
        """
        metadata = workload_metadata(deltas=deltas, pace_ms=pace_ms, stamp=stamp)
        per_stream = await asyncio.gather(
            *(
                self._stream(i, metadata, deltas, turns, fresh, key_per_turn, gap_s)
                for i in range(len(self.keys))
            )
        )
        return [result for results in per_stream for result in results]

    async def connect(self, models_path: str = "/v1/models") -> list[str]:
        """Opens every stream's connection without a turn (for HTTP: a GET); the errors."""
        if self.target.kind == "ws":
            results = await self.run(deltas=0)
            return [r.error for r in results if r.error is not None]
        errors = await asyncio.gather(*(client.get(models_path) for client in self._http))
        return [error for error in errors if error is not None]

    async def _stream(
        self,
        index: int,
        metadata: Mapping[str, str],
        deltas: int,
        turns: int,
        fresh: bool = False,
        key_per_turn: bool = False,
        gap_s: float = 0.0,
    ) -> list[TurnResult]:
        results: list[TurnResult] = []
        built: str | None = None
        message, headers, data = "", list[tuple[str, str]](), b""
        for number in range(turns):
            if number and gap_s:
                await asyncio.sleep(gap_s)
            key = f"{self.keys[index]}-t{number}" if key_per_turn else self.keys[index]
            if key != built:
                # Built before the turn starts, so never part of its figures.
                body = codex_body(key, metadata, self.body_bytes)
                message = ws_message(body)
                headers = fill(CODEX_HTTP_HEADERS, key)
                data = json.dumps(body, separators=(",", ":")).encode()
                built = key
            if self.target.kind == "ws":
                results.append(await self._ws[index].turn(message, deltas))
            else:
                results.append(await self._http[index].turn(headers, data, deltas, fresh=fresh))
        return results

    async def close(self) -> None:
        await asyncio.gather(
            *(client.close() for client in self._http), *(client.close() for client in self._ws)
        )


# -- process figures (Linux /proc) -----------------------------------------------------


@dataclass(frozen=True)
class ProcSample:
    """CPU seconds used so far (user + system, all threads), current and peak RSS."""

    cpu_s: float
    rss_kib: int
    peak_rss_kib: int


def parse_stat_cpu_s(stat: str, ticks_per_s: int) -> float:
    """utime + stime from the text of /proc/PID/stat, in seconds."""
    # The command name (field 2) may hold spaces and parentheses: split after its end.
    fields = stat[stat.rindex(")") + 2 :].split()
    # Fields 14 and 15 of the whole line are utime and stime; `fields` starts at field 3.
    return (int(fields[11]) + int(fields[12])) / ticks_per_s


def parse_status_kib(status: str, name: str) -> int:
    """A `Name:   123 kB` field of /proc/PID/status."""
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key == name:
            return int(value.split()[0])
    raise ValueError(f"no {name} in /proc status")


def parse_schedstat_s(schedstat: str) -> float:
    """Time on CPU from the text of /proc/PID/task/TID/schedstat (nanoseconds), in seconds."""
    return int(schedstat.split()[0]) / 1e9


def cpu_seconds(pid: int) -> float:
    """CPU time of a process's live threads, in nanosecond resolution where the kernel has it.

    /proc/PID/stat counts in clock ticks (10 ms), too coarse for short workloads.
    """
    try:
        total = 0.0
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat") as schedstat:
                total += parse_schedstat_s(schedstat.read())
        return total
    except (OSError, ValueError, IndexError):
        with open(f"/proc/{pid}/stat") as stat:
            return parse_stat_cpu_s(stat.read(), os.sysconf("SC_CLK_TCK"))


def sample_process(pid: int) -> ProcSample:
    with open(f"/proc/{pid}/status") as status:
        status_text = status.read()
    return ProcSample(
        cpu_s=cpu_seconds(pid),
        rss_kib=parse_status_kib(status_text, "VmRSS"),
        peak_rss_kib=parse_status_kib(status_text, "VmHWM"),
    )


def reset_peak_rss(pid: int) -> bool:
    """Resets VmHWM to the current RSS (Linux ≥ 4.0), so a peak is per workload."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        return False
    return True


# -- figures (no I/O) ----------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100), linearly interpolated; None without values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _ms(ns: float | None) -> float | None:
    return None if ns is None else round(ns / 1e6, 3)


def steady_latencies(results: Sequence[TurnResult]) -> list[float]:
    """Latencies of the events received once every stream had its first event.

    Concurrent streams start together, so their first events queue behind
    every stream's start-up; this leaves that burst (which the time to first
    event shows) out of the per-event figure.
    """
    starts = [r.first_event_ns for r in results]
    if not starts or None in starts:
        return []
    cut = max(start for start in starts if start is not None)
    return [
        float(latency)
        for r in results
        for latency, received in zip(r.latencies_ns, r.received_ns, strict=True)
        if received >= cut
    ]


def turn_figures(
    results: Sequence[TurnResult], wall_s: float, *, steady: bool = False
) -> dict[str, Any]:
    """What the client measured for one path and workload.

    `steady`: add the latency figures of `steady_latencies` (concurrent single turns).
    """
    errors = [r.error for r in results if r.error is not None]
    events = sum(r.events for r in results)
    ttfe = [float(r.ttfe_ns) for r in results if r.ttfe_ns is not None]
    latencies = [float(ns) for r in results for ns in r.latencies_ns]
    figures: dict[str, Any] = {
        "turns": len(results),
        "complete": len(results) - len(errors),
        "errors": len(errors),
        "first_errors": sorted(set(errors))[:3],
        "events": events,
        "wall_s": round(wall_s, 4),
        "events_per_s": round(events / wall_s, 1) if wall_s > 0 else None,
        "ttfe_ms_p50": _ms(percentile(ttfe, 50)),
        "ttfe_ms_p99": _ms(percentile(ttfe, 99)),
        "latency_ms_p50": _ms(percentile(latencies, 50)),
        "latency_ms_p99": _ms(percentile(latencies, 99)),
    }
    if steady:
        settled = steady_latencies(results)
        figures["steady_events"] = len(settled)
        figures["steady_latency_ms_p50"] = _ms(percentile(settled, 50))
        figures["steady_latency_ms_p99"] = _ms(percentile(settled, 99))
    return figures


def process_figures(before: ProcSample, after: ProcSample, events: int) -> dict[str, Any]:
    """What one process (proxy, upstream, client) cost during a workload."""
    cpu_s = max(0.0, after.cpu_s - before.cpu_s)
    return {
        "cpu_s": round(cpu_s, 3),
        "cpu_ms_per_1k_events": round(cpu_s * 1e6 / events, 3) if events else None,
        "rss_kib": after.rss_kib,
        "peak_rss_kib": after.peak_rss_kib,
    }


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return round(numerator / denominator, 3)


# -- the report (no I/O) -----------------------------------------------------------------

PATHS = ("direct", "passthrough", "bridge_fresh", "bridge_reused", "bridge_preconnect")
BRIDGE_PATHS = ("bridge_fresh", "bridge_reused", "bridge_preconnect")
# The paths every workload runs on; connections made ahead only matter for the first event.
STANDARD_PATHS = ("direct", "passthrough", "bridge_fresh", "bridge_reused")
RATIO_METRICS = (
    ("client", "ttfe_ms_p50"),
    ("client", "ttfe_ms_p99"),
    ("client", "latency_ms_p50"),
    ("client", "latency_ms_p99"),
    ("client", "steady_latency_ms_p99"),
    ("client", "events_per_s"),
    ("proxy", "cpu_ms_per_1k_events"),
    ("proxy", "peak_rss_kib"),
)
IDLE_SESSION_LIMIT_KIB = 64.0
# "Flat in the number of turns": what 9 more turns may add per session, at most.
IDLE_GROWTH_LIMIT_KIB = IDLE_SESSION_LIMIT_KIB / 10
# Time to first event over a new upstream connection, bridge / passthrough, at most.
TTFE_LIMITS = {"bridge_reused": 0.4, "bridge_preconnect": 0.75, "bridge_fresh": 1.1}
INDICATIVE = "a {mode} run: few samples, so these verdicts are indicative only"
# A paced workload whose direct client gets less than this share of the events/s its
# upstream offers is not paced on this machine: client, upstream and proxy are saturated.
# (One stream alone gets about 0.93: a 5 ms sleep lasts a little longer.)
PACED_SHARE = 0.8


@dataclass(frozen=True)
class WorkloadSpec:
    """One workload: `streams` concurrent streams, each `turns` turns of `deltas` deltas.

    Kind "first" measures the time to the first event of a request that opens
    what it needs: a new client connection per turn (so plain mitmproxy opens a
    new upstream connection, TCP and TLS), a new session per turn except on
    `bridge_reused`, `gap_ms` apart (so a connection made ahead is replaced in between).
    `rtt_ms`: the round-trip time the network relay adds.
    """

    name: str
    kind: Literal["short", "long", "paced", "flood", "first"]
    streams: int
    turns: int
    deltas: int
    pace_ms: float = 0.0
    rtt_ms: float = 0.0
    gap_ms: float = 0.0
    paths: tuple[str, ...] = STANDARD_PATHS

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "streams": self.streams,
            "turns_per_stream": self.turns,
            "deltas": self.deltas,
            "events_per_turn": self.deltas + FRAMING_EVENTS,
            "pace_ms": self.pace_ms,
            "rtt_ms": self.rtt_ms,
            "gap_ms": self.gap_ms,
            "paths": list(self.paths),
            # What the upstream tries to send per second on paced streams (None: as fast as it can).
            "offered_events_per_s": round(self.streams * 1000 / self.pace_ms)
            if self.pace_ms
            else None,
        }


def saturation_notes(
    workloads: Sequence[Mapping[str, Any]], results: Mapping[str, Mapping[str, Any]]
) -> list[str]:
    """A note for each paced workload this machine could not run at its pace."""
    notes = []
    for workload in workloads:
        offered = workload.get("offered_events_per_s")
        got = _figure(results, "direct", workload["name"], "client", "events_per_s")
        if not offered or got is None or got >= PACED_SHARE * offered:
            continue
        notes.append(
            f"{workload['name']}: the direct client got {got:,.0f} of the {offered:,} events/s "
            f"offered ({got / offered:.0%}), so the machine is saturated: this workload "
            "compares saturated processes, not paced streams, and its CPU and latency "
            "figures move from run to run with how events happen to batch"
        )
    return notes


def add_added_latency(results: dict[str, dict[str, dict[str, Any]]]) -> None:
    """Latency over the direct path's at the same workload (what the proxy adds)."""
    direct = results.get("direct", {})
    for by_workload in results.values():
        for workload, figures in by_workload.items():
            floor = direct.get(workload, {}).get("client", {})
            client = figures["client"]
            for prefix in ("", "steady_"):
                if f"{prefix}latency_ms_p50" not in client:
                    continue
                for q in ("p50", "p99"):
                    value = client.get(f"{prefix}latency_ms_{q}")
                    base = floor.get(f"{prefix}latency_ms_{q}")
                    added = None if value is None or base is None else round(value - base, 3)
                    client[f"added_{prefix}latency_ms_{q}"] = added


def ratios(results: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """bridge/passthrough and bridge/direct for every workload and metric both have."""
    out: dict[str, Any] = {}
    workloads = {w for by_workload in results.values() for w in by_workload}
    for workload in sorted(workloads):
        rows: dict[str, Any] = {}
        for section, metric in RATIO_METRICS:
            row: dict[str, float] = {}
            for bridge in BRIDGE_PATHS:
                for base in ("passthrough", "direct"):
                    value = ratio(
                        _figure(results, bridge, workload, section, metric),
                        _figure(results, base, workload, section, metric),
                    )
                    if value is not None:
                        row[f"{bridge}/{base}"] = value
            if row:
                rows[metric] = row
        out[workload] = rows
    return out


def _figure(
    results: Mapping[str, Mapping[str, Mapping[str, Any]]],
    path: str,
    workload: str,
    section: str,
    metric: str,
) -> float | None:
    part = results.get(path, {}).get(workload, {}).get(section)
    if not isinstance(part, Mapping):
        return None
    value = part.get(metric)
    return float(value) if isinstance(value, int | float) else None


def _target(
    name: str, path: str, workload: str, value: float | None, limit: float | None, *, strict: bool
) -> dict[str, Any]:
    met: bool | None = None
    if value is not None and limit is not None:
        met = value < limit if strict else value <= limit
    return {
        "target": name,
        "path": path,
        "workload": workload,
        "value": value,
        "limit": limit,
        "met": met,
        # How far off: value / limit (> 1 is worse than the limit).
        "value_over_limit": ratio(value, limit),
    }


def evaluate_targets(
    results: Mapping[str, Mapping[str, Mapping[str, Any]]],
    workloads: Sequence[WorkloadSpec],
    idle: Mapping[str, Any] | None,
    rtt_ms: float | None = None,
) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured value, its limit and whether it is met.

    The time-to-first-event targets are judged at `rtt_ms` (default: the
    first "first" workload's RTT).
    """
    targets: list[dict[str, Any]] = []
    paced = [w for w in workloads if w.kind == "paced"]
    firsts = [w for w in workloads if w.kind == "first"]
    first = next((w for w in firsts if rtt_ms is None or w.rtt_ms == rtt_ms), None)
    for bridge in BRIDGE_PATHS:
        if bridge not in results:
            continue
        ran = results[bridge]
        for w in workloads:
            if w.kind in ("long", "flood") and w.name in ran:
                cpu = _figure(results, bridge, w.name, "proxy", "cpu_ms_per_1k_events")
                base = _figure(results, "passthrough", w.name, "proxy", "cpu_ms_per_1k_events")
                targets.append(
                    _target(
                        "cpu per event ≤ 1.0x passthrough (ms/1k events)",
                        bridge,
                        w.name,
                        cpu,
                        base,
                        strict=False,
                    )
                )
        for w in paced:
            if w.name not in ran:
                continue
            for prefix, what in (("", "all events"), ("steady_", "steady state")):
                metric = f"added_{prefix}latency_ms_p99"
                targets.append(
                    _target(
                        f"added latency p99, {what}, ≤ passthrough's (ms)",
                        bridge,
                        w.name,
                        _figure(results, bridge, w.name, "client", metric),
                        _figure(results, "passthrough", w.name, "client", metric),
                        strict=False,
                    )
                )
        if first is not None and first.name in ran:
            factor = TTFE_LIMITS[bridge]
            base = _figure(results, "passthrough", first.name, "client", "ttfe_ms_p50")
            targets.append(
                _target(
                    f"time to first event p50 at {first.rtt_ms:g} ms RTT, TLS, "
                    f"≤ {factor:g}x passthrough's (ms)",
                    bridge,
                    first.name,
                    _figure(results, bridge, first.name, "client", "ttfe_ms_p50"),
                    None if base is None else round(factor * base, 3),
                    strict=False,
                )
            )
        widest = max((w for w in paced if w.name in ran), key=lambda w: w.streams, default=None)
        if widest is not None:
            client = ran.get(widest.name, {}).get("client", {})
            errors = client.get("errors")
            targets.append(
                _target(
                    f"{widest.streams} concurrent streams complete and byte-exact "
                    f"at {widest.rtt_ms:g} ms RTT (errors)",
                    bridge,
                    widest.name,
                    None if errors is None else float(errors),
                    0.0,
                    strict=False,
                )
            )
    if idle is not None:
        path = str(idle.get("path", "bridge_reused"))
        turns = idle.get("turns")
        targets.append(
            _target(
                f"RSS per idle reused session after {turns} turns, recording on, "
                f"≤ {IDLE_SESSION_LIMIT_KIB:g} KiB",
                path,
                "idle_sessions",
                idle.get("kib_per_session"),
                IDLE_SESSION_LIMIT_KIB,
                strict=False,
            )
        )
        first_kib, last_kib = idle.get("kib_per_session_1"), idle.get("kib_per_session")
        growth = (
            round(last_kib - first_kib, 2)
            if isinstance(first_kib, int | float) and isinstance(last_kib, int | float)
            else None
        )
        targets.append(
            _target(
                f"RSS per idle session flat in turns: growth from 1 to {turns} turns "
                f"≤ {IDLE_GROWTH_LIMIT_KIB:g} KiB",
                path,
                "idle_sessions",
                growth,
                IDLE_GROWTH_LIMIT_KIB,
                strict=False,
            )
        )
    return targets


_CLIENT_FIGURES = (
    "turns",
    "complete",
    "errors",
    "events",
    "wall_s",
    "events_per_s",
    "ttfe_ms_p50",
    "ttfe_ms_p99",
)
_PROXY_FIGURES = ("cpu_s", "cpu_ms_per_1k_events", "rss_kib", "peak_rss_kib")


def check_document(doc: Mapping[str, Any]) -> list[str]:
    """Problems with a benchmark JSON document: missing parts, non-numbers, errors."""
    keys = ("date", "mode", "machine", "paths", "workloads", "results", "ratios", "targets")
    problems = [f"missing {key}" for key in keys if key not in doc]
    if problems:
        return problems
    for path in doc["paths"]:
        for workload in doc["workloads"]:
            if path in workload.get("paths", doc["paths"]):
                figures = doc["results"].get(path, {}).get(workload["name"])
                problems += _check_figures(path, workload, figures)
    idle = doc.get("idle_sessions")
    if "bridge_reused" in doc["paths"]:
        if not isinstance(idle, Mapping) or not _is_number(idle.get("kib_per_session")):
            problems.append("idle_sessions: missing kib_per_session")
        elif idle.get("errors"):
            problems.append(f"idle_sessions: {idle['errors']} errors")
    return problems


def _check_figures(path: str, workload: Mapping[str, Any], figures: Any) -> list[str]:
    """Problems with one path's figures for one workload."""
    where = f"{path} x {workload['name']}"
    if not isinstance(figures, Mapping):
        return [f"{where}: missing"]
    problems = _check_client(where, workload, figures.get("client", {}))
    if path == "direct":
        return problems
    proxy = figures.get("proxy")
    if not isinstance(proxy, Mapping):
        return [*problems, f"{where}: no proxy figures"]
    return problems + _not_numbers(where, "proxy", proxy, _PROXY_FIGURES)


def _check_client(where: str, workload: Mapping[str, Any], client: Mapping[str, Any]) -> list[str]:
    problems = _not_numbers(where, "client", client, _CLIENT_FIGURES)
    paced = workload["pace_ms"] and workload["streams"]
    if paced and not _is_number(client.get("latency_ms_p99")):
        problems.append(f"{where}: no latency figures")
    if client.get("errors"):
        problems.append(f"{where}: {client['errors']} errors {client['first_errors']}")
    expected = workload["streams"] * workload["turns_per_stream"]
    if client.get("complete") != expected:
        problems.append(f"{where}: {client.get('complete')} of {expected} turns")
    return problems


def _not_numbers(
    where: str, side: str, figures: Mapping[str, Any], names: tuple[str, ...]
) -> list[str]:
    return [
        f"{where}: {side} {name} is {figures.get(name)!r}"
        for name in names
        if not _is_number(figures.get(name))
    ]


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _cell(value: object, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def format_report(doc: Mapping[str, Any], *, markdown: bool = False) -> str:
    """The tables a person reads: figures per path and workload, ratios, targets.

    `markdown`: GitHub tables (for the README) instead of aligned text.
    """
    render = _markdown_table if markdown else _table
    parts = [render(_figure_rows(doc)), render(_ratio_rows(doc))]
    idle = doc.get("idle_sessions")
    if idle:
        parts.append(
            f"idle reused sessions: {idle['sessions']} held, RSS each "
            f"{_cell(idle.get('kib_per_session_1'), 1)} KiB after 1 turn, "
            f"{_cell(idle.get('kib_per_session'), 1)} KiB after {idle.get('turns')} turns; "
            f"{_cell(idle.get('fds_per_session'), 2)} sockets each"
        )
    parts.append(render(_target_rows(doc)))
    parts += [f"note: {note}" for note in doc.get("notes", [])]
    if doc.get("mode") != "full":
        parts.append(INDICATIVE.format(mode=doc.get("mode")))
    return "\n\n".join(parts)


def _figure_rows(doc: Mapping[str, Any]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = [
        (
            "workload",
            "path",
            "turns ok",
            "TTFE p50 ms",
            "TTFE p99 ms",
            "lat p50 ms",
            "lat p99 ms",
            "added p50",
            "added p99",
            "steady added p99",
            "events/s",
            "proxy CPU ms/1k ev",
            "proxy peak RSS MiB",
        )
    ]
    for workload in doc["workloads"]:
        name = workload["name"]
        for path in doc["paths"]:
            figures = doc["results"].get(path, {}).get(name)
            if figures is None:
                continue
            client, proxy = figures["client"], figures.get("proxy") or {}
            peak = proxy.get("peak_rss_kib")
            rows.append(
                (
                    name,
                    path,
                    f"{client['complete']}/{client['turns']}",
                    _cell(client["ttfe_ms_p50"]),
                    _cell(client["ttfe_ms_p99"]),
                    _cell(client.get("latency_ms_p50")),
                    _cell(client.get("latency_ms_p99")),
                    _cell(client.get("added_latency_ms_p50")),
                    _cell(client.get("added_latency_ms_p99")),
                    _cell(client.get("added_steady_latency_ms_p99")),
                    _cell(client["events_per_s"], 0),
                    _cell(proxy.get("cpu_ms_per_1k_events")),
                    _cell(None if peak is None else peak / 1024, 1),
                )
            )
    return rows


def _ratio_rows(doc: Mapping[str, Any]) -> list[tuple[str, ...]]:
    columns = [f"{b}/{base}" for b in BRIDGE_PATHS for base in ("passthrough", "direct")]
    rows: list[tuple[str, ...]] = [("workload", "metric", *columns)]
    for workload, metrics in doc["ratios"].items():
        for metric, row in metrics.items():
            rows.append((workload, metric, *(_cell(row.get(c), 3) for c in columns)))
    return rows


def _target_rows(doc: Mapping[str, Any]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = [("target", "path", "workload", "value", "limit", "verdict")]
    for target in doc["targets"]:
        met = target["met"]
        verdict = "n/a" if met is None else "met" if met else "MISSED"
        if met is False and target["value_over_limit"] is not None:
            verdict += f" ({target['value_over_limit']:.2f}x the limit)"
        rows.append(
            (
                target["target"],
                target["path"],
                target["workload"],
                _cell(target["value"], 3),
                _cell(target["limit"], 3),
                verdict,
            )
        )
    return rows


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _markdown_table(rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    # Numbers right-aligned, names left.
    numeric = [
        all(row[i] == "-" or row[i][:1].isdigit() or row[i][:1] == "-" for row in rows[1:])
        for i in range(len(rows[0]))
    ]
    align = ["---:" if is_number else "---" for is_number in numeric]
    lines.insert(1, "| " + " | ".join(align) + " |")
    return "\n".join(lines)
