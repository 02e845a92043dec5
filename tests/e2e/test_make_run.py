"""`make run` as a newcomer meets it: `scripts/run_local.py` on spare ports, real requests.

The log must say one line per request and nothing else (no connection chatter,
no warning); a Codex session's two turns share one upstream socket without a
stall; and the flows `-w` writes tell the truth: each turn's final outcome, one
upstream flow per turn and none for a socket that carried no request.
"""

from __future__ import annotations

import json
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx
from mitmproxy import http
from mitmproxy import io as mitm_io
from responses_ws_bridge.local.ports import free_port

from tests.support.data import ROOT, load_capture
from tests.support.http import capture_request

BOUND = 60.0
BANNER_END = "Ctrl-C stops everything."
REQUEST_LINE = re.compile(r"^(\[\d\] )?\[\d\d:\d\d:\d\d\.\d{3}\] (POST|GET) /\S*: ")
# The README's request (scripts/run_local.py prints it too).
README_HEADERS = {"content-type": "application/json", "authorization": "Bearer local-test-key"}
README_BODY = {"model": "gpt-5-codex", "input": "Say hello", "stream": True}


class RunLocal:
    def __init__(self, proc: subprocess.Popen[str], lines: queue.Queue[str]) -> None:
        self.proc = proc
        self._lines = lines
        self.before: list[str] = []
        self.after: list[str] = []

    def wait_for_banner(self) -> None:
        deadline = time.monotonic() + BOUND
        while time.monotonic() < deadline:
            line = self._lines.get(timeout=deadline - time.monotonic())
            self.before.append(line)
            if BANNER_END in line:
                return
        raise AssertionError("no banner:\n" + "\n".join(self.before))

    def wait_for_requests(self, count: int) -> list[str]:
        deadline = time.monotonic() + BOUND
        while sum(bool(REQUEST_LINE.match(x)) for x in self.after) < count:
            self.after.append(self._lines.get(timeout=max(deadline - time.monotonic(), 0.1)))
        return [x for x in self.after if REQUEST_LINE.match(x)]

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(BOUND)
        # What it printed while stopping, once the relays have let go.
        time.sleep(0.2)
        while not self._lines.empty():
            self.after.append(self._lines.get_nowait())


def free_ports(count: int) -> int:
    """The first of `count` consecutive free ports (`--instances` takes --port, --port+1, …)."""
    for _ in range(50):
        port = free_port()
        if port + count < 65536 and all(port_free(port + i) for i in range(1, count)):
            return port
    raise AssertionError("no consecutive free ports")


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@contextmanager
def run_local(*args: str, instances: int = 1) -> Iterator[tuple[RunLocal, int]]:
    port = free_ports(instances)
    cmd = [sys.executable, str(ROOT / "scripts" / "run_local.py"), "--port", str(port)]
    if instances > 1:
        cmd += ["--instances", str(instances), "--metrics-port", str(free_port())]
    cmd += ["--upstream-port", str(free_port()), *args]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))

    threading.Thread(target=pump, daemon=True).start()
    run = RunLocal(proc, lines)
    try:
        run.wait_for_banner()
        yield run, port
    finally:
        if proc.poll() is None:
            run.stop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(BOUND)


def assert_quiet(after: Sequence[str], requests: int) -> None:
    """Exactly one line per request after the banner: nothing per connection, no warning."""
    said = [x for x in after if x.strip()]
    assert said == [x for x in after if REQUEST_LINE.match(x)], "\n".join(after)
    assert len(said) == requests, "\n".join(after)
    for line in said:
        assert "warning:" not in line and "error:" not in line, line


def test_the_readme_curl_gets_one_line_and_no_warning() -> None:
    with run_local() as (run, port), httpx.Client(trust_env=False, timeout=BOUND) as client:
        answer = client.post(
            f"http://127.0.0.1:{port}/v1/responses", headers=README_HEADERS, json=README_BODY
        )
        assert answer.status_code == 200
        assert "event: response.completed" in answer.text
        models = client.get(f"http://127.0.0.1:{port}/v1/models")
        assert models.status_code == 200 and models.json()["object"] == "list"
        lines = run.wait_for_requests(2)
        run.stop()
    assert "POST /v1/responses: 200 response.completed · account team-" in lines[0]
    assert "no affinity · new socket" in lines[0] and "first event" in lines[0]
    assert "GET /v1/models: 200" in lines[1]
    assert_quiet(run.after, 2)
    assert run.proc.returncode == 0


def read_flows(path: Path) -> list[http.HTTPFlow]:
    with path.open("rb") as f:
        return [x for x in mitm_io.FlowReader(f).stream() if isinstance(x, http.HTTPFlow)]


def test_a_codex_session_reuses_one_socket_and_its_flows_are_true(tmp_path: Path) -> None:
    first = capture_request("tool-roundtrip-http-sse.json")
    (later,) = load_capture("tool-roundtrip-http-sse.json")["additional_requests"]
    second = (
        [(k, v) for k, v in later["headers"] if k.lower() not in {"host", "content-length"}],
        json.dumps(later["body"]).encode(),
    )
    saved = tmp_path / "session.mitm"
    with (
        run_local("-w", str(saved)) as (run, port),
        httpx.Client(trust_env=False, timeout=BOUND) as client,
    ):
        took = []
        for headers, body in (first, second):
            started = time.monotonic()
            answer = client.post(
                f"http://127.0.0.1:{port}/v1/responses", headers=headers, content=body
            )
            took.append(time.monotonic() - started)
            assert answer.status_code == 200
            assert "event: response.completed" in answer.text
        lines = run.wait_for_requests(2)
        run.stop()
    assert "hard affinity · new socket" in lines[0]
    assert "hard affinity · reused socket" in lines[1]
    assert took[1] < 2.0, took  # no stall on the reused socket
    assert_quiet(run.after, 2)

    flows = read_flows(saved)
    clients = [f for f in flows if f.metadata["responses_bridge"]["role"] == "client"]
    upstream = [f for f in flows if f.metadata["responses_bridge"]["role"] == "upstream"]
    assert [f.metadata["responses_bridge"]["outcome"] for f in clients] == [
        "response.completed",
        "response.completed",
    ]
    # One upstream flow per turn, on one socket; none for the socket's close at shutdown.
    assert len(upstream) == 2
    assert {f.metadata["responses_bridge"].get("socket") for f in upstream} == {upstream[0].id}
    for flow in upstream:
        assert flow.websocket is not None
        assert [m.from_client for m in flow.websocket.messages][:1] == [True]
    assert upstream[1].websocket is not None
    assert upstream[1].websocket.close_code == 1001  # the real close: the bridge shutting down
    served = [c.metadata["responses_bridge"]["upstream_flows"] for c in clients]
    assert served == [[upstream[0].id], [upstream[1].id]]


def test_two_instances_say_which_one_logged_a_request() -> None:
    with (
        run_local(instances=2) as (run, port),
        httpx.Client(trust_env=False, timeout=BOUND) as client,
    ):
        for number in (0, 1):
            answer = client.post(
                f"http://127.0.0.1:{port + number}/v1/responses",
                headers={**README_HEADERS, "session-id": "demo-1"},
                json=README_BODY,
            )
            assert answer.status_code == 200
        lines = run.wait_for_requests(2)
        run.stop()
    assert sorted(line[:4] for line in lines) == ["[1] ", "[2] "]
    # The second instance found the session's binding in the shared store.
    assert all("account team-a · hard affinity" in line for line in lines), lines
    assert_quiet(run.after, 2)
