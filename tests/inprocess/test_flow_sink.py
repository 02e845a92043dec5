"""`FlowSink`: a write returns only once the client has taken enough of the answer.

mitmproxy's connection handler is a fake here that says how many bytes of the
response its HTTP layer holds for the client (what `_route` measures on a real
one: the h2 stream's buffer beyond the flow-control window); the end-to-end
test with a real HTTP/2 client is in tests/e2e/test_e2e_streaming.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from mitmproxy import options
from mitmproxy.proxy.context import Context
from mitmproxy.test import taddons, tflow
from responses_ws_bridge.addons import flow_streaming
from responses_ws_bridge.addons.flow_streaming import PIECE, UNSENT_LIMIT, FlowSink
from responses_ws_bridge.shell.sink import ClientGone

BOUND_S = 10.0


class FakeHandler:
    """What FlowSink uses of mitmproxy's ConnectionHandler, with the client's backlog settable."""

    def __init__(self) -> None:
        self.held = 0
        self.looked = 0
        self.fed: list[bytes | None] = []
        self.asked: list[bool] = []

    async def server_event(self, event: Any) -> None:
        self.fed.append(event.data)
        if event.data is not None:
            self.held += len(event.data)
        # As `_feed_stream` does: the counter only when the sink asks for it.
        self.asked.append(event.count_unsent)
        if event.count_unsent:
            event.unsent = self.unsent

    def unsent(self) -> int:
        self.looked += 1
        return self.held

    async def drain_writers(self) -> None:
        pass


class FakeProxyserver:
    name = "proxyserver"

    def __init__(self) -> None:
        self.connections: dict[str, FakeHandler] = {}


def run(main: Any) -> None:
    async def bounded() -> None:
        proxyserver = FakeProxyserver()
        with taddons.context(proxyserver, loadcore=False):
            await asyncio.wait_for(main(proxyserver), BOUND_S)

    asyncio.run(bounded())


async def streaming_sink(proxyserver: FakeProxyserver) -> tuple[FlowSink, FakeHandler]:
    flow = tflow.tflow()
    handler = proxyserver.connections[flow.client_conn.id] = FakeHandler()
    sink = FlowSink(flow)
    await sink.start(200, [("content-type", "text/event-stream")])
    return sink, handler


async def until(predicate: Any) -> None:
    while not predicate():
        await asyncio.sleep(0.001)


def test_a_large_write_goes_in_pieces() -> None:
    async def main(proxyserver: FakeProxyserver) -> None:
        sink, handler = await streaming_sink(proxyserver)
        await sink.write(b"x" * (3 * PIECE + 10))
        assert [len(d or b"") for d in handler.fed] == [PIECE, PIECE, PIECE, 10]
        assert sink.held_up_writes == 0

    run(main)


def test_the_unsent_counter_is_asked_for_once_per_response() -> None:
    async def main(proxyserver: FakeProxyserver) -> None:
        sink, handler = await streaming_sink(proxyserver)
        for _ in range(3):
            await sink.write(b"x")
        await sink.finish()
        assert handler.asked == [True, False, False, False]
        # It goes on counting what is held after the first write.
        assert sink.unsent_peak == 3

    run(main)


def test_a_write_waits_while_the_client_leaves_too_much_unread() -> None:
    async def main(proxyserver: FakeProxyserver) -> None:
        sink, handler = await streaming_sink(proxyserver)
        handler.held = UNSENT_LIMIT
        write = asyncio.ensure_future(sink.write(b"x" * 1000))
        await until(lambda: sink.held_up_writes == 1)
        assert not write.done()
        handler.held = UNSENT_LIMIT + 1  # the client read some, not enough
        looked = handler.looked
        await until(lambda: handler.looked >= looked + 3)
        assert not write.done()
        handler.held = UNSENT_LIMIT
        await write
        assert sink.unsent_peak == UNSENT_LIMIT + 1000 and sink.held_up_writes == 1

    run(main)


def test_a_client_that_leaves_ends_the_wait() -> None:
    async def main(proxyserver: FakeProxyserver) -> None:
        sink, handler = await streaming_sink(proxyserver)
        handler.held = 10 * UNSENT_LIMIT
        write = asyncio.ensure_future(sink.write(b"x"))
        await until(lambda: sink.held_up_writes == 1)
        flow_streaming.forget(sink._flow)
        with pytest.raises(ClientGone):
            await write

    run(main)


def test_the_end_and_an_abort_do_not_wait() -> None:
    async def main(proxyserver: FakeProxyserver) -> None:
        sink, handler = await streaming_sink(proxyserver)
        handler.held = 10 * UNSENT_LIMIT
        await sink.finish()
        assert handler.fed == [None] and sink.held_up_writes == 0
        flow_streaming.forget(sink._flow)

    run(main)


@pytest.mark.parametrize(("role", "released"), [("client", True), (None, False)])
def test_a_finished_answer_s_stream_lets_go_of_its_flow(role: str | None, released: bool) -> None:
    """mitmproxy's stream objects are reference cycles that only the full collection frees;
    once a flow the bridge answered is done, its stream no longer keeps it (and its bodies)."""
    flow = tflow.tflow(resp=True)
    if role is not None:
        flow.metadata["responses_bridge"] = {"role": role}
    stream = flow_streaming._AddonStream(Context(flow.client_conn, options.Options()), 1)
    stream.flow = flow
    stream.client_state = stream.state_done
    commands = list(stream.flow_done())
    assert [type(c).__name__ for c in commands] == ["DropStream", "SendHttp"]
    assert hasattr(stream, "flow") is not released
