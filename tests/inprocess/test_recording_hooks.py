"""`trigger_listeners`: mitmproxy's `trigger_event` without the addons that lack the hook.

Run on a real `AddonManager` (mitmproxy's `taddons`), side by side with
`trigger_event`: the same addons see the same hooks in the same order, errors
are logged and passed over, and `AddonHalt` ends the pass.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import pytest
from mitmproxy import exceptions, hooks, http
from mitmproxy.addonmanager import AddonManager
from mitmproxy.proxy.layers.http import HttpRequestHook
from mitmproxy.proxy.layers.websocket import WebsocketStartHook
from mitmproxy.test import taddons, tflow
from responses_ws_bridge.addons.recording import trigger_listeners

from tests.support.aio import run_bounded

Seen = list[str]
BOUND_S = 10.0


class Sync:
    def __init__(self, name: str, seen: Seen) -> None:
        self.name, self.seen = name, seen

    def request(self, flow: http.HTTPFlow) -> None:
        self.seen.append(self.name)


class Async(Sync):
    async def request(self, flow: http.HTTPFlow) -> None:  # type: ignore[override]
        await asyncio.sleep(0)
        self.seen.append(self.name)


class Deaf:
    """No hook of interest: passed over."""

    def __init__(self, name: str, seen: Seen) -> None:
        self.name, self.seen = name, seen

    def response(self, flow: http.HTTPFlow) -> None:
        self.seen.append("deaf")


class Parent:
    """Only a child has the hook: the parent is invoked, as mitmproxy invokes it."""

    def __init__(self, seen: Seen) -> None:
        self.name = "parent"
        self.addons = [Deaf("deaf child", seen), Sync("child", seen)]


class Failing(Sync):
    def request(self, flow: http.HTTPFlow) -> None:
        self.seen.append(self.name)
        raise ValueError("boom")


class Halting(Sync):
    def request(self, flow: http.HTTPFlow) -> None:
        self.seen.append(self.name)
        raise exceptions.AddonHalt


Trigger = Callable[[AddonManager, hooks.Hook], Awaitable[None]]


async def _mitmproxys(manager: AddonManager, hook: hooks.Hook) -> None:
    await manager.trigger_event(hook)


async def run(trigger: Trigger, hook_of: Callable[[http.HTTPFlow], hooks.Hook], halt: bool) -> Seen:
    seen: Seen = []
    chain: list[object] = [Sync("a", seen), Deaf("deaf", seen), Async("b", seen), Parent(seen)]
    chain += [Failing("failing", seen)]
    chain += [Halting("halting", seen)] if halt else []
    chain += [Sync("after", seen)]
    with taddons.context(*chain) as tctx:
        await trigger(tctx.master.addons, hook_of(tflow.tflow()))
    return seen


@pytest.mark.parametrize("halt", [False, True])
def test_the_same_addons_see_the_hook_in_the_same_order(halt: bool) -> None:
    async def both() -> tuple[Seen, Seen]:
        ours = await run(trigger_listeners, HttpRequestHook, halt)
        return ours, await run(_mitmproxys, HttpRequestHook, halt)

    ours, mitmproxys = run_bounded(both, BOUND_S)
    assert ours == mitmproxys
    expected = ["a", "b", "child", "failing"] + (["halting"] if halt else ["after"])
    assert ours == expected


def test_an_addon_error_is_logged_as_mitmproxy_logs_it(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR):
        run_bounded(lambda: run(trigger_listeners, HttpRequestHook, False), BOUND_S)
    assert any("Addon error: boom" in r.getMessage() for r in caplog.records)


def test_a_hook_no_addon_has_reaches_nobody() -> None:
    assert run_bounded(lambda: run(trigger_listeners, WebsocketStartHook, False), BOUND_S) == []
