"""Two `mitmdump` instances on one real Valkey, each with its own accounts directory (two
machines), refreshing one ChatGPT login against a local OAuth endpoint that enforces single
use: one refresh per account across instances, rotation shared through the store (sealed),
the store or a lock holder lost mid-refresh, and hard affinity through a store restart.

Across every test the endpoint never processes a refresh token twice (`reuses` stays 0 and
`refresh_tokens()` has no repeat); the access tokens the endpoint issues never expire, so a
refresh happens only when the local upstream answers 401 (`revoke_token`).
"""

from __future__ import annotations

import functools
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from harness.oauth_server import FakeTokenEndpoint, access_token_for, refresh_token_for
from harness.proxy_process import ProxyProcess
from responses_ws_bridge.local.state_server import StateServer
from responses_ws_bridge.local.upstream import ThreadedUpstream

from tests.support.http import client

SECRET = "e2e-state-secret-0123456789abcdef"
# Not a JWT and not accepted upstream: the first handshake with it is a 401.
STALE = "opaque-stale-access-token"
TEAM_C = {"id": "team-c", "refresh_token": "rt-team-c-0", "access_token": STALE}
TEAM_A = {"id": "team-a", "access_token": "tok-team-a"}
TEAM_B = {"id": "team-b", "access_token": "tok-team-b"}
UNAVAILABLE_LOG = "the state store that holds the refresh lock is unavailable"

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def upstream() -> Iterator[ThreadedUpstream]:
    """One per test: the access tokens a test's endpoint issues are accepted in it only."""
    with ThreadedUpstream(tokens={"tok-team-a": "team-a", "tok-team-b": "team-b"}) as server:
        yield server


@pytest.fixture
def store() -> Iterator[StateServer]:
    with StateServer() as server:
        yield server


@pytest.fixture
def oauth(upstream: ThreadedUpstream) -> Iterator[FakeTokenEndpoint]:
    with FakeTokenEndpoint({"rt-team-c-0": "team-c"}, on_issue=upstream.add_token) as endpoint:
        yield endpoint
        # The promise of every test here: no refresh token is ever processed twice.
        assert endpoint.reuses == 0
        seen = endpoint.refresh_tokens()
        assert len(seen) == len(set(seen)), seen


class Machine:
    """One instance's own directory: its accounts file, tokens file and copy of the secret."""

    def __init__(self, root: Path, name: str, *accounts: dict[str, str]) -> None:
        self.dir = root / name
        self.dir.mkdir()
        self.accounts = self.dir / "accounts.json"
        self.accounts.write_text(json.dumps({"accounts": list(accounts)}))
        self.secret = self.dir / "state.secret"
        self.secret.write_text(SECRET + "\n")
        self.secret.chmod(0o600)

    def tokens(self, account: str = "team-c") -> dict[str, Any]:
        data = json.loads((self.dir / "accounts.tokens.json").read_text())
        entry: dict[str, Any] = data["accounts"][account]
        return entry

    def proxy(
        self, upstream: ThreadedUpstream, store_url: str, oauth_url: str, *extra: str
    ) -> ProxyProcess:
        return ProxyProcess(
            "--mode",
            f"reverse:http://127.0.0.1:{upstream.port}",
            "--set",
            "connection_strategy=lazy",
            "--set",
            f"bridge_accounts={self.accounts}",
            "--set",
            f"bridge_state={store_url}",
            "--set",
            f"bridge_state_secret={self.secret}",
            "--set",
            f"bridge_oauth_token_url={oauth_url}",
            "--set",
            "bridge_oauth_timeout=2",
            *extra,
        )


@contextmanager
def running(*proxies: ProxyProcess) -> Iterator[None]:
    started: list[ProxyProcess] = []
    try:
        for proxy in proxies:
            started.append(proxy.start())
        yield
    finally:
        for proxy in started:
            proxy.close()


def post(proxy: ProxyProcess, session: str | None = None) -> httpx.Response:
    headers = {"session-id": session} if session else {}
    body = {"model": "gpt-5-codex", "input": "hi", "stream": True}
    with client() as http:
        return http.post(f"{proxy.url}/v1/responses", json=body, headers=headers, timeout=30)


def code(response: httpx.Response) -> str:
    return str(json.loads(response.content)["error"]["code"])


def eventually(check: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.2)
    return False


def store_dump(url: str) -> str:
    """Every key and value in the store, as text."""
    parts: list[str] = []
    with redis.Redis.from_url(url, decode_responses=True) as db:
        for key in db.scan_iter(match="*"):
            kind = db.type(key)
            value: object = {
                "string": db.get,
                "hash": db.hgetall,
                "zset": lambda k: db.zrange(k, 0, -1),
                "set": db.smembers,
                "list": lambda k: db.lrange(k, 0, -1),
            }[str(kind)](key)
            parts.append(f"{key} {value}")
    return "\n".join(parts)


