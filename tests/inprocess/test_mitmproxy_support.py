"""Which mitmproxy the bridge loads into: the version range and the internals it streams with."""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
from mitmproxy import exceptions, version
from mitmproxy.proxy.layers.http import HttpStream
from mitmproxy.proxy.layers.http._http_h2 import BufferedH2Connection
from mitmproxy.test import taddons
from responses_ws_bridge.addons import bridge_addons, flow_streaming
from responses_ws_bridge.addons.responses_bridge import ResponsesBridge
from responses_ws_bridge.mitmproxy_support import SUPPORTED, startup_problem, version_problem

SCRIPT = Path(__file__).resolve().parents[2] / "addon" / "bridge.py"


@pytest.mark.parametrize(
    ("found", "supported"),
    [
        ("12.0.0", True),
        ("12.0.1", True),
        ("12.3.1", True),
        ("12.99.0.dev", True),
        ("11.1.3", False),
        ("11.99", False),
        ("13.0.0", False),
        ("13.0.0.dev0", False),
        ("2.0", False),
        ("unknown", False),
    ],
)
def test_the_supported_versions(found: str, supported: bool) -> None:
    problem = version_problem(found)
    assert (problem is None) == supported
    if problem is not None:
        assert SUPPORTED in problem and found in problem


def test_the_installed_mitmproxy_has_everything() -> None:
    assert flow_streaming.missing_internals() == []
    assert startup_problem() is None


def _changed_consume_body(self: HttpStream, event: object) -> None:
    """A `state_consume_request_body` that no longer runs the request hook itself."""
    self.client_state = self.state_done


@pytest.mark.parametrize(
    ("take_away", "named"),
    [
        (lambda mp: mp.delattr(HttpStream, "start_response_stream"), "start_response_stream"),
        (
            lambda mp: mp.delitem(BufferedH2Connection.__annotations__, "stream_buffers"),
            "BufferedH2Connection.stream_buffers",
        ),
        (
            lambda mp: mp.setattr(HttpStream, "state_consume_request_body", _changed_consume_body),
            "HttpRequestHook in HttpStream.state_consume_request_body",
        ),
    ],
    ids=["method", "instance-attribute", "copied-code"],
)
def test_a_missing_internal_refuses_the_addon_by_name(
    monkeypatch: pytest.MonkeyPatch, take_away: Callable[[pytest.MonkeyPatch], None], named: str
) -> None:
    take_away(monkeypatch)
    # Even once installed in this process: a configure checks again.
    bridge = next(a for a in bridge_addons() if isinstance(a, ResponsesBridge))
    with taddons.context(bridge) as tctx, pytest.raises(exceptions.OptionsError) as refused:
        tctx.configure(bridge)
    message = str(refused.value)
    assert named in message
    assert f"mitmproxy {version.VERSION}" in message and SUPPORTED in message
    assert startup_problem() == message


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bridge_script_under_test", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_an_unsupported_mitmproxy_gets_one_error_line_and_no_addons(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(version, "VERSION", "11.1.3")
    with caplog.at_level(logging.ERROR):
        script = load_script()
    assert script.addons == []
    (record,) = caplog.records
    assert record.exc_info is None
    assert "\n" not in record.getMessage()
    assert "mitmproxy 11.1.3" in record.getMessage() and SUPPORTED in record.getMessage()


def test_a_supported_mitmproxy_gets_the_addons() -> None:
    assert any(isinstance(a, ResponsesBridge) for a in load_script().addons)
