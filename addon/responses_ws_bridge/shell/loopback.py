"""The loopback endpoint mitmproxy streams a bridged response from.

mitmproxy sends a response that an addon sets in the `request` hook all at once,
so a bridged flow is instead pointed at this small HTTP/1.1 server, which runs on
127.0.0.1 inside mitmproxy's own event loop; mitmproxy then relays its answer to
the client with `flow.response.stream`. Each routed flow carries a one-time,
unguessable token in a request header: a request without a live token is
refused, so the endpoint serves only the flows the addon routed to it.

The server knows nothing about Responses: a registered job gets a `ResponseSink`
and writes a status, headers and body chunks to it. A job starts as soon as it
is registered (the upstream is being opened while mitmproxy connects here);
its writes wait until mitmproxy's request arrives and claims it.

Connections are bounded in time: one that sends nothing for `idle_timeout_s`
(before a request, or between the pieces of a body) or takes longer than
`header_timeout_s` to send a request head is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable, Sequence

import h11

from responses_ws_bridge.shell.sink import ClientGone

logger = logging.getLogger(__name__)

TOKEN_HEADER = "x-responses-bridge-token"
# A job whose request never arrives (its flow died unseen) gives up after this.
CLAIM_TIMEOUT_S = 60.0
HEADER_TIMEOUT_S = 10.0
IDLE_TIMEOUT_S = 120.0
_READ_SIZE = 65536
_FORBIDDEN = (
    b'{"error":{"message":"not a bridged request","type":"invalid_request_error",'
    b'"code":"forbidden"}}'
)


class ResponseSink:
    """Writes one HTTP/1.1 response to mitmproxy; chunked unless a length is given.

    Created with the job, attached to a connection when the request arrives.
    """

    def __init__(self) -> None:
        self._conn: h11.Connection | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._attached: asyncio.Event | None = None
        self.started = False
        self.finished = False
        self.status: int | None = None

    async def start(self, status: int, headers: Sequence[tuple[str, str]]) -> None:
        self.status = status
        self.started = True
        await self._send(h11.Response(status_code=status, headers=list(headers)))

    async def write(self, data: bytes) -> None:
        if data:
            await self._send(h11.Data(data=data))

    async def finish(self) -> None:
        self.finished = True
        await self._send(h11.EndOfMessage())

    async def respond(self, status: int, headers: Sequence[tuple[str, str]], body: bytes) -> None:
        """A whole response with a known length (errors, non-streamed JSON)."""
        await self.start(status, [*headers, ("content-length", str(len(body)))])
        await self.write(body)
        await self.finish()

    def attach(self, conn: h11.Connection, writer: asyncio.StreamWriter) -> None:
        self._conn, self._writer = conn, writer
        if self._attached is not None:
            self._attached.set()

    async def _send(self, event: h11.Event) -> None:
        if self._writer is None:
            if self._attached is None:
                self._attached = asyncio.Event()
            try:
                await asyncio.wait_for(self._attached.wait(), CLAIM_TIMEOUT_S)
            except TimeoutError:
                raise ClientGone from None
        assert self._conn is not None and self._writer is not None
        if self._writer.is_closing():
            raise ClientGone
        data = self._conn.send(event)
        if data:
            self._writer.write(data)
        try:
            await self._writer.drain()
        except (ConnectionError, RuntimeError) as exc:
            raise ClientGone from exc


Job = Callable[[ResponseSink], Awaitable[None]]


class _TimedOut(Exception):
    """The peer was silent for too long; the connection is closed."""


class _Pending:
    """A registered job: running already when there is a loop, else at its claim."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.sink = ResponseSink()
        self.task: asyncio.Future[None] | None = None
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return
        self.task = asyncio.ensure_future(job(self.sink))

    def claim(self, conn: h11.Connection, writer: asyncio.StreamWriter) -> asyncio.Future[None]:
        self.sink.attach(conn, writer)
        if self.task is None:
            self.task = asyncio.ensure_future(self.job(self.sink))
        return self.task

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()


