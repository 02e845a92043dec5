"""Runs a turn engine from the upstream socket's data callback, while nothing has to wait.

A turn's task waits for frames once; from then on each frame that arrives
is handed to the engine right in the socket's `data_received`, and the SSE
bytes it yields are written to the client at once (`ClientSink.write_now`):
no task wakes up and no event-loop pass is spent per event, as plain
mitmproxy forwards a chunk in the callback that read it. The first command
that needs waiting (the end of the turn, a store call, a client that is
behind) goes back to the task as a `Resume`, and so does a timeout.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from responses_ws_bridge.core.failures import AttemptFailed
from responses_ws_bridge.core.turn_commands import Broke, Command, Frames, Receive, TimedOut, Write
from responses_ws_bridge.core.turn_engine import EngineRun
from responses_ws_bridge.shell.sink import ClientGone, ClientSink
from responses_ws_bridge.shell.upstream_client import UpstreamSession


@dataclass(frozen=True)
class Resume:
    """Where the callback left the engine, for the turn's task to go on from."""

    # The engine's next command, not carried out yet (None: the engine ended).
    command: Command | None
    # `command` was tried and failed with this (the client left).
    error: BaseException | None = None


Reply = Frames | TimedOut | Broke | Resume


class FramePush:
    def __init__(self, engine: EngineRun, sink: ClientSink) -> None:
        self._engine = engine
        self._sink = sink
        self._loop = asyncio.get_running_loop()
        self._session: UpstreamSession | None = None
        self._waiting: asyncio.Future[Reply] | None = None
        self._deadline: float | None = None
        self._timer: asyncio.TimerHandle | None = None

    async def wait(self, session: UpstreamSession, timeout_s: float | None) -> Reply:
        """The answer to the engine's `Receive`, or a `Resume` when the engine moved on."""
        try:
            frames = session.ready()
        except AttemptFailed as exc:
            return Broke(exc.failure)
        if frames:
            return Frames(frames)
        self._session = session
        self._waiting = self._loop.create_future()
        self._set_deadline(timeout_s)
        session.listen(self._on_ready)
        try:
            return await self._waiting
        finally:
            session.listen(None)
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._waiting = self._session = None

    def _on_ready(self) -> None:
        waiting, session = self._waiting, self._session
        if waiting is None or waiting.done() or session is None:
            return
        try:
            frames = session.ready()
        except AttemptFailed as exc:
            waiting.set_result(Broke(exc.failure))
            return
        if not frames:
            return
        try:
            resume = self._step(Frames(frames), session)
        except BaseException as exc:  # a bug in the engine: the task raises it
            waiting.set_exception(exc)
            return
        if resume is not None:
            waiting.set_result(resume)

    def _step(self, reply: object, session: UpstreamSession) -> Resume | None:
        """Feeds the engine while its commands can be carried out now; None: it waits
        for frames again."""
        while True:
            try:
                command = self._engine.send(reply)
            except StopIteration:
                return Resume(None)
            if isinstance(command, Receive):
                try:
                    frames = session.ready()
                except AttemptFailed as exc:
                    reply = Broke(exc.failure)
                    continue
                if frames:
                    reply = Frames(frames)
                    continue
                self._set_deadline(command.timeout_s)
                return None
            if not isinstance(command, Write):
                return Resume(command)
            try:
                if not self._sink.write_now(command.data):
                    return Resume(command)
            except ClientGone as exc:
                return Resume(command, exc)
            reply = None

    def _set_deadline(self, timeout_s: float | None) -> None:
        """One timer for the whole wait, moved only when the deadline comes sooner."""
        self._deadline = None if timeout_s is None else self._loop.time() + timeout_s
        if self._deadline is None:
            return
        if self._timer is not None and self._timer.when() <= self._deadline:
            return  # it fires first and looks again then
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(self._deadline, self._timed_out)

    def _timed_out(self) -> None:
        self._timer = None
        waiting = self._waiting
        if waiting is None or waiting.done() or self._deadline is None:
            return
        if self._loop.time() < self._deadline:
            self._timer = self._loop.call_at(self._deadline, self._timed_out)
            return
        waiting.set_result(TimedOut())