def login_secrets(generations: int) -> list[str]:
    found = [STALE, SECRET]
    for generation in range(generations + 1):
        found += [
            refresh_token_for("team-c", generation),
            access_token_for("team-c", generation),
        ]
    return found


def test_simultaneous_then_successive_401s_refresh_once_each_and_nothing_is_in_clear(
    tmp_path: Path, upstream: ThreadedUpstream, store: StateServer, oauth: FakeTokenEndpoint
) -> None:
    alpha_dir, bravo_dir = Machine(tmp_path, "alpha", TEAM_C), Machine(tmp_path, "bravo", TEAM_C)
    alpha = alpha_dir.proxy(upstream, store.url, oauth.url)
    bravo = bravo_dir.proxy(upstream, store.url, oauth.url)
    with running(alpha, bravo):
        gate = threading.Barrier(6, timeout=20)
        statuses: list[int] = []

        def one(proxy: ProxyProcess) -> None:
            gate.wait()
            statuses.append(post(proxy).status_code)

        threads = [threading.Thread(target=one, args=(p,)) for p in (alpha, bravo) * 3]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert statuses == [200] * 6
        assert oauth.refresh_tokens() == ["rt-team-c-0"]
        # One after the other: bravo's token is refused, bravo refreshes; alpha, still on
        # the first generation, meets a 401 too and takes bravo's result from the store.
        upstream.revoke_token(access_token_for("team-c", 1))
        assert post(bravo).status_code == 200
        assert post(alpha).status_code == 200
        assert oauth.refresh_tokens() == ["rt-team-c-0", "rt-team-c-1"]
        assert alpha_dir.tokens()["refresh_token"] == "rt-team-c-2"
        dump = store_dump(store.url)
        logs = alpha.log() + bravo.log()
    assert "tokens:team-c" in dump
    for secret in login_secrets(3):
        assert secret not in dump
        assert secret not in logs


def test_an_instance_restarted_after_the_rotation_uses_the_stores_generation(
    tmp_path: Path, upstream: ThreadedUpstream, store: StateServer, oauth: FakeTokenEndpoint
) -> None:
    alpha_dir, bravo_dir = Machine(tmp_path, "alpha", TEAM_C), Machine(tmp_path, "bravo", TEAM_C)
    alpha = alpha_dir.proxy(upstream, store.url, oauth.url)
    with running(alpha):
        assert post(alpha).status_code == 200
        upstream.revoke_token(access_token_for("team-c", 1))
        assert post(alpha).status_code == 200
    # Bravo's machine has only the accounts file's spent token; alpha is gone.
    bravo = bravo_dir.proxy(upstream, store.url, oauth.url)
    with running(bravo):
        assert post(bravo).status_code == 200
        assert bravo_dir.tokens()["refresh_token"] == "rt-team-c-2"
    assert oauth.refresh_tokens() == ["rt-team-c-0", "rt-team-c-1"]
    assert {r.header("authorization") for r in upstream.records()[-1:]} == {
        f"Bearer {access_token_for('team-c', 2)}"
    }


def test_the_store_killed_during_a_refresh(
    tmp_path: Path, upstream: ThreadedUpstream, store: StateServer, oauth: FakeTokenEndpoint
) -> None:
    alpha_dir = Machine(tmp_path, "alpha", TEAM_C, TEAM_A)
    bravo_dir = Machine(tmp_path, "bravo", TEAM_C, TEAM_A)
    # No idle sockets: every turn opens one, with the token of the moment.
    no_reuse = ("--set", "bridge_session_idle_ttl=0")
    alpha = alpha_dir.proxy(upstream, store.url, oauth.url, *no_reuse)
    bravo = bravo_dir.proxy(upstream, store.url, oauth.url, *no_reuse)
    with running(alpha, bravo):
        assert post(alpha, "s-alpha").status_code == 200
        # New sessions spread: one on team-a first, so that s-bravo is team-c's too.
        assert post(bravo, "s-other").status_code == 200
        assert post(bravo, "s-bravo").status_code == 200
        opened = {r.header("session-id"): r.account for r in upstream.records() if r.status == 101}
        assert opened == {"s-alpha": "team-c", "s-other": "team-a", "s-bravo": "team-c"}
        # Alpha's refresh hangs at the endpoint, holding the store's lock; the store dies.
        oauth.hold()
        upstream.revoke_token(access_token_for("team-c", 1))
        answers: list[httpx.Response] = []
        waiting = threading.Thread(target=lambda: answers.append(post(alpha, "s-alpha")))
        waiting.start()
        assert oauth.wait_for_waiting(1)
        store.kill()
        # Bravo needs a new token for team-c and cannot take the lock: no refresh, a 503.
        for _ in range(2):
            refused = post(bravo, "s-bravo")
            assert refused.status_code == 503
            assert code(refused) == "state_store_unavailable"
        assert bravo.log().count(UNAVAILABLE_LOG) == 1
        # Other accounts keep serving: a request without affinity moves to team-a.
        upstream.reset()
        assert post(bravo).status_code == 200
        assert upstream.records()[-1].account == "team-a"
        # Alpha's refresh completes: kept in its tokens file, used, the store still down.
        oauth.release()
        waiting.join(30)
        assert [a.status_code for a in answers] == [200]
        assert alpha_dir.tokens()["refresh_token"] == "rt-team-c-2"
        # The store comes back empty: alpha re-offers its generation before bravo refreshes.
        store.start()
        assert eventually(lambda: post(bravo, "s-bravo").status_code == 200)
        assert post(alpha, "s-alpha").status_code == 200
        assert bravo_dir.tokens()["refresh_token"] == "rt-team-c-2"
    assert oauth.refresh_tokens() == ["rt-team-c-0", "rt-team-c-1"]


