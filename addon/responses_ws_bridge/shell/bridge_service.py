"""Serves one bridged request by carrying out its turn engine's commands.

`core.turn_engine.TurnEngine` decides everything about a turn; this module
only does what it asks, one command at a time (`_TurnRun`): the turn state
(`turn_state`, in memory or shared), the token refresher, the idle socket
pool and the connections made ahead (`preconnect`), the upstream socket, the
client's sink, sleeping and logging. A client that leaves (or a proxy that
stops) while a command runs is told to the engine as `ClientLeft`; it lets go
of what it holds, and the exception goes on up.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import weakref
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from websockets.frames import CloseCode

from responses_ws_bridge.core import upstream_trust
from responses_ws_bridge.core.accounts import Account
from responses_ws_bridge.core.answer_cache import AnswerCache
from responses_ws_bridge.core.answer_headers import TURN_STATE
from responses_ws_bridge.core.failures import AttemptFailed
from responses_ws_bridge.core.forward_commands import (
    Abort,
    BodyChunk,
    CacheLookup,
    CacheStore,
    DropFetch,
    Fetch,
    Fetched,
    ReadBody,
)
from responses_ws_bridge.core.forward_engine import ForwardEngine
from responses_ws_bridge.core.forward_policy import CachedAnswer
from responses_ws_bridge.core.pool_state import PoolState
from responses_ws_bridge.core.retry_policy import DEFAULT_RETRY_BUDGET
from responses_ws_bridge.core.turn_commands import (
    Bind,
    Broke,
    Checkout,
    Choose,
    ClientLeft,
    Command,
    Disable,
    Failed,
    FindOwner,
    Finish,
    GetToken,
    Hold,
    Log,
    NoteFigures,
    Open,
    PublishOwner,
    Receive,
    Refresh,
    RefreshRefused,
    Release,
    Respond,
    Send,
    Served,
    Sleep,
    SocketReady,
    StartStream,
    TimedOut,
    Unhold,
    Write,
)
from responses_ws_bridge.core.turn_engine import (
    DEFAULT_FIRST_EVENT_TIMEOUT_S,
    DEFAULT_HOLD_CREATED_S,
    DEFAULT_SSE_KEEPALIVE_S,
    DEFAULT_STREAM_IDLE_TIMEOUT_S,
    Clocks,
    EngineRun,
    EngineSettings,
    PoolFacts,
    TurnEngine,
)
from responses_ws_bridge.core.turns import Attempt, Turn
from responses_ws_bridge.shell import http_forward
from responses_ws_bridge.shell.answer_flights import AnswerFlights
from responses_ws_bridge.shell.frame_push import FramePush, Resume
from responses_ws_bridge.shell.http_forward import ExchangeTap, HttpExchange
from responses_ws_bridge.shell.preconnect import DEFAULT_PRECONNECT, Preconnector
from responses_ws_bridge.shell.session_pool import (
    DEFAULT_IDLE_TTL_S,
    DEFAULT_MAX_AGE_S,
    SessionPool,
)
from responses_ws_bridge.shell.shared_state import SharedState
from responses_ws_bridge.shell.sink import ClientSink
from responses_ws_bridge.shell.token_refresher import RefreshFailed, TokenRefresher
from responses_ws_bridge.shell.turn_state import LocalTurnState, SharedTurnState, TurnState
from responses_ws_bridge.shell.upstream_client import (
    SessionTap,
    UpstreamSession,
    UpstreamSettings,
)

__all__ = [
    "DEFAULT_FIRST_EVENT_TIMEOUT_S",
    "DEFAULT_HOLD_CREATED_S",
    "DEFAULT_SSE_KEEPALIVE_S",
    "DEFAULT_STREAM_IDLE_TIMEOUT_S",
    "BridgeService",
    "BridgeSettings",
    "TapFactory",
]

logger = logging.getLogger(__name__)

# Gives the recorder a tap for each new upstream connection (None: not recorded).
TapFactory = Callable[[Turn, Attempt], SessionTap | None]
# The same for each forwarded HTTP exchange: (turn, attempt, the Fetch) -> tap.
ExchangeTapFactory = Callable[[Turn, Attempt, Fetch], ExchangeTap | None]
# A turn engine's run, a forwarded request's or a WebSocket client's: commands out, events in.
AnyRun = Generator[Any, Any, None]


@dataclass(frozen=True)
class BridgeSettings:
    upstream_option: str = ""
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    sse_keepalive_s: float | None = DEFAULT_SSE_KEEPALIVE_S
    retry_budget: int = DEFAULT_RETRY_BUDGET
    session_idle_ttl_s: float = DEFAULT_IDLE_TTL_S
    # TCP/TLS connections kept ready per upstream host (never a handshake).
    preconnect: int = DEFAULT_PRECONNECT
    session_max_age_s: float = DEFAULT_MAX_AGE_S
    # Hosts a client-chosen destination may be, with an account pool.
    trusted_hosts: tuple[str, ...] = upstream_trust.DEFAULT_TRUSTED_UPSTREAMS
    stream_idle_timeout_s: float | None = DEFAULT_STREAM_IDLE_TIMEOUT_S
    first_event_timeout_s: float | None = DEFAULT_FIRST_EVENT_TIMEOUT_S
    hold_created_s: float | None = DEFAULT_HOLD_CREATED_S

    @property
    def engine(self) -> EngineSettings:
        return EngineSettings(
            upstream_option=self.upstream_option,
            retry_budget=self.retry_budget,
            keepalive_s=self.sse_keepalive_s,
            idle_timeout_s=self.stream_idle_timeout_s,
            trusted_hosts=self.trusted_hosts,
            first_event_timeout_s=self.first_event_timeout_s,
            hold_created_s=self.hold_created_s,
        )


class BridgeService:
    def __init__(
        self,
        settings: BridgeSettings,
        *,
        state: PoolState,
        sessions: SessionPool,
        connector: Preconnector | None = None,
        taps: TapFactory | None = None,
        exchange_taps: ExchangeTapFactory | None = None,
        tokens: TokenRefresher | None = None,
        shared: SharedState | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        jitter: Callable[[], float] = random.random,
        clocks: Clocks | None = None,
    ) -> None:
        self.settings = settings
        self.state = state
        self.sessions = sessions
        self.connector = (
            connector if connector is not None else Preconnector(per_host=settings.preconnect)
        )
        self.tokens = tokens if tokens is not None else TokenRefresher()
        self.taps = taps
        self.exchange_taps = exchange_taps
        # Affinity, health and load shared with other instances (when `bridge_state` is set).
        self.shared = shared
        self.sleep = sleep
        self.jitter = jitter
        self.clocks = clocks if clocks is not None else Clocks(time.monotonic, time.time)
        # Answers of forwarded requests shared by every client asking the same (models).
        self.answers = AnswerFlights(AnswerCache(self.clocks.monotonic))
        # Turn states issued by metadata events after the 101, per idle socket.
        self.late_turn_states: weakref.WeakKeyDictionary[UpstreamSession, str] = (
            weakref.WeakKeyDictionary()
        )

    def apply_settings(self, settings: BridgeSettings) -> None:
        self.settings = settings
        self.sessions.idle_ttl_s = settings.session_idle_ttl_s
        self.connector.per_host = settings.preconnect
        self.sessions.max_age_s = settings.session_max_age_s

    def accounts_removed(self, account_ids: list[str]) -> None:
        """Sockets of removed accounts close (idle ones now, busy ones when their turn ends)."""
        for account_id in account_ids:
            self.sessions.drop_account(account_id)

    async def serve(self, turn: Turn, sink: ClientSink) -> None:
        """Answers the client of `turn` through `sink`; `turn.report` says what happened."""
        scrub = self.state.scrubber()
        if turn.client_credential is not None:
            scrub = scrub.extended([turn.client_credential.bearer])
        engine = TurnEngine(
            turn,
            self.settings.engine,
            self._facts(),
            scrub=scrub,
            clocks=self.clocks,
            jitter=self.jitter,
        )
        await _TurnRun(self, turn, sink, self._turn_state()).drive(engine.run())

    async def forward(self, turn: Turn, sink: ClientSink) -> None:
        """Answers a request the pool forwards over HTTP (`turn.http`), through `sink`."""
        engine = ForwardEngine(
            turn,
            self.settings.engine,
            accounts_own_upstreams=self.accounts_own_upstreams(),
            scrub=self.state.scrubber(),
            clocks=self.clocks,
            jitter=self.jitter,
        )
        await _TurnRun(self, turn, sink, self.turn_state()).drive(engine.run())

    def accounts_own_upstreams(self) -> bool:
        """Every account names its own upstream: a client-chosen destination is never used."""
        return self._facts().accounts_own_upstreams

    def turn_state(self) -> TurnState:
        """The turn state one request (or one client WebSocket) is served with."""
        return self._turn_state()

    def _facts(self) -> PoolFacts:
        pool = self.state.pool
        if pool is None:
            return PoolFacts(pooled=False)
        own = all(_own_upstream(pool.account(i)) for i in pool.ids)
        return PoolFacts(pooled=True, accounts_own_upstreams=own)

    def _turn_state(self) -> TurnState:
        shared = self.shared
        if shared is not None and shared.active and self.state.pool is not None:
            return SharedTurnState(self.state, shared)
        return LocalTurnState(self.state)

    def keeps_account(self, account_id: str | None) -> bool:
        """Whether a socket of `account_id` may serve again (None: the client's own)."""
        pool = self.state.pool
        return account_id is None or (pool is not None and pool.account(account_id) is not None)

    async def shutdown(self) -> None:
        await self.sessions.close_all()
        await self.connector.close_all()


# The engine ended inside the data callback.
_ENDED = object()


class _TurnRun:
    """Carries out one turn engine's commands; holds the turn's upstream socket."""

    # Which method carries out which command (filled in below the class).
    handlers: ClassVar[dict[type, Callable[[Any, Any], Awaitable[Any]]]]

    def __init__(self, service: BridgeService, turn: Turn, sink: ClientSink, state: TurnState):
        self.service = service
        self.turn = turn
        self.sink = sink
        self.state = state
        self.session: UpstreamSession | None = None
        self.exchange: HttpExchange | None = None
        self._push: FramePush
        # What made the client leave (or the proxy stop), raised once the engine let go.
        self._left: BaseException | None = None

    async def drive(self, engine: EngineRun | AnyRun) -> None:
        """Runs the engine to its end; re-raises what made the client leave."""
        self._push = FramePush(engine, self.sink)
        reply: object = None
        while True:
            try:
                command = engine.send(reply)
            except StopIteration:
                break
            reply = await self._resumed(await self._carry_out(command))
            if reply is _ENDED:
                break
        if self._left is not None:
            raise self._left

    async def _resumed(self, reply: object) -> object:
        """Follows where the data callback left the engine: the reply to its pending
        command, or _ENDED."""
        while isinstance(reply, Resume):
            if reply.command is None:
                return _ENDED
            if reply.error is not None:
                return self._left_with(reply.error)
            reply = await self._carry_out(reply.command)
        return reply

    async def _carry_out(self, command: Command) -> object:
        try:
            return await type(self).handlers[type(command)](self, command)
        except BaseException as exc:  # the client left, the proxy stops, or a bug
            return self._left_with(exc)

    def _left_with(self, exc: BaseException) -> ClientLeft:
        self._left = self._left or exc
        return ClientLeft()

    # -- the turn state ---------------------------------------------------------------------

    async def _find_owner(self, _: FindOwner) -> object:
        return await self.state.owner(self.turn.affinity)

    async def _choose(self, command: Choose) -> object:
        return await self.state.choose(command.pick, self.turn.affinity, claim=command.claim)

    async def _bind(self, command: Bind) -> None:
        self.state.bind(self.turn.affinity, command.account_id)

    async def _hold(self, command: Hold) -> None:
        await self.state.hold(command.account_id)

    async def _unhold(self, command: Unhold) -> None:
        await self.state.unhold(command.account_id)

    async def _figures(self, command: NoteFigures) -> object:
        return self.state.figures(command.account_id, command.limits)

    async def _failed(self, command: Failed) -> bool:
        return await self.state.failed(command.account_id, command.failure)

    async def _disable(self, command: Disable) -> None:
        await self.state.disable(command.account_id, command.reason)

    async def _publish(self, command: PublishOwner) -> None:
        await self.state.publish_owner(command.account_id, command.response_id)

    async def _served(self, command: Served) -> None:
        await self.state.served(self.turn.affinity, command.account_id, command.response_id)

    # -- tokens -----------------------------------------------------------------------------

    async def _token(self, command: GetToken) -> str | RefreshRefused:
        return await _refusal_or(self.service.tokens.access_token(command.account))

    async def _refresh(self, command: Refresh) -> bool | RefreshRefused:
        tokens = self.service.tokens
        return await _refusal_or(tokens.after_rejection(command.account, command.used_tag))

    # -- the upstream socket ----------------------------------------------------------------

    async def _checkout(self, command: Checkout) -> SocketReady | None:
        session = self.service.sessions.checkout(command.key)
        if session is None:
            return None
        if session.tap is not None:
            session.tap.attach(self.turn, command.attempt)
        self.session = session
        headers = session.response_headers
        late = self.service.late_turn_states.get(session)
        if late is not None:
            # A turn state a metadata event issued replaces the 101's for the session.
            headers = [(k, v) for k, v in headers if k.lower() != TURN_STATE]
            headers.append((TURN_STATE, late))
        return SocketReady(headers)

    async def _open(self, command: Open) -> SocketReady | Broke:
        service = self.service
        tap = service.taps(self.turn, command.attempt) if service.taps is not None else None
        try:
            session, preconnected = await service.connector.open(
                command.url, command.headers, service.settings.upstream, tap=tap
            )
        except AttemptFailed as exc:
            return Broke(exc.failure)
        self.session = session
        return SocketReady(session.response_headers, preconnected)

    async def _send(self, command: Send) -> Broke | None:
        try:
            await self._session().send(command.text)
        except AttemptFailed as exc:
            return Broke(exc.failure)
        return None

    async def _receive(self, command: Receive) -> object:
        return await self._push.wait(self._session(), command.timeout_s)

    async def _release(self, command: Release) -> None:
        session, self.session = self._session(), None
        sessions, key = self.service.sessions, command.key
        if command.keep and key is not None and self.service.keeps_account(key[1]):
            if command.turn_state is not None:
                self.service.late_turn_states[session] = command.turn_state
            sessions.checkin(key, session)
        else:
            sessions.discard(
                session, code=command.code or CloseCode.NORMAL_CLOSURE, reason=command.reason
            )

    def _session(self) -> UpstreamSession:
        if self.session is None:
            raise RuntimeError("the turn engine used a socket it had not opened")
        return self.session

    # -- a forwarded HTTP exchange ----------------------------------------------------------

    async def _fetch(self, command: Fetch) -> Fetched | Broke:
        service = self.service
        taps = service.exchange_taps
        tap = taps(self.turn, command.attempt, command) if taps is not None else None
        try:
            self.exchange = await http_forward.exchange(
                command.url,
                command.method,
                command.headers,
                command.body,
                service.settings.upstream,
                head_timeout=command.timeout_s,
                tap=tap,
            )
        except AttemptFailed as exc:
            return Broke(exc.failure)
        return Fetched(self.exchange.status, self.exchange.reason, self.exchange.headers)

    async def _read_body(self, command: ReadBody) -> BodyChunk | TimedOut | Broke:
        exchange = self.exchange
        if exchange is None:
            raise RuntimeError("the engine read an answer it had not fetched")
        try:
            if command.whole is not None:
                data, end = await exchange.read_whole(command.whole, command.timeout_s)
            else:
                data, end = await exchange.read(command.timeout_s)
        except TimeoutError:
            return TimedOut()
        except AttemptFailed as exc:
            return Broke(exc.failure)
        return BodyChunk(data, end)

    async def _drop_fetch(self, _: DropFetch) -> None:
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.close()

    async def _cache_lookup(self, command: CacheLookup) -> CachedAnswer | None:
        return await self.service.answers.lookup(command.key)

    async def _cache_store(self, command: CacheStore) -> None:
        self.service.answers.store(command.key, command.answer)

    async def _abort(self, command: Abort) -> None:
        await self.sink.abort(command.reason)

    # -- the client -------------------------------------------------------------------------

    async def _start(self, command: StartStream) -> None:
        await self.sink.start(command.status, command.headers)

    async def _write(self, command: Write) -> None:
        await self.sink.write(command.data)

    async def _finish(self, _: Finish) -> None:
        await self.sink.finish()

    async def _respond(self, command: Respond) -> None:
        await self.sink.respond(command.status, command.headers, command.body)

    # -- the shell itself -------------------------------------------------------------------

    async def _sleep(self, command: Sleep) -> None:
        await self.service.sleep(command.seconds)

    async def _log(self, command: Log) -> None:
        # Details of one attempt: the request's own line (the addon's) says how it ended.
        logger.debug("%s", command.message)


# Which method carries out which command: a table on the class, not bound methods on
# each run (those would tie every run into a cycle only the cyclic GC frees).
_TurnRun.handlers = {
    FindOwner: _TurnRun._find_owner,
    Choose: _TurnRun._choose,
    Bind: _TurnRun._bind,
    Hold: _TurnRun._hold,
    Unhold: _TurnRun._unhold,
    NoteFigures: _TurnRun._figures,
    Failed: _TurnRun._failed,
    Disable: _TurnRun._disable,
    PublishOwner: _TurnRun._publish,
    Served: _TurnRun._served,
    GetToken: _TurnRun._token,
    Refresh: _TurnRun._refresh,
    Checkout: _TurnRun._checkout,
    Open: _TurnRun._open,
    Send: _TurnRun._send,
    Receive: _TurnRun._receive,
    Release: _TurnRun._release,
    StartStream: _TurnRun._start,
    Write: _TurnRun._write,
    Finish: _TurnRun._finish,
    Respond: _TurnRun._respond,
    Sleep: _TurnRun._sleep,
    Log: _TurnRun._log,
    Fetch: _TurnRun._fetch,
    ReadBody: _TurnRun._read_body,
    DropFetch: _TurnRun._drop_fetch,
    CacheLookup: _TurnRun._cache_lookup,
    CacheStore: _TurnRun._cache_store,
    Abort: _TurnRun._abort,
}


async def _refusal_or[T](call: Awaitable[T]) -> T | RefreshRefused:
    try:
        return await call
    except RefreshFailed as exc:
        return RefreshRefused(exc.reason, exc.permanent, exc.retry_after_s)


def _own_upstream(account: Account | None) -> bool:
    return account is not None and bool((account.upstream or "").strip())
