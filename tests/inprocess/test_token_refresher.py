"""The token refresher with an injected token endpoint: one instance, and two instances on one
(in-memory) store, as `SharedTokens` sees it. Single use is enforced by the fake endpoint."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from harness.oauth_server import unsigned_jwt
from responses_ws_bridge.core.accounts import Account, AccountsConfig
from responses_ws_bridge.core.token_refresh import fingerprint
from responses_ws_bridge.shell.shared_tokens import SharedTokens
from responses_ws_bridge.shell.token_refresher import RefreshFailed, TokenRefresher
from responses_ws_bridge.state.guarded import GuardedStore
from responses_ws_bridge.state.memory import MemoryStateStore
from responses_ws_bridge.state.sealing import TokenSeal
from responses_ws_bridge.state.store import TokenRecord

NOW = 1_800_000_000.0
EXPIRED = unsigned_jwt({"sub": "r", "exp": NOW - 10})
ACCOUNT = Account("r", EXPIRED, refresh_token="rt-0")
CONFIG = AccountsConfig((ACCOUNT,))


# Each generation lives one DAY past the previous: `clock.now += DAY` makes the latest due.
DAY = 86_400.0


def access(generation: int, exp: float | None = None) -> str:
    return unsigned_jwt({"sub": "r", "gen": generation, "exp": exp or NOW + DAY * generation})


class Endpoint:
    """Rotates `rt-N` into `rt-N+1`; a spent token is `refresh_token_reused`."""

    def __init__(self, *, delay_s: float = 0.0) -> None:
        self.current = "rt-0"
        self.generation = 0
        self.seen: list[str] = []
        self.reuses = 0
        self.delay_s = delay_s
        self.answer: tuple[int | None, bytes] | None = None
        self.exp: float | None = None

    async def post(self, url: str, body: bytes) -> tuple[int | None, bytes]:
        token = json.loads(body)["refresh_token"]
        self.seen.append(token)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.answer is not None:
            return self.answer
        if token != self.current:
            self.reuses += 1
            return 401, json.dumps({"error": {"code": "refresh_token_reused"}}).encode()
        self.generation += 1
        self.current = f"rt-{self.generation}"
        fresh = {"access_token": access(self.generation, self.exp), "refresh_token": self.current}
        return 200, json.dumps(fresh).encode()


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def refresher(
    endpoint: Endpoint,
    clock: Clock,
    tmp: Path,
    *,
    store: GuardedStore | None = None,
    name: str = "one",
    deadline_s: float = 5.0,
) -> TokenRefresher:
    shared = None
    if store is not None:
        seal = TokenSeal(b"a secret of enough bytes", "test")
        shared = SharedTokens(lambda: store, lambda: seal, wall_clock=clock)
    tokens = TokenRefresher(
        post=endpoint.post,
        wall_clock=clock,
        deadline_s=deadline_s,
        jitter=lambda: 0.0,
        shared=shared,
    )
    directory = tmp / name
    directory.mkdir(exist_ok=True)
    tokens.load(CONFIG, directory / "accounts.tokens.json")
    return tokens


def run_async[**P](test: Callable[P, Awaitable[None]]) -> Callable[P, None]:
    """Runs an async test on its own event loop, bounded in time."""

    @functools.wraps(test)
    def run(*args: P.args, **kwargs: P.kwargs) -> None:
        async def bounded() -> None:
            async with asyncio.timeout(10):
                await test(*args, **kwargs)

        asyncio.run(bounded())

    return run


def memory_store(clock: Clock) -> GuardedStore:
    return GuardedStore(MemoryStateStore(clock=clock))


@run_async
async def test_one_instance_refreshes_once_for_concurrent_requests(tmp_path: Path) -> None:
    endpoint, clock = Endpoint(delay_s=0.05), Clock()
    tokens = refresher(endpoint, clock, tmp_path)
    got = await asyncio.gather(*(tokens.access_token(ACCOUNT) for _ in range(5)))
    assert set(got) == {access(1)}
    assert endpoint.seen == ["rt-0"]
    entry = json.loads((tmp_path / "one" / "accounts.tokens.json").read_text())["accounts"]["r"]
    assert entry["refresh_token"] == "rt-1" and entry["generation"] == 1


@run_async
async def test_two_instances_on_one_store_refresh_once_and_share_the_rotation(
    tmp_path: Path,
) -> None:
    endpoint, clock = Endpoint(delay_s=0.05), Clock()
    store = memory_store(clock)
    alpha = refresher(endpoint, clock, tmp_path, store=store, name="alpha")
    bravo = refresher(endpoint, clock, tmp_path, store=store, name="bravo")
    got = await asyncio.gather(*(t.access_token(ACCOUNT) for t in (alpha, bravo, alpha, bravo)))
    assert set(got) == {access(1)}
    assert endpoint.seen == ["rt-0"]
    # One after the other: bravo's 401 on generation 1 finds alpha's generation 2.
    clock.now += DAY
    assert await alpha.access_token(ACCOUNT) == access(2)
    assert await bravo.after_rejection(ACCOUNT, fingerprint(access(1)))
    assert await bravo.access_token(ACCOUNT) == access(2)
    assert endpoint.seen == ["rt-0", "rt-1"] and endpoint.reuses == 0
    # Each machine's durable copy follows the store.
    bravo_copy = json.loads((tmp_path / "bravo" / "accounts.tokens.json").read_text())
    assert bravo_copy["accounts"]["r"]["refresh_token"] == "rt-2"


@run_async
async def test_the_store_holds_no_token_in_clear(tmp_path: Path) -> None:
    endpoint, clock = Endpoint(), Clock()
    store = memory_store(clock)
    alpha = refresher(endpoint, clock, tmp_path, store=store)
    await alpha.access_token(ACCOUNT)
    record = (await store.store.token_view("r")).record
    assert record is not None and record.generation == 1
    dumped = repr(record) + record.sealed
    for secret in ("rt-0", "rt-1", access(1)):
        assert secret not in dumped


@run_async
async def test_a_restarted_instance_uses_the_stores_generation(tmp_path: Path) -> None:
    endpoint, clock = Endpoint(), Clock()
    store = memory_store(clock)
    alpha = refresher(endpoint, clock, tmp_path, store=store, name="alpha")
    await alpha.access_token(ACCOUNT)
    # Bravo starts after the rotation, with the accounts file's spent token only.
    bravo = refresher(endpoint, clock, tmp_path, store=store, name="bravo")
    assert await bravo.access_token(ACCOUNT) == access(1)
    clock.now += DAY
    assert await bravo.access_token(ACCOUNT) == access(2)
    assert endpoint.seen == ["rt-0", "rt-1"]


@run_async
async def test_a_new_login_in_one_file_replaces_the_chain_everywhere(tmp_path: Path) -> None:
    endpoint, clock = Endpoint(), Clock()
    store = memory_store(clock)
    alpha = refresher(endpoint, clock, tmp_path, store=store, name="alpha")
    bravo = refresher(endpoint, clock, tmp_path, store=store, name="bravo")
    await alpha.access_token(ACCOUNT)
    fresh_login = Account("r", access(50), refresh_token="rt-login-2")
    alpha.load(AccountsConfig((fresh_login,)), tmp_path / "alpha" / "accounts.tokens.json")
    await alpha.sync_all()
    clock.now += 1  # not stale yet: bravo looks at the store every SYNC_S
    clock.now += 5
    assert await bravo.access_token(ACCOUNT) == access(50)


@run_async
async def test_a_permanent_refusal_is_shared(tmp_path: Path) -> None:
    endpoint, clock = Endpoint(), Clock()
    endpoint.answer = (400, b'{"error": "invalid_grant"}')
    store = memory_store(clock)
    alpha = refresher(endpoint, clock, tmp_path, store=store, name="alpha")
    bravo = refresher(endpoint, clock, tmp_path, store=store, name="bravo")
    with pytest.raises(RefreshFailed) as first:
        await alpha.access_token(ACCOUNT)
    assert first.value.permanent and first.value.reason == "invalid_grant"
    with pytest.raises(RefreshFailed) as second:
        await bravo.access_token(ACCOUNT)
    assert second.value.permanent
    assert len(endpoint.seen) == 1
    health = (await store.store.health(["r"]))["r"]
    assert health.disabled == "token refresh refused: invalid_grant"


@run_async
async def test_no_refresh_without_the_stores_lock(tmp_path: Path) -> None:
    endpoint, clock = Endpoint(), Clock()
    inner = MemoryStateStore(clock=clock)
    store = GuardedStore(inner)
    alpha = refresher(endpoint, clock, tmp_path, store=store)

    async def down(*_: object, **__: object) -> None:
        raise OSError("connection refused")

    inner.token_view = down  # type: ignore[method-assign,assignment]
    with pytest.raises(RefreshFailed) as failed:
        await alpha.access_token(ACCOUNT)
    assert failed.value.reason == "state_store_unavailable"
    assert endpoint.seen == []


@run_async
async def test_a_hung_endpoint_costs_one_deadline_and_then_backs_off(tmp_path: Path) -> None:
    endpoint, clock = Endpoint(delay_s=30.0), Clock()
    tokens = refresher(endpoint, clock, tmp_path, deadline_s=0.2)
    loop = asyncio.get_running_loop()
    started = loop.time()
    results = await asyncio.gather(
        *(tokens.access_token(ACCOUNT) for _ in range(3)), return_exceptions=True
    )
    assert loop.time() - started < 2.0
    assert all(isinstance(r, RefreshFailed) for r in results)
    assert {r.reason for r in results if isinstance(r, RefreshFailed)} == {"token_refresh_timeout"}
    assert len(endpoint.seen) == 1  # the waiters got the failure, not a refresh each


@pytest.mark.parametrize(
    "answer",
    [(200, b"not json"), (502, b""), (None, b"")],
)
@run_async
async def test_a_failing_endpoint_is_asked_once_per_backoff_window(
    tmp_path: Path, answer: tuple[int | None, bytes]
) -> None:
    endpoint, clock = Endpoint(), Clock()
    endpoint.answer = answer
    tokens = refresher(endpoint, clock, tmp_path)
    for _ in range(3):
        with pytest.raises(RefreshFailed):
            await tokens.access_token(ACCOUNT)
    assert len(endpoint.seen) == 1
    clock.now += 1.5  # past the first backoff (1 s with no jitter)
    with pytest.raises(RefreshFailed) as later:
        await tokens.access_token(ACCOUNT)
    assert len(endpoint.seen) == 2
    assert later.value.retry_after_s is not None and later.value.retry_after_s > 0


@run_async
async def test_an_already_expired_token_is_not_refreshed_per_request(tmp_path: Path) -> None:
    endpoint, clock = Endpoint(), Clock()
    endpoint.exp = NOW - 100
    tokens = refresher(endpoint, clock, tmp_path)
    # The answer is due at once: this request tries it, and it counts as a failure.
    assert await tokens.access_token(ACCOUNT) == access(1, NOW - 100)
    for _ in range(3):
        with pytest.raises(RefreshFailed):
            await tokens.access_token(ACCOUNT)
    assert endpoint.seen == ["rt-0"]
    clock.now += 1.5
    await tokens.access_token(ACCOUNT)  # one more refresh per backoff window, not per request
    assert endpoint.seen == ["rt-0", "rt-1"]  # the rotated token, never the spent one


@run_async
async def test_an_echoing_endpoint_never_puts_the_token_in_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    endpoint, clock = Endpoint(), Clock()
    endpoint.answer = (400, b'{"error": {"code": "xrt-orig-x-secret0123", "message": "rt-0"}}')
    tokens = refresher(endpoint, clock, tmp_path)
    with caplog.at_level(logging.INFO), pytest.raises(RefreshFailed) as failed:
        await tokens.access_token(ACCOUNT)
    assert "secret0123" not in caplog.text and "rt-0" not in caplog.text
    assert "secret0123" not in failed.value.reason
    assert "unrecognized_error" in caplog.text


@run_async
async def test_a_refusal_does_not_overwrite_a_newer_token_on_disk(tmp_path: Path) -> None:
    """Two processes on one machine, one tokens file: the stale one is refused, and adopts."""
    endpoint, clock = Endpoint(), Clock()
    alpha = refresher(endpoint, clock, tmp_path, name="machine")
    bravo = refresher(endpoint, clock, tmp_path, name="machine")
    assert await alpha.access_token(ACCOUNT) == access(1)
    # Bravo still holds the spent rt-0; its refresh is refused as reused.
    assert await bravo.access_token(ACCOUNT) == access(1)
    entry = json.loads((tmp_path / "machine" / "accounts.tokens.json").read_text())["accounts"]["r"]
    assert entry["refresh_token"] == "rt-1" and "refused" not in entry
    restarted = refresher(endpoint, clock, tmp_path, name="machine")
    assert await restarted.access_token(ACCOUNT) == access(1)


class FlakyStore(MemoryStateStore):
    """Writes fail while `down`, as a store that went away mid-refresh."""

    down = False

    async def write_tokens(
        self,
        account_id: str,
        record: TokenRecord,
        *,
        base_generation: int | None,
        fence: int | None,
    ) -> bool:
        if self.down:
            raise OSError("connection refused")
        return await super().write_tokens(
            account_id, record, base_generation=base_generation, fence=fence
        )


@run_async
async def test_a_refresh_the_store_missed_is_published_when_it_answers(tmp_path: Path) -> None:
    endpoint, clock = Endpoint(), Clock()
    inner = FlakyStore(clock=clock)
    store = GuardedStore(inner, clock=clock)
    alpha = refresher(endpoint, clock, tmp_path, store=store, name="alpha")
    bravo = refresher(endpoint, clock, tmp_path, store=store, name="bravo")
    await alpha.sync_all()
    inner.down = True
    assert await alpha.access_token(ACCOUNT) == access(1)  # kept here, not in the store
    inner.down = False
    clock.now += 60  # past the store's backoff (and the lock's lease)
    await alpha.publish_pending()
    record = (await inner.token_view("r")).record
    assert record is not None and record.generation == 1
    assert await bravo.access_token(ACCOUNT) == access(1)
    assert endpoint.seen == ["rt-0"]