class LoopbackServer:
    """HTTP/1.1 server on 127.0.0.1 that runs one registered job per token."""

    def __init__(
        self,
        *,
        header_timeout_s: float = HEADER_TIMEOUT_S,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
    ) -> None:
        self._jobs: dict[str, _Pending] = {}
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self.port = 0
        self.header_timeout_s = header_timeout_s
        self.idle_timeout_s = idle_timeout_s

    @property
    def connections(self) -> int:
        """Connections open now (for tests and soak checks)."""
        return len(self._handlers)

    @property
    def running(self) -> bool:
        return self._server is not None

    async def start(self) -> int:
        if self._server is None:
            self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
            self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for task in list(self._handlers):
            task.cancel()
        for pending in self._jobs.values():
            pending.cancel()
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=5)
        if server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 5)
        self._jobs.clear()

    def register(self, job: Job) -> str:
        token = secrets.token_urlsafe(32)
        self._jobs[token] = _Pending(job)
        return token

    def discard(self, token: str) -> None:
        """The flow will never arrive (it failed first): stop its job."""
        pending = self._jobs.pop(token, None)
        if pending is not None:
            pending.cancel()

    @property
    def pending(self) -> int:
        return len(self._jobs)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await _Connection(
                self._jobs,
                reader,
                writer,
                header_timeout_s=self.header_timeout_s,
                idle_timeout_s=self.idle_timeout_s,
            ).run()
        except (ConnectionError, asyncio.IncompleteReadError, ClientGone, _TimedOut):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            self._handlers.discard(task)
            writer.close()


class _Connection:
    """One keep-alive connection from mitmproxy, one request at a time."""

    def __init__(
        self,
        jobs: dict[str, _Pending],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        header_timeout_s: float = HEADER_TIMEOUT_S,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
    ) -> None:
        self._jobs = jobs
        self._reader = reader
        self._writer = writer
        self._conn = h11.Connection(h11.SERVER)
        self._header_timeout_s = header_timeout_s
        self._idle_timeout_s = idle_timeout_s

    async def _read(self, timeout_s: float) -> bytes:
        try:
            async with asyncio.timeout(max(0.0, timeout_s)):
                return await self._reader.read(_READ_SIZE)
        except TimeoutError:
            raise _TimedOut from None

    async def _next_event(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        """The next event of a body; every read must come within the idle timeout."""
        while True:
            event = self._conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            self._conn.receive_data(await self._read(self._idle_timeout_s))

    async def _next_request(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        """The next request head: idle timeout until its first byte, then the header timeout."""
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        while True:
            event = self._conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            if deadline is None and self._conn.trailing_data[0]:
                deadline = loop.time() + self._header_timeout_s
            if deadline is None:
                data = await self._read(self._idle_timeout_s)
                if data:
                    deadline = loop.time() + self._header_timeout_s
            else:
                data = await self._read(deadline - loop.time())
            self._conn.receive_data(data)

    async def run(self) -> None:
        while True:
            try:
                event = await self._next_request()
            except h11.RemoteProtocolError:
                return
            if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return
            if not isinstance(event, h11.Request):
                return
            token = _header(event.headers, TOKEN_HEADER.encode())
            # The body was already parsed in the request hook; drain it here.
            try:
                while not isinstance(ev := await self._next_event(), h11.EndOfMessage):
                    if isinstance(ev, h11.ConnectionClosed):
                        return
            except h11.RemoteProtocolError:
                return
            job = self._jobs.pop(token, None) if token else None
            if job is None:
                sink = ResponseSink()
                sink.attach(self._conn, self._writer)
                await sink.respond(403, [("content-type", "application/json")], _FORBIDDEN)
            else:
                await self._run_job(job)
            if self._conn.our_state is h11.DONE and self._conn.their_state is h11.DONE:
                self._conn.start_next_cycle()
            else:
                return

    async def _run_job(self, job: _Pending) -> None:
        """Lets the job write here; cancels it as soon as mitmproxy hangs up (the client left)."""
        job_task, sink = job.claim(self._conn, self._writer), job.sink
        hangup = asyncio.ensure_future(self._wait_hangup())
        try:
            await asyncio.wait({job_task, hangup}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            hangup.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await hangup
            if not job_task.done():
                job_task.cancel()
            # Let the job close its upstream before this connection goes away.
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await job_task
        if job_task.done() and not job_task.cancelled() and job_task.exception():
            # A bug in a job must not take the proxy down: answer what can
            # still be answered and keep serving everyone else.
            logger.error("bridge job failed", exc_info=job_task.exception())
            if not sink.started:
                await sink.respond(
                    502,
                    [("content-type", "application/json")],
                    b'{"error":{"message":"the bridge failed to serve this request",'
                    b'"type":"server_error","code":"bridge_internal_error"}}',
                )
        if not sink.finished:
            raise ClientGone

    async def _wait_hangup(self) -> None:
        # mitmproxy sends nothing more on this connection while a response is
        # in flight (no pipelining), so any read result here is the end.
        data = await self._reader.read(_READ_SIZE)
        if data:
            self._conn.receive_data(data)
            # Unexpected bytes while streaming: keep them for h11, keep waiting.
            await asyncio.Event().wait()


def _header(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None
