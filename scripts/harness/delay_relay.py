"""A TCP relay on 127.0.0.1 that adds a round-trip time: a model of the internet for the bench.

Each accepted connection is forwarded to a target port; every chunk is
delivered `rtt / 2` after it arrived, in each direction. Delivery is scheduled
at arrival + delay rather than by sleeping per chunk, so chunks in flight
overlap as packets on a long link do and throughput is not cut to one chunk
per delay. The first bytes from the client also wait for the TCP handshake
the relay does not really make (one RTT after the connection was accepted),
so a new connection costs what it costs across the internet: one RTT for TCP,
then whatever its protocol adds (TLS, the WebSocket upgrade, the request).

Each direction buffers at most `max_buffer` bytes in flight; past that the
relay stops reading, and the sender's TCP window does the rest.

`PYTHONPATH=scripts python -m harness.delay_relay --route LISTEN:TARGET --rtt-ms 40`
serves until interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from responses_ws_bridge.local.loop_thread import AsyncServerContext, serve_until_stopped

DEFAULT_MAX_BUFFER = 4 * 1024 * 1024
_READ_SIZE = 65536


def due_at(arrival: float, opened: float, rtt: float, *, from_client: bool) -> float:
    """When a chunk that arrived at `arrival` is delivered, on a connection accepted at `opened`.

    Client bytes cannot leave before the (modelled) TCP handshake is over, one
    RTT after the connect; then every chunk takes half an RTT each way.
    """
    one_way = rtt / 2
    if from_client:
        return max(arrival, opened + rtt) + one_way
    return arrival + one_way


@dataclass
class _Chunk:
    due: float
    data: bytes  # b"": the sender finished (EOF)


class _Direction:
    """One direction of one connection: read, stamp, deliver when due, in order."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        opened: float,
        rtt: float,
        from_client: bool,
        max_buffer: int,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._opened = opened
        self._rtt = rtt
        self._from_client = from_client
        self._max_buffer = max_buffer
        self._queue: deque[_Chunk] = deque()
        self._buffered = 0
        self._arrived = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self.bytes = 0

    async def read_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._room.wait()
            data = await self._reader.read(_READ_SIZE)
            now = loop.time()
            due = due_at(now, self._opened, self._rtt, from_client=self._from_client)
            self._queue.append(_Chunk(due, data))
            self._buffered += len(data)
            if self._buffered >= self._max_buffer:
                self._room.clear()
            self._arrived.set()
            if not data:
                return

    async def write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            chunk = self._queue[0]
            wait = chunk.due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            # Everything already due goes out in one write, as it would off the wire.
            batch: list[bytes] = []
            now = loop.time()
            eof = False
            while self._queue and self._queue[0].due <= now:
                item = self._queue.popleft()
                if not item.data:
                    eof = True
                    break
                batch.append(item.data)
            if batch:
                data = b"".join(batch)
                self._buffered -= len(data)
                self.bytes += len(data)
                self._writer.write(data)
                await self._writer.drain()
                if self._buffered < self._max_buffer:
                    self._room.set()
            if eof:
                if self._writer.can_write_eof():
                    self._writer.write_eof()
                return


class DelayRelay(AsyncServerContext):
    """Listens on 127.0.0.1 and forwards every connection to `target_port` with a delay."""

    def __init__(
        self,
        target_port: int,
        rtt_s: float,
        *,
        port: int = 0,
        target_host: str = "127.0.0.1",
        max_buffer: int = DEFAULT_MAX_BUFFER,
    ) -> None:
        if rtt_s < 0:
            raise ValueError("rtt must not be negative")
        if max_buffer <= 0:
            raise ValueError("max_buffer must be positive")
        self.target_host = target_host
        self.target_port = target_port
        self.rtt_s = rtt_s
        self.max_buffer = max_buffer
        self.host = "127.0.0.1"
        self._requested_port = port
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self.accepted = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self._requested_port)
        self._port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stops listening and drops every connection, bounded in time."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.wait(self._connections, timeout=5)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 5)

    @property
    def url(self) -> str:
        return f"tcp://{self.host}:{self._port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        self.accepted += 1
        opened = asyncio.get_running_loop().time()
        upstream_writer: asyncio.StreamWriter | None = None
        try:
            up_reader, upstream_writer = await asyncio.open_connection(
                self.target_host, self.target_port, limit=_READ_SIZE
            )
            _nodelay(upstream_writer)
            _nodelay(writer)
            outward = _Direction(
                reader,
                upstream_writer,
                opened=opened,
                rtt=self.rtt_s,
                from_client=True,
                max_buffer=self.max_buffer,
            )
            inward = _Direction(
                up_reader,
                writer,
                opened=opened,
                rtt=self.rtt_s,
                from_client=False,
                max_buffer=self.max_buffer,
            )
            async with asyncio.TaskGroup() as group:
                for loop_fn in (
                    outward.read_loop,
                    outward.write_loop,
                    inward.read_loop,
                    inward.write_loop,
                ):
                    group.create_task(loop_fn())
        except (OSError, ExceptionGroup, asyncio.CancelledError):
            # A reset or a refused target ends both sides at once, as a lost link would.
            writer.transport.abort()
            if upstream_writer is not None:
                upstream_writer.transport.abort()
        finally:
            self._connections.discard(task)
            writer.close()
            if upstream_writer is not None:
                upstream_writer.close()


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Relays(AsyncServerContext):
    """Several relays in one event loop (the bench's one network for every path)."""

    def __init__(self, relays: Sequence[DelayRelay]) -> None:
        self.relays = list(relays)

    async def start(self) -> None:
        for relay in self.relays:
            await relay.start()
        self._port = self.relays[0].port if self.relays else 0

    async def stop(self) -> None:
        for relay in self.relays:
            await relay.stop()

    @property
    def url(self) -> str:
        return ", ".join(r.url for r in self.relays)


def parse_route(text: str) -> tuple[int, int]:
    listen, sep, target = text.partition(":")
    if not sep or not listen.isdigit() or not target.isdigit():
        raise argparse.ArgumentTypeError(f"--route wants LISTEN_PORT:TARGET_PORT, got {text!r}")
    return int(listen), int(target)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m harness.delay_relay",
        description="Relay TCP on 127.0.0.1 with an added round-trip time, until interrupted.",
    )
    parser.add_argument(
        "--route",
        type=parse_route,
        action="append",
        required=True,
        metavar="LISTEN:TARGET",
        help="listen on this port, forward to that one (repeatable)",
    )
    parser.add_argument("--rtt-ms", type=float, default=40.0, help="round-trip time to add")
    args = parser.parse_args(argv)
    relays = Relays(
        [DelayRelay(target, args.rtt_ms / 1000, port=listen) for listen, target in args.route]
    )

    async def serve_until_signalled() -> None:
        await serve_until_stopped(
            relays,
            lambda: print(f"delay relay ({args.rtt_ms:g} ms RTT) on {relays.url}", flush=True),
        )

    asyncio.run(serve_until_signalled())


if __name__ == "__main__":
    main()
