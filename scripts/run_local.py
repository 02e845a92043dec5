"""`make run`: the bridge in front of an embedded upstream, no credentials, no network.

The embedded upstream is the scriptable local Responses upstream
(`responses_ws_bridge.local.upstream`): it answers any request, keeps a
session's socket open between its turns, and serves `GET /v1/models`. The
bridge (`mitmdump -s addon/bridge.py`, reverse mode, 127.0.0.1:8080, the dummy
accounts of flows/accounts.json) runs in front of it and logs one line per
request (`local/run_log.py` leaves out mitmproxy's per-connection lines).
Prints a curl command and an `openai` SDK snippet that stream through it, and
stops everything on Ctrl-C.

`--replay` serves the recorded Codex CLI session in flows/ instead
(`scripts/replay.py --cycle`), one summary line per session; `--details`
prints every difference from the recorded handshake and messages.

`--instances N` starts an embedded Valkey store (the one the tests use) and N
bridge instances sharing it (`bridge_state`), on consecutive ports from
`--port`, the first one with Prometheus metrics on `--metrics-port`; each
instance's lines carry its number.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
RECORDING = ROOT / "flows" / "codex-cli-http.mitm"
ACCOUNTS = ROOT / "flows" / "accounts.json"
RUN_LOG = ROOT / "addon" / "responses_ws_bridge" / "local" / "run_log.py"
# What the bridge logs once it serves (addons/responses_bridge.READY_LINE).
READY_LINE = "Responses bridge ready"
# mitmweb's UI, away from the proxy ports make run uses (8080, 8081, ...).
WEB_PORT = 8180
CURL_BODY = '{"model": "gpt-5-codex", "input": "Say hello", "stream": true}'


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if _port_in_use(port):
            return True
        time.sleep(0.05)
    return False


def curl_command(port: int, *extra_headers: str) -> str:
    headers = "".join(f" -H {shlex.quote(h)}" for h in extra_headers)
    return (
        f"curl -N http://127.0.0.1:{port}/v1/responses "
        f"-H 'content-type: application/json' -H 'authorization: Bearer local-test-key'"
        f"{headers} -d {shlex.quote(CURL_BODY)}"
    )


def _scaleout_banner(ports: list[int], store_url: str, metrics_port: int) -> str:
    urls = "\n".join(f"  instance {i + 1}: http://127.0.0.1:{p}" for i, p in enumerate(ports))
    curls = "\n".join(f"  {curl_command(p, 'session-id: demo-1')}" for p in ports)
    return f"""
{len(ports)} bridge instances sharing the state store {store_url}:
{urls}

A session keeps its account whichever instance it reaches: the first request
binds it in the store, the others read the binding there. Try both:

{curls}

Metrics of instance 1: curl http://127.0.0.1:{metrics_port}/metrics
Each request is logged below, one line, after its instance's number; Ctrl-C stops everything.
"""


def _banner(port: int, upstream_port: int, replay: bool) -> str:
    upstream = f"replay of flows/{RECORDING.name}" if replay else "local Responses upstream"
    sdk = f"""from openai import OpenAI
client = OpenAI(base_url="http://127.0.0.1:{port}/v1", api_key="local-test-key")
for event in client.responses.create(model="gpt-5-codex", input="Say hello", stream=True):
    print(event.type, getattr(event, "delta", ""))"""
    return f"""
Responses bridge: http://127.0.0.1:{port}  →  {upstream} ws://127.0.0.1:{upstream_port}
Stream a response through it:

  {curl_command(port)}

or, with the openai SDK (.venv/bin/python):

{sdk}

Each request is logged below, one line; Ctrl-C stops everything.
"""


def _parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8080, help="bridge listen port (127.0.0.1)")
    parser.add_argument("--upstream-port", type=int, default=0, help="embedded upstream port")
    parser.add_argument("--tool", default="mitmdump", choices=["mitmdump", "mitmweb"])
    parser.add_argument(
        "--replay",
        action="store_true",
        help=f"the replay of flows/{RECORDING.name} instead of the local upstream",
    )
    parser.add_argument(
        "--details", action="store_true", help="with --replay: print every deviation"
    )
    # The local upstream was once one flag away; it is the default now.
    parser.add_argument("--live", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--instances",
        type=int,
        default=1,
        help="bridge instances sharing an embedded Valkey store (ports --port, --port+1, ...)",
    )
    parser.add_argument(
        "--metrics-port", type=int, default=9464, help="Prometheus metrics of instance 1"
    )
    parser.add_argument(
        "--web-port",
        type=int,
        default=WEB_PORT,
        help="with --tool mitmweb: its web UI (instance N: --web-port + N - 1)",
    )
    args, extra = parser.parse_known_args(argv)
    if args.instances < 1:
        parser.error("--instances must be at least 1")
    if args.details and not args.replay:
        parser.error("--details goes with --replay")
    return args, extra


def _upstream_command(args: argparse.Namespace, port: int) -> list[str]:
    if not args.replay:
        return [
            sys.executable,
            "-m",
            "responses_ws_bridge.local.upstream",
            "--port",
            str(port),
            "--quiet",
        ]
    return [
        sys.executable,
        str(ROOT / "scripts" / "replay.py"),
        "--flows",
        str(RECORDING),
        "--accounts",
        str(ACCOUNTS),
        "--cycle",
        "--port",
        str(port),
        *([] if args.details else ["--summary"]),
    ]


def _bridge_command(
    args: argparse.Namespace, port: int, upstream_port: int, options: list[str], extra: list[str]
) -> list[str]:
    # mitmweb's UI defaults to 8081, which is the second instance's proxy port.
    web_port = args.web_port + port - args.port
    quiet = ["--set", "flow_detail=0"] if args.tool == "mitmdump" else []
    if args.tool == "mitmweb":
        # The inspector shows each client flow's SSE body too (mitmproxy keeps no
        # streamed body without it).
        quiet = ["--set", f"web_port={web_port}", "--set", "store_streamed_bodies=true"]
    return [
        str(BIN / args.tool),
        "-s",
        str(ROOT / "addon" / "bridge.py"),
        "-s",
        str(RUN_LOG),
        "--mode",
        f"reverse:http://127.0.0.1:{upstream_port}",
        "--listen-host",
        "127.0.0.1",
        "--listen-port",
        str(port),
        # What the addon would set itself in reverse mode, without the line saying so.
        "--set",
        "connection_strategy=lazy",
        # The dummy accounts (the recording was made with them): the pool in front of the
        # embedded upstream, which takes any token.
        "--set",
        f"bridge_accounts={ACCOUNTS}",
        *quiet,
        *options,
        *extra,
    ]


def _relay(stream: IO[bytes], prefix: str, ready: threading.Event) -> None:
    """Copies a child's output, each line after `prefix` (which instance said it)."""
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", "replace")
        sys.stdout.write(prefix + line)
        sys.stdout.flush()
        if READY_LINE in line:
            ready.set()