def test_a_refusal_is_shared_until_a_file_gives_a_new_login(
    tmp_path: Path, upstream: ThreadedUpstream, store: StateServer
) -> None:
    # The endpoint knows only the second login: the files' rt-team-c-0 is invalid_grant.
    with FakeTokenEndpoint({"rt-login-2": "login-2"}, on_issue=upstream.add_token) as oauth:
        alpha_dir = Machine(tmp_path, "alpha", TEAM_C)
        bravo_dir = Machine(tmp_path, "bravo", TEAM_C)
        alpha = alpha_dir.proxy(upstream, store.url, oauth.url)
        bravo = bravo_dir.proxy(upstream, store.url, oauth.url)
        with running(alpha, bravo):
            refused = post(alpha)
            assert refused.status_code == 502 and code(refused) == "token_refresh_failed"
            assert "invalid_grant" in refused.text
            # Disabled on every instance: bravo never sends the refused token.
            other = post(bravo)
            assert other.status_code == 503 and code(other) == "no_account"
            assert oauth.refreshes == 1
            # A fresh login in bravo's file replaces the chain on both instances.
            login = access_token_for("login-2", 0)
            upstream.add_token(login, "team-c")
            fresh = {"id": "team-c", "refresh_token": "rt-login-2", "access_token": login}
            bravo_dir.accounts.write_text(json.dumps({"accounts": [fresh]}))
            assert eventually(lambda: post(alpha).status_code == 200)
            assert post(bravo).status_code == 200
            assert oauth.refreshes == 1
            assert alpha_dir.tokens()["access_token"] == login
        assert oauth.reuses == 0


def test_a_lock_holder_killed_mid_refresh_is_taken_over_without_a_spent_token(
    tmp_path: Path, upstream: ThreadedUpstream, store: StateServer, oauth: FakeTokenEndpoint
) -> None:
    alpha_dir, bravo_dir = Machine(tmp_path, "alpha", TEAM_C), Machine(tmp_path, "bravo", TEAM_C)
    alpha = alpha_dir.proxy(upstream, store.url, oauth.url)
    bravo = bravo_dir.proxy(upstream, store.url, oauth.url)
    with running(alpha, bravo):
        oauth.hold()
        gone = threading.Thread(target=lambda: _ignore_errors(lambda: post(alpha)))
        gone.start()
        assert oauth.wait_for_waiting(1)
        assert alpha.proc is not None
        alpha.proc.kill()  # mid-refresh, holding the store's lock; the endpoint never answered
        gone.join(30)
        assert eventually(lambda: oauth.abandoned == 1, 5)
        oauth.release()
        started = time.monotonic()
        response = post(bravo)
        # Bravo waited for the dead holder's lease (bridge_oauth_timeout 2 s: 4 s), then took over.
        assert response.status_code == 200
        assert time.monotonic() - started < 15
    assert oauth.refresh_tokens() == ["rt-team-c-0"]


def _ignore_errors(call: Callable[[], object]) -> None:
    with suppress(httpx.HTTPError):  # the instance is killed under this request
        call()


