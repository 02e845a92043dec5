"""`make run`: the bridge in front of an embedded upstream, no credentials, no network.

The embedded upstream is the replay of the recorded Codex CLI session in
flows/ (`scripts/replay.py --cycle`, with the fixture accounts), so every
request is answered as the recording was and any difference from the recorded
handshake is printed; `--live` uses the scriptable local Responses upstream
instead. `mitmdump -s addon/bridge.py` (reverse mode, 127.0.0.1:8080) runs in
front of it. Prints a curl command and an `openai` SDK snippet that stream
through it, and stops both on Ctrl-C.

`--instances N` starts an embedded Valkey store (the one the tests use) and N
bridge instances sharing it (`bridge_state`), on consecutive ports from
`--port`, the first one with Prometheus metrics on `--metrics-port`.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
RECORDING = ROOT / "flows" / "codex-cli-http.mitm"
ACCOUNTS = ROOT / "flows" / "accounts.json"


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


def _scaleout_banner(ports: list[int], store_url: str, metrics_port: int) -> str:
    urls = "\n".join(f"  instance {i + 1}: http://127.0.0.1:{p}" for i, p in enumerate(ports))
    body = '{"model": "gpt-5-codex", "input": "Say hello", "stream": true}'
    curls = "\n".join(
        f"  curl -N http://127.0.0.1:{p}/v1/responses -H 'content-type: application/json' "
        "-H 'authorization: Bearer local-test-key' -H 'session-id: demo-1' "
        f"-d {shlex.quote(body)}"
        for p in ports
    )
    return f"""
{len(ports)} bridge instances sharing the state store {store_url}:
{urls}

A session keeps its account whichever instance it reaches: the first request
binds it in the store, the others read the binding there. Try both:

{curls}

Metrics of instance 1: curl http://127.0.0.1:{metrics_port}/metrics
Ctrl-C stops every process.
"""


def _banner(port: int, upstream_port: int, live: bool) -> str:
    body = '{"model": "gpt-5-codex", "input": "Say hello", "stream": true}'
    curl = (
        f"curl -N http://127.0.0.1:{port}/v1/responses "
        f"-H 'content-type: application/json' -H 'authorization: Bearer local-test-key' "
        f"-d {shlex.quote(body)}"
    )
    upstream = "local upstream" if live else f"replay of flows/{RECORDING.name}"
    sdk = f"""from openai import OpenAI
client = OpenAI(base_url="http://127.0.0.1:{port}/v1", api_key="local-test-key")
for event in client.responses.create(model="gpt-5-codex", input="Say hello", stream=True):
    print(event.type, getattr(event, "delta", ""))"""
    return f"""
Responses bridge: http://127.0.0.1:{port}  →  {upstream} ws://127.0.0.1:{upstream_port}
Stream a response through it:

  {curl}

or, with the openai SDK (.venv/bin/python):

{sdk}

Every request mitmdump bridges is listed below; Ctrl-C stops both processes.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8080, help="bridge listen port (127.0.0.1)")
    parser.add_argument("--upstream-port", type=int, default=0, help="local upstream port")
    parser.add_argument("--tool", default="mitmdump", choices=["mitmdump", "mitmweb"])
    parser.add_argument(
        "--live", action="store_true", help="the scriptable local upstream instead of the replay"
    )
    parser.add_argument(
        "--instances",
        type=int,
        default=1,
        help="bridge instances sharing an embedded Valkey store (ports --port, --port+1, ...)",
    )
    parser.add_argument(
        "--metrics-port", type=int, default=9464, help="Prometheus metrics of instance 1"
    )
    args, extra = parser.parse_known_args(argv)
    if args.instances < 1:
        parser.error("--instances must be at least 1")
    # Ctrl-C and SIGTERM both stop everything, also when started in the
    # background (where a shell leaves SIGINT ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    ports = [args.port + i for i in range(args.instances)]
    for port in ports:
        if _port_in_use(port):
            print(f"127.0.0.1:{port} is already in use; try: make run ARGS='--port 8090'")
            return 1
    upstream_port = args.upstream_port or _free_port()
    if args.live:
        upstream_cmd = [
            sys.executable,
            "-m",
            "responses_ws_bridge.local.upstream",
            "--port",
            str(upstream_port),
        ]
    else:
        upstream_cmd = [
            sys.executable,
            str(ROOT / "scripts" / "replay.py"),
            "--flows",
            str(RECORDING),
            "--accounts",
            str(ACCOUNTS),
            "--cycle",
            "--port",
            str(upstream_port),
        ]
        # The recording was made with the fixture accounts: use them upstream too.
        extra = ["--set", f"bridge_accounts={ACCOUNTS}", *extra]
    # Own sessions: the terminal's Ctrl-C reaches only this script, which then
    # stops each child exactly once.
    upstream = subprocess.Popen(upstream_cmd, cwd=ROOT, start_new_session=True)
    procs = [upstream]
    try:
        if not _wait_listening(upstream_port, upstream, 15):
            print("the embedded upstream did not start")
            return 1
        shared: list[list[str]] = [[] for _ in ports]
        store_url = ""
        if args.instances > 1:
            store_port = _free_port()
            store = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "responses_ws_bridge.local.state_server",
                    "--port",
                    str(store_port),
                ],
                cwd=ROOT,
                start_new_session=True,
            )
            procs.append(store)
            if not _wait_listening(store_port, store, 15):
                print("the embedded state store did not start (is the dev extra installed?)")
                return 1
            store_url = f"redis://127.0.0.1:{store_port}"
            shared = [["--set", f"bridge_state={store_url}"] for _ in ports]
            shared[0] += ["--set", f"bridge_metrics=127.0.0.1:{args.metrics_port}"]
        bridges = []
        for port, options in zip(ports, shared, strict=True):
            bridge = subprocess.Popen(
                [
                    str(BIN / args.tool),
                    "-s",
                    str(ROOT / "addon" / "bridge.py"),
                    "--mode",
                    f"reverse:http://127.0.0.1:{upstream_port}",
                    # The bridge answers Responses requests itself; mitmproxy need not
                    # open an HTTP connection to the upstream before it knows that.
                    "--set",
                    "connection_strategy=lazy",
                    "--listen-host",
                    "127.0.0.1",
                    "--listen-port",
                    str(port),
                    *options,
                    *extra,
                ],
                cwd=ROOT,
                start_new_session=True,
            )
            procs.append(bridge)
            bridges.append((port, bridge))
        for port, bridge in bridges:
            if not _wait_listening(port, bridge, 30):
                print(f"{args.tool} on port {port} did not start")
                return 1
        if args.instances > 1:
            print(_scaleout_banner(ports, store_url, args.metrics_port), flush=True)
        else:
            print(_banner(args.port, upstream_port, args.live), flush=True)
        while all(p.poll() is None for p in procs):
            time.sleep(0.2)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        # A second Ctrl-C (or the terminal's, which reaches the children too)
        # must not cut the shutdown short and leave a process behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    sys.exit(main())
