"""The pool's usage, answered where Codex CLI reads it (`…/wham/usage`, `…/api/codex/usage`).

With an account pool the question "how much of my limit is used" is about
the pool: `core.usage_report` builds the answer from the figures the bridge
holds, and this addon answers the request itself, behind the client keys.
Without a pool the request passes through with the client's own credential.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from mitmproxy import http

from responses_ws_bridge.core import openai_errors
from responses_ws_bridge.core.account_pool import AccountPool, Chosen
from responses_ws_bridge.core.accounts import client_key_ok
from responses_ws_bridge.core.pool_state import PoolState
from responses_ws_bridge.core.usage_report import AccountUsage, is_usage_request, usage_report
from responses_ws_bridge.recording.session_flows import METADATA_KEY


class PooledUsage:
    def __init__(self, state: PoolState, wall: Callable[[], float]) -> None:
        self.state = state
        self.wall = wall

    def request(self, flow: http.HTTPFlow) -> None:
        pool, config = self.state.pool, self.state.config
        if flow.response is not None or pool is None or config is None:
            return
        if not is_usage_request(flow.request.method, flow.request.path):
            return
        flow.metadata[METADATA_KEY] = {"role": "client", "kind": "usage"}
        if not client_key_ok(config, flow.request.headers.get("authorization")):
            error = openai_errors.unauthorized_client_key()
            flow.response = http.Response.make(error.status, error.body, dict(error.headers))
            return
        report = usage_report(_accounts(pool), wall_now=self.wall())
        flow.response = http.Response.make(
            200, json.dumps(report).encode(), {"content-type": "application/json"}
        )


def _accounts(pool: AccountPool) -> list[AccountUsage]:
    return [AccountUsage(pool.rate_limits(i), _takes_new_sessions(pool, i)) for i in pool.ids]


def _takes_new_sessions(pool: AccountPool, account_id: str) -> bool:
    """Healthy and no window at 100 %: what the pool would choose it for."""
    taken = pool.choose(prefer=account_id)
    return isinstance(taken, Chosen) and taken.account.id == account_id