def test_hard_affinity_holds_through_a_store_restart(
    tmp_path: Path, upstream: ThreadedUpstream, store: StateServer, oauth: FakeTokenEndpoint
) -> None:
    # Left alone, alpha picks team-a for a new session and bravo team-b.
    alpha = Machine(tmp_path, "alpha", TEAM_A, TEAM_B).proxy(upstream, store.url, oauth.url)
    bravo = Machine(tmp_path, "bravo", TEAM_B, TEAM_A).proxy(upstream, store.url, oauth.url)
    with running(alpha, bravo):
        assert post(alpha, "s-known").status_code == 200
        stop = threading.Event()
        load: list[int] = []

        def background() -> None:
            while not stop.is_set():
                for proxy in (alpha, bravo):
                    load.append(post(proxy).status_code)

        loader = threading.Thread(target=background)
        loader.start()
        try:
            time.sleep(0.3)
            store.kill()
            time.sleep(0.3)
            store.start()  # empty
            # Bravo never served the session: it waits for alpha's re-offer, never binds anew.
            statuses: list[int] = []

            def served() -> bool:
                statuses.append(post(bravo, "s-known").status_code)
                return statuses[-1] == 200

            assert eventually(served)
            assert set(statuses) <= {200, 503}
        finally:
            stop.set()
            loader.join(30)
        owners = {r.account for r in upstream.records() if r.header("session-id") == "s-known"}
        assert owners == {"team-a"}
        assert set(load) == {200}
        # After the grace period, a new session is bound as always (bravo's first choice).
        assert eventually(lambda: post(bravo, "s-new").status_code == 200)
        assert {r.account for r in upstream.records() if r.header("session-id") == "s-new"} == {
            "team-b"
        }


def test_a_hung_slow_or_garbled_endpoint_costs_one_deadline_and_backs_off(
    tmp_path: Path, upstream: ThreadedUpstream, oauth: FakeTokenEndpoint
) -> None:
    machine = Machine(tmp_path, "solo", TEAM_C)
    proxy = ProxyProcess(
        "--mode",
        f"reverse:http://127.0.0.1:{upstream.port}",
        "--set",
        f"bridge_accounts={machine.accounts}",
        "--set",
        f"bridge_oauth_token_url={oauth.url}",
        "--set",
        "bridge_oauth_timeout=1",
    )
    with running(proxy):
        for mode in ("hang", "garbage", "drip"):
            if mode == "hang":
                oauth.hold()
            else:
                oauth.release()
                oauth.mode, oauth.refuse, oauth.drip_s = mode, "temporarily_unavailable", 0.5
            before = oauth.refreshes + oauth.abandoned
            started = time.monotonic()
            failed = post(proxy)
            assert time.monotonic() - started < 6, mode  # one 1 s deadline, not 3 x 30 s
            assert failed.status_code == 503, mode
            assert code(failed) == "token_refresh_failed"
            assert "could not connect" not in failed.text
            retry_after = float(failed.headers["retry-after"])
            # Within the backoff the endpoint is not asked again.
            again = post(proxy)
            assert again.status_code == 503 and code(again) == "token_refresh_failed"
            assert eventually(functools.partial(_asked, oauth, before + 1), 5), mode
            if mode != "drip":
                time.sleep(retry_after + 0.2)  # the backoff grows: 1-2 s, then 2-4 s
        log = proxy.log()
    assert oauth.refresh_tokens().count("rt-team-c-0") <= 1
    assert "rt-team-c-0" not in log and STALE not in log


def _asked(oauth: FakeTokenEndpoint, times: int) -> bool:
    """Whether the endpoint got `times` requests so far (answered or abandoned)."""
    return oauth.refreshes + oauth.abandoned == times


def test_an_endpoint_that_echoes_the_token_never_puts_it_in_the_log(
    tmp_path: Path, upstream: ThreadedUpstream
) -> None:
    machine = Machine(tmp_path, "solo", TEAM_C)
    with FakeTokenEndpoint({}, refuse="xrt-orig-x-secret0123") as echo:
        proxy = ProxyProcess(
            "--mode",
            f"reverse:http://127.0.0.1:{upstream.port}",
            "--set",
            f"bridge_accounts={machine.accounts}",
            "--set",
            f"bridge_oauth_token_url={echo.url}",
        )
        with running(proxy):
            failed = post(proxy)
            log = proxy.log()
    assert failed.status_code == 503 and code(failed) == "token_refresh_failed"
    assert "secret0123" not in log and "secret0123" not in failed.text
    assert "token refresh refused (unrecognized_error" in log


def test_refresh_accounts_on_a_shared_store_without_the_secret_do_not_start(
    tmp_path: Path, upstream: ThreadedUpstream, store: StateServer
) -> None:
    machine = Machine(tmp_path, "alpha", TEAM_C)
    proxy = ProxyProcess(
        "--mode",
        f"reverse:http://127.0.0.1:{upstream.port}",
        "--set",
        f"bridge_accounts={machine.accounts}",
        "--set",
        f"bridge_state={store.url}",
        start_timeout=15,
    )
    with pytest.raises(RuntimeError) as failed:
        proxy.start()
    proxy.close()
    assert "bridge_state_secret: accounts with a refresh_token on a shared state store" in str(
        failed.value
    )
