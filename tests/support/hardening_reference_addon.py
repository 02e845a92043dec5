"""A minimal mitmproxy addon wiring the pre-flight pieces the way the bridge addon must.

Test support only: it proves, against a real mitmdump, that the hook sequence
below answers oversized or unauthenticated requests without buffering their
bodies and then closes the connection, and that a good body still arrives
whole. Instead of an upstream turn, a good request is answered with the
decoded body's size. The client key is `--set reference_client_key=...`.

1. `requestheaders`: `request_checks.early_answer(...)`. An answer: drop
   `Expect` (mitmproxy would otherwise grant 100-continue right after this
   hook), register it with `LoopbackServer.register_answer`, give the flow a
   stream callable that drops every chunk, and detour it to the loopback.
   No answer: a `BodyCollector` becomes the stream callable and a job
   registered with `answer_before_body=True` awaits its result. Either way
   the detoured request says `content-length: 0` (nothing is forwarded).
2. `responseheaders`: restore the destination; stream the response.
3. `response`: for an early answer or a refused body, `flow.kill()`: the
   answer was already streamed, so mitmproxy only closes the connection.
"""

from __future__ import annotations

import json

from mitmproxy import ctx, http
from mitmproxy.addonmanager import Loader
from responses_ws_bridge.core import request_checks
from responses_ws_bridge.shell.loopback import TOKEN_HEADER, LoopbackServer, ResponseSink
from responses_ws_bridge.shell.request_body import BodyCollector, BodyRefused

READY = "Responses bridge ready"


def _discard(chunk: bytes) -> bytes:
    return b""


class HardeningReference:
    def __init__(self) -> None:
        self.loopback = LoopbackServer()
        self._detoured: dict[str, tuple[str, str, int]] = {}
        self._close: set[str] = set()
        self._framing: dict[str, list[tuple[str, str]]] = {}

    def load(self, loader: Loader) -> None:
        loader.add_option("reference_client_key", str, "", "The one client key.")
        loader.add_option("reference_max_body", int, 1024 * 1024, "Largest body.")

    async def running(self) -> None:
        await self.loopback.start()
        ctx.log.info(READY)

    async def done(self) -> None:
        await self.loopback.stop()

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.request.method != "POST" or not flow.request.path.endswith("/responses"):
            return
        headers = list(flow.request.headers.items(multi=True))
        key = ctx.options.reference_client_key
        answer = request_checks.early_answer(
            headers,
            client_key_ok=flow.request.headers.get("authorization", "") == f"Bearer {key}",
            max_body=ctx.options.reference_max_body,
        )
        if answer is not None:
            flow.request.headers.pop("expect", None)
            error = answer.error
            token = self.loopback.register_answer(error.status, error.headers, error.body)
            flow.request.stream = _discard
            if answer.close:
                self._close.add(flow.id)
        else:
            collector = BodyCollector(
                flow.request.headers.get("content-encoding"),
                limit=ctx.options.reference_max_body,
            )
            flow.request.stream = collector
            close = self._close

            async def job(sink: ResponseSink) -> None:
                try:
                    body = await collector.result
                except BodyRefused as refused:
                    close.add(flow.id)
                    error = refused.error
                    await sink.respond(error.status, error.headers, error.body)
                    return
                data = json.dumps({"received": len(body)}).encode()
                await sink.respond(200, [("content-type", "application/json")], data)

            token = self.loopback.register(job, answer_before_body=True)
        self._detoured[flow.id] = (flow.request.scheme, flow.request.host, flow.request.port)
        self._framing[flow.id] = [
            (k, v)
            for k, v in flow.request.headers.items(multi=True)
            if k.lower() in ("content-length", "transfer-encoding")
        ]
        # The stream callable forwards nothing, so the loopback gets an empty body:
        # say so, or it would wait for (or fail to parse) the client's framing.
        flow.request.headers.pop("transfer-encoding", None)
        flow.request.headers["content-length"] = "0"
        flow.request.data.scheme = b"http"
        flow.request.data.host = "127.0.0.1"
        flow.request.data.port = self.loopback.port
        flow.request.headers[TOKEN_HEADER] = token

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        destination = self._detoured.pop(flow.id, None)
        if destination is None or flow.response is None:
            return
        scheme, host, port = destination
        flow.request.data.scheme = scheme.encode()
        flow.request.data.host = host
        flow.request.data.port = port
        flow.request.headers.pop(TOKEN_HEADER, None)
        del flow.request.headers["content-length"]
        for name, value in self._framing.pop(flow.id, []):
            flow.request.headers.add(name, value)
        flow.response.stream = True

    def response(self, flow: http.HTTPFlow) -> None:
        if flow.id in self._close:
            self._close.discard(flow.id)
            flow.kill()

    def error(self, flow: http.HTTPFlow) -> None:
        self._detoured.pop(flow.id, None)
        self._framing.pop(flow.id, None)
        self._close.discard(flow.id)


addons = [HardeningReference()]