class _Children:
    """The processes `make run` started, each stopped exactly once."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self._relays: list[threading.Thread] = []

    def start(
        self, cmd: list[str], prefix: str | None = None
    ) -> tuple[subprocess.Popen[bytes], threading.Event]:
        """Starts `cmd`; with a `prefix`, its output is relayed line by line (the event:
        it said the bridge is ready), so the banner comes after its start-up lines."""
        ready = threading.Event()
        piped = prefix is not None
        # Own sessions: the terminal's Ctrl-C reaches only this script, which then
        # stops each child exactly once.
        # The caller's directory: a relative path in ARGS (`-w session.mitm`) is theirs.
        proc = subprocess.Popen(
            cmd,
            start_new_session=True,
            stdout=subprocess.PIPE if piped else None,
            stderr=subprocess.STDOUT if piped else None,
        )
        if prefix is not None and proc.stdout is not None:
            relay = threading.Thread(target=_relay, args=(proc.stdout, prefix, ready), daemon=True)
            relay.start()
            self._relays.append(relay)
        self.procs.append(proc)
        return proc, ready

    def running(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def stop(self) -> None:
        # The bridges first, each to its end, while their upstream is still there to
        # take their sockets' closes; then the upstream, then the store.
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for relay in self._relays:
            relay.join(5)


def _start_store(children: _Children) -> str | None:
    store_port = _free_port()
    store, _ = children.start(
        [sys.executable, "-m", "responses_ws_bridge.local.state_server", "--port", str(store_port)]
    )
    if not _wait_listening(store_port, store, 15):
        print("the embedded state store did not start (is the dev extra installed?)")
        return None
    return f"redis://127.0.0.1:{store_port}"


def _run(args: argparse.Namespace, extra: list[str], children: _Children) -> int:
    ports = [args.port + i for i in range(args.instances)]
    for port in ports:
        if _port_in_use(port):
            print(f"127.0.0.1:{port} is already in use; try: make run ARGS='--port 8090'")
            return 1
    web_ports = [args.web_port + i for i in range(args.instances)]
    for port in web_ports if args.tool == "mitmweb" else []:
        if _port_in_use(port):
            print(f"127.0.0.1:{port} (mitmweb's UI) is already in use; try --web-port 8190")
            return 1
    if args.instances > 1 and _port_in_use(args.metrics_port):
        print(
            f"127.0.0.1:{args.metrics_port} (metrics) is already in use; "
            f"try: make run ARGS='--instances {args.instances} --metrics-port 9465'"
        )
        return 1
    upstream_port = args.upstream_port or _free_port()
    upstream, _ = children.start(_upstream_command(args, upstream_port))
    if not _wait_listening(upstream_port, upstream, 15):
        print("the embedded upstream did not start")
        return 1
    options: list[list[str]] = [[] for _ in ports]
    store_url = ""
    if args.instances > 1:
        store_url = _start_store(children) or ""
        if not store_url:
            return 1
        options = [["--set", f"bridge_state={store_url}"] for _ in ports]
        options[0] += ["--set", f"bridge_metrics=127.0.0.1:{args.metrics_port}"]
    several = args.instances > 1
    bridges = []
    for number, (port, opts) in enumerate(zip(ports, options, strict=True), start=1):
        cmd = _bridge_command(args, port, upstream_port, opts, extra)
        bridges.append((port, *children.start(cmd, f"[{number}] " if several else "")))
    for port, bridge, ready in bridges:
        if not _wait_listening(port, bridge, 30) or not ready.wait(10):
            print(f"{args.tool} on port {port} did not start")
            return 1
    banner = (
        _scaleout_banner(ports, store_url, args.metrics_port)
        if several
        else _banner(args.port, upstream_port, args.replay)
    )
    print(banner, flush=True)
    while children.running():
        time.sleep(0.2)
    return 1


def main(argv: list[str] | None = None) -> int:
    args, extra = _parse_args(argv)
    # Ctrl-C and SIGTERM both stop everything, also when started in the
    # background (where a shell leaves SIGINT ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    children = _Children()
    try:
        return _run(args, extra, children)
    except KeyboardInterrupt:
        return 0
    finally:
        # A second Ctrl-C (or the terminal's, which reaches the children too)
        # must not cut the shutdown short and leave a process behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        children.stop()


if __name__ == "__main__":
    sys.exit(main())
