"""A local OAuth token endpoint that rotates refresh tokens the way auth.openai.com does.

A real HTTP server on 127.0.0.1 (standard library, its own thread). `POST`
with the JSON refresh body answers a new access token (an unsigned JWT with
`exp`) and a new refresh token; the refresh token it was given is spent from
then on. A spent one sent again is answered `refresh_token_reused` and counted
in `reuses`: the tests assert it stays 0. Tokens are deterministic
(`access_token_for`, `refresh_token_for`), so recorded fixtures replay with the
same ones. `on_issue(access_token, account)` lets the local upstream accept
each new access token.

For refreshes that go wrong: `hold()` keeps every request waiting at a gate
until `release()` (a request whose client leaves meanwhile is `abandoned`,
never processed, as a server that never read it); `mode="garbage"` answers
200 with a body that is not JSON; `mode="drip"` sends the answer's headers,
then one body byte every `drip_s` seconds.
"""

from __future__ import annotations

import base64
import json
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self

from responses_ws_bridge.core.token_refresh import CODEX_CLIENT_ID, REFRESH_SCOPE

# 2100-01-01: far enough to never be due, fixed so that fixtures replay alike.
FAR_EXPIRY = 4102444800


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned_jwt(claims: dict[str, Any]) -> str:
    """A JWT-shaped token with these claims (signature not meaningful)."""
    header = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{header}.{_b64(json.dumps(claims, sort_keys=True).encode())}.c2ln"


def access_token_for(account: str, generation: int, exp: int = FAR_EXPIRY) -> str:
    return unsigned_jwt({"sub": account, "gen": generation, "exp": exp})


def refresh_token_for(account: str, generation: int) -> str:
    return f"rt-{account}-{generation}"


@dataclass
class _Login:
    account: str
    generation: int = 0
    spent: set[str] = field(default_factory=set)


class FakeTokenEndpoint:
    """`with FakeTokenEndpoint({"rt-team-c-0": "team-c"}) as oauth:` ... `oauth.url`."""

    def __init__(
        self,
        refresh_tokens: dict[str, str],
        *,
        exp: int = FAR_EXPIRY,
        delay_s: float = 0.0,
        refuse: str | None = None,
        on_issue: Callable[[str, str], None] | None = None,
        mode: str = "rotate",
        drip_s: float = 1.0,
    ) -> None:
        self.exp = exp
        self.delay_s = delay_s
        self.refuse = refuse
        self.on_issue = on_issue
        self.mode = mode
        self.drip_s = drip_s
        self.requests: list[dict[str, Any]] = []
        self.reuses = 0
        self.abandoned = 0
        self.waiting = 0
        self._gate = threading.Event()
        self._gate.set()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._current: dict[str, _Login] = {}
        for token, account in refresh_tokens.items():
            self._current[token] = _Login(account)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}/oauth/token"

    @property
    def refreshes(self) -> int:
        with self._lock:
            return len(self.requests)

    def refresh_tokens(self) -> list[str]:
        """Every refresh token the endpoint processed, in order."""
        with self._lock:
            return [str(r.get("refresh_token")) for r in self.requests]

    def hold(self) -> None:
        """Keep requests waiting from now on (a hung endpoint) until `release`."""
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    def wait_for_waiting(self, count: int = 1, timeout: float = 10.0) -> bool:
        """Until `count` requests wait at the gate."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self.waiting >= count:
                    return True
            time.sleep(0.02)
        return False

    def _through_gate(self, conn: socket.socket) -> bool:
        """False when the client left while the request waited (it is then never processed)."""
        with self._lock:
            self.waiting += 1
        try:
            while not self._gate.wait(0.05):
                if self._stopping.is_set() or _client_left(conn):
                    with self._lock:
                        self.abandoned += 1
                    return False
            return True
        finally:
            with self._lock:
                self.waiting -= 1

    def answer(self, body: bytes) -> tuple[int, dict[str, Any]]:
        """The endpoint's answer to one request body."""
        try:
            data = json.loads(body)
        except ValueError:
            return 400, {"error": "invalid_request"}
        if not isinstance(data, dict):
            return 400, {"error": "invalid_request"}
        with self._lock:
            self.requests.append(data)
            if self.refuse is not None:
                return 401, {"error": {"code": self.refuse, "message": "refused"}}
            if (
                data.get("grant_type") != "refresh_token"
                or data.get("client_id") != CODEX_CLIENT_ID
                or data.get("scope") != REFRESH_SCOPE
            ):
                return 400, {"error": "invalid_request"}
            token = data.get("refresh_token")
            login = self._current.pop(token, None) if isinstance(token, str) else None
            if login is None:
                if any(token in login.spent for login in self._current.values()):
                    self.reuses += 1
                    return 401, {
                        "error": {"code": "refresh_token_reused", "message": "already used"}
                    }
                return 400, {"error": "invalid_grant", "error_description": "unknown token"}
            login.spent.add(str(token))
            login.generation += 1
            refresh = refresh_token_for(login.account, login.generation)
            self._current[refresh] = login
            access = access_token_for(login.account, login.generation, self.exp)
        if self.on_issue is not None:
            self.on_issue(access, login.account)
        return 200, {
            "access_token": access,
            "refresh_token": refresh,
            "id_token": unsigned_jwt({"sub": login.account, "exp": self.exp}),
            "expires_in": 3600,
        }

    def start(self) -> Self:
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(min(length, 1024 * 1024))
                if not endpoint._through_gate(self.connection):
                    self.close_connection = True
                    return
                if endpoint.delay_s:
                    # Slow on purpose: concurrent refreshes would overlap here.
                    time.sleep(endpoint.delay_s)
                if endpoint.mode == "garbage":
                    with endpoint._lock:
                        endpoint.requests.append({"garbage": True})
                    self._send(200, b"<html>not json</html>")
                    return
                status, answer = endpoint.answer(body)
                self._send(status, json.dumps(answer).encode())

            def _send(self, status: int, data: bytes) -> None:
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                if endpoint.mode != "drip":
                    self.wfile.write(data)
                    return
                for i in range(len(data)):
                    if endpoint._stopping.wait(endpoint.drip_s):
                        return
                    self.wfile.write(data[i : i + 1])
                    self.wfile.flush()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="fake-oauth", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._gate.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _client_left(conn: socket.socket) -> bool:
    """The client closed its side (readable, and nothing to read)."""
    try:
        readable, _, _ = select.select([conn], [], [], 0)
        return bool(readable) and conn.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True
