"""`make bench`: the bridge against plain mitmproxy and a direct WebSocket client.

Starts on 127.0.0.1, each in its own process: the local WebSocket upstream,
the local HTTP SSE upstream, plain `mitmdump` streaming from the SSE upstream
(passthrough), and the bridge twice in front of the WebSocket upstream (reuse
off: fresh; reuse on: reused). Then runs the same workloads through every path
(direct = a `websockets` client on the upstream itself), reads each proxy's CPU
and RSS from /proc around every workload, prints the tables, ratios and
targets, and writes the raw figures as JSON (`--json`, default
bench-results.json). `--quick` is a smoke run of under a minute; `--smoke` is
the tiny one the test suite runs.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import datetime
import gc
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from responses_ws_bridge.testing.bench_client import (
    CODEX_BODY_BYTES,
    PATHS,
    Fleet,
    ProcSample,
    Target,
    WorkloadSpec,
    add_added_latency,
    check_document,
    evaluate_targets,
    format_report,
    process_figures,
    ratios,
    reset_peak_rss,
    sample_process,
    turn_figures,
)
from responses_ws_bridge.testing.bench_scaleout import (
    ScaleoutSpec,
    format_scaleout,
    measure_scaleout,
)
from responses_ws_bridge.testing.proxy_process import ProxyProcess, free_port

ROOT = Path(__file__).resolve().parent.parent

STREAM_ALL = ROOT / "scripts" / "bench_stream_all.py"
# The bridge with reuse, started only to hold idle sessions for the RSS figure.
IDLE_PROXY = "bridge_idle"
# Seconds a proxy gets to release what closed connections held before RSS is read.
SETTLE_S = 1.0


@dataclass(frozen=True)
class Mode:
    name: str
    workloads: tuple[WorkloadSpec, ...]
    idle_sessions: int


def modes(pace_ms: float) -> dict[str, Mode]:
    def paced(streams: int, deltas: int) -> WorkloadSpec:
        return WorkloadSpec(f"paced-{streams}", "paced", streams, 1, deltas, pace_ms)

    return {
        "full": Mode(
            "full",
            (
                WorkloadSpec("short", "short", 1, 300, 12),
                WorkloadSpec("long", "long", 1, 6, 5000),
                paced(1, 1000),
                paced(64, 400),
                paced(256, 400),
                WorkloadSpec("flood", "flood", 8, 1, 20000),
            ),
            256,
        ),
        "quick": Mode(
            "quick",
            (
                WorkloadSpec("short", "short", 1, 30, 12),
                WorkloadSpec("long", "long", 1, 1, 5000),
                paced(1, 100),
                paced(64, 30),
                paced(256, 20),
                WorkloadSpec("flood", "flood", 2, 1, 5000),
            ),
            32,
        ),
        "smoke": Mode(
            "smoke",
            (
                WorkloadSpec("short", "short", 1, 8, 12),
                WorkloadSpec("long", "long", 1, 1, 1000),
                paced(1, 20),
                paced(8, 20),
                WorkloadSpec("flood", "flood", 2, 1, 1000),
            ),
            8,
        ),
    }


# -- processes ---------------------------------------------------------------------------


class Upstream:
    """One local upstream process (`testing.local_upstream` or `testing.local_sse_upstream`)."""

    def __init__(self, module: str, *args: str, start_timeout: float = 20.0) -> None:
        self.port = free_port()
        cmd = [sys.executable, "-m", module, "--port", str(self.port), *args]
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
        )
        deadline = time.monotonic() + start_timeout
        while not _accepts(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{module} did not start")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass
class Stack:
    """Every process of a run, where each path sends its requests, and how big they are."""

    targets: dict[str, Target]
    proxies: dict[str, ProxyProcess]
    upstreams: dict[str, Upstream]
    body_bytes: int = CODEX_BODY_BYTES

    def proxy_pid(self, path: str) -> int | None:
        proxy = self.proxies.get(path)
        return proxy.proc.pid if proxy is not None and proxy.proc is not None else None

    def upstream_pid(self, path: str) -> int:
        return self.upstreams["sse" if path == "passthrough" else "ws"].pid


@contextmanager
def running_stack(
    paths: Sequence[str],
    bridge_options: Sequence[str],
    bridge_scripts: Sequence[str] = (),
    idle_sessions: bool = True,
) -> Iterator[Stack]:
    with ExitStack() as stack:
        ws = Upstream("responses_ws_bridge.testing.local_upstream", "--no-record", "--quiet")
        stack.callback(ws.stop)
        upstreams = {"ws": ws}
        if "passthrough" in paths:
            sse = Upstream("responses_ws_bridge.testing.local_sse_upstream")
            stack.callback(sse.stop)
            upstreams["sse"] = sse
        bridge_args = ["--set", "connection_strategy=lazy"]
        for option in bridge_options:
            bridge_args += ["--set", option]
        for script in bridge_scripts:
            bridge_args += ["-s", script]
        wanted: dict[str, ProxyProcess] = {}
        if "passthrough" in paths:
            # Plain mitmdump: no bridge, so no ready line to wait for.
            wanted["passthrough"] = ProxyProcess(
                "--mode",
                f"reverse:http://127.0.0.1:{upstreams['sse'].port}",
                "-s",
                str(STREAM_ALL),
                script=None,
            )
        bridges = [("bridge_fresh", "0"), ("bridge_reused", "3600")]
        if idle_sessions and "bridge_reused" in paths:
            # Its own process: after the workloads, freed memory would hide the sessions' cost.
            bridges.append((IDLE_PROXY, "3600"))
        for path, ttl in bridges:
            if path in paths or path == IDLE_PROXY:
                wanted[path] = ProxyProcess(
                    "--mode",
                    f"reverse:http://127.0.0.1:{ws.port}",
                    *bridge_args,
                    "--set",
                    f"bridge_session_idle_ttl={ttl}",
                )
        for proxy in wanted.values():
            stack.callback(proxy.close)
        # The mitmdump start-ups at once: each takes a second or two of import time.
        with concurrent.futures.ThreadPoolExecutor(len(wanted) or 1) as pool:
            for future in [pool.submit(proxy.start) for proxy in wanted.values()]:
                future.result()
        targets = {
            path: Target(path, "http", "127.0.0.1", proxy.port) for path, proxy in wanted.items()
        }
        targets["direct"] = Target("direct", "ws", "127.0.0.1", ws.port)
        yield Stack(targets, wanted, upstreams)


# -- measuring ---------------------------------------------------------------------------


def _reset_and_sample(pid: int | None) -> ProcSample | None:
    if pid is None:
        return None
    reset_peak_rss(pid)
    return sample_process(pid)


@contextmanager
def profiling(pid: int | None, out: Path | None) -> Iterator[None]:
    """Samples the process with py-spy while the block runs (collapsed stacks to `out`)."""
    if pid is None or out is None:
        yield
        return
    spy = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("py-spy")),
            "record",
            "--pid",
            str(pid),
            "--format",
            "raw",
            "--rate",
            "250",
            "--nonblocking",
            "--output",
            str(out),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        try:
            spy.wait(30)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait(10)


async def measure(
    stack: Stack, path: str, workload: WorkloadSpec, run_id: str, profile_dir: Path | None = None
) -> dict[str, Any]:
    fleet = Fleet(
        stack.targets[path],
        workload.streams,
        f"{run_id}-{workload.name}",
        body_bytes=stack.body_bytes,
    )
    try:
        # Opens the connections (and, with reuse, the upstream sessions) outside the figures.
        if path == "bridge_reused":
            warm_errors = [r.error for r in await fleet.run(deltas=12) if r.error is not None]
        else:
            warm_errors = await fleet.connect()
        proxy_pid, upstream_pid = stack.proxy_pid(path), stack.upstream_pid(path)
        # The load generator's own garbage from the warm-up, so its collector stays quiet.
        gc.collect()
        proxy0 = _reset_and_sample(proxy_pid)
        upstream0 = _reset_and_sample(upstream_pid)
        self0 = sample_process(os.getpid())
        profile = profile_dir / f"{path}-{workload.name}.txt" if profile_dir else None
        with profiling(proxy_pid, profile):
            started = time.perf_counter()
            results = await fleet.run(
                deltas=workload.deltas, pace_ms=workload.pace_ms, turns=workload.turns
            )
            wall_s = time.perf_counter() - started
        proxy1 = sample_process(proxy_pid) if proxy_pid is not None else None
        upstream1 = sample_process(upstream_pid)
        self1 = sample_process(os.getpid())
    finally:
        await fleet.close()
    figures = turn_figures(results, wall_s, steady=workload.kind == "paced")
    if warm_errors:
        figures["warmup_errors"] = len(warm_errors)
        figures["errors"] += len(warm_errors)
        figures["first_errors"] = sorted({*figures["first_errors"], *warm_errors})[:3]
    events = figures["events"]
    return {
        "client": figures,
        "proxy": None
        if proxy0 is None or proxy1 is None
        else process_figures(proxy0, proxy1, events),
        "upstream": process_figures(upstream0, upstream1, events)
        if upstream0 is not None
        else None,
        "load_generator": process_figures(self0, self1, events),
    }


async def measure_idle_sessions(stack: Stack, count: int, run_id: str) -> dict[str, Any]:
    """RSS and sockets of the bridge per idle upstream session held for reuse."""
    pid = stack.proxy_pid(IDLE_PROXY)
    assert pid is not None
    target = stack.targets[IDLE_PROXY]
    # A first batch warms whatever the bridge allocates once, so it is not counted.
    warm = Fleet(target, min(count, 16), f"{run_id}-idle-warm", body_bytes=stack.body_bytes)
    results = await warm.run(deltas=12)
    await warm.close()
    await asyncio.sleep(SETTLE_S)
    before = sample_process(pid)
    fds_before = len(os.listdir(f"/proc/{pid}/fd"))
    batch = 16
    for start in range(0, count, batch):
        fleet = Fleet(
            target, min(batch, count - start), f"{run_id}-idle-{start}", body_bytes=stack.body_bytes
        )
        try:
            results += await fleet.run(deltas=12)
        finally:
            await fleet.close()
    await asyncio.sleep(SETTLE_S)
    after = sample_process(pid)
    fds_after = len(os.listdir(f"/proc/{pid}/fd"))
    errors = [r.error for r in results if r.error is not None]
    return {
        "path": "bridge_reused",
        "sessions": count,
        "errors": len(errors),
        "first_errors": sorted(set(errors))[:3],
        "rss_before_kib": before.rss_kib,
        "rss_after_kib": after.rss_kib,
        "kib_per_session": round((after.rss_kib - before.rss_kib) / count, 2),
        "fds_per_session": round((fds_after - fds_before) / count, 3),
    }


async def run_all(
    stack: Stack, paths: Sequence[str], mode: Mode, log: Any, profile_dir: Path | None = None
) -> tuple[dict[str, dict[str, Any]], dict[str, Any] | None]:
    run_id = f"bench-{os.getpid()}-{int(time.time())}"
    results: dict[str, dict[str, Any]] = {path: {} for path in paths}
    for workload in mode.workloads:
        # Paths take turns per workload, so slow drift of the machine hits them alike.
        for path in paths:
            started = time.perf_counter()
            figures = await measure(stack, path, workload, run_id, profile_dir)
            results[path][workload.name] = figures
            client = figures["client"]
            print(
                f"  {workload.name:<10} {path:<14} {client['complete']}/{client['turns']} turns"
                f" {client['events']} events in {client['wall_s']:.2f} s"
                f" ({time.perf_counter() - started:.1f} s with warm-up)"
                + (f"  ERRORS {client['first_errors']}" if client["errors"] else ""),
                file=log,
                flush=True,
            )
    idle = None
    if "bridge_reused" in paths and mode.idle_sessions:
        started = time.perf_counter()
        idle = await measure_idle_sessions(stack, mode.idle_sessions, run_id)
        print(
            f"  idle sessions: {mode.idle_sessions} in {time.perf_counter() - started:.1f} s",
            file=log,
            flush=True,
        )
    return results, idle


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "mitmproxy": metadata.version("mitmproxy"),
        "websockets": metadata.version("websockets"),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench.py", description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller workloads, under a minute")
    size.add_argument("--smoke", action="store_true", help="tiny workloads (the test suite)")
    parser.add_argument("--json", default="bench-results.json", help="where to write the figures")
    parser.add_argument("--markdown", metavar="PATH", help="also write the tables as Markdown")
    parser.add_argument(
        "--paths", default=",".join(PATHS), help=f"comma-separated subset of {','.join(PATHS)}"
    )
    parser.add_argument(
        "--pace-ms", type=float, default=5.0, help="milliseconds between events on paced streams"
    )
    parser.add_argument(
        "--body-bytes",
        type=int,
        default=CODEX_BODY_BYTES,
        help="size of each request body (default: Codex CLI's first turn in captures/)",
    )
    parser.add_argument(
        "--profile",
        metavar="DIR",
        help="sample every proxy with py-spy (pip install py-spy) during every workload; "
        "collapsed stacks to DIR/PATH-WORKLOAD.txt (the figures then include its overhead)",
    )
    parser.add_argument(
        "--bridge-script",
        action="append",
        default=[],
        metavar="PATH",
        help="extra mitmproxy script for both bridge proxies, for experiments (repeatable)",
    )
    parser.add_argument(
        "--bridge-set",
        action="append",
        default=[],
        metavar="OPTION=VALUE",
        help="extra mitmproxy option for both bridge proxies (repeatable)",
    )
    parser.add_argument(
        "--scaleout",
        action="store_true",
        help="also measure two bridge instances on one state store against one",
    )
    args = parser.parse_args(argv)
    paths = [p for p in PATHS if p in args.paths.split(",")]
    unknown = set(args.paths.split(",")) - set(PATHS)
    if unknown or not paths:
        parser.error(f"unknown paths: {', '.join(sorted(unknown)) or '(none given)'}")
    mode = modes(args.pace_ms)["quick" if args.quick else "smoke" if args.smoke else "full"]

    profile_dir = Path(args.profile) if args.profile else None
    if profile_dir is not None:
        if not Path(sys.executable).with_name("py-spy").exists():
            parser.error("--profile needs py-spy in this environment: pip install py-spy")
        profile_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    date = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    print(f"benchmark ({mode.name}) on {os.cpu_count()} cores: {', '.join(paths)}", flush=True)
    with running_stack(paths, args.bridge_set, args.bridge_script, mode.idle_sessions > 0) as stack:
        stack.body_bytes = args.body_bytes
        print(f"  processes ready in {time.perf_counter() - started:.1f} s", flush=True)
        results, idle = asyncio.run(run_all(stack, paths, mode, sys.stdout, profile_dir))
        stopping = time.perf_counter()
    print(f"  processes stopped in {time.perf_counter() - stopping:.1f} s", flush=True)
    add_added_latency(results)
    doc: dict[str, Any] = {
        "schema": "responses-bridge-bench/1",
        "date": date,
        "mode": mode.name,
        "machine": machine(),
        "settings": {
            "pace_ms": args.pace_ms,
            "body_bytes": args.body_bytes,
            "bridge_options": args.bridge_set,
            "bridge_scripts": args.bridge_script,
        },
        "paths": paths,
        "workloads": [w.as_dict() for w in mode.workloads],
        "results": results,
        "idle_sessions": idle,
        "ratios": ratios(results),
        "targets": evaluate_targets(results, mode.workloads, idle),
    }
    if args.scaleout:
        spec = ScaleoutSpec.smoke() if args.smoke else None
        doc["scaleout"] = measure_scaleout(spec, body_bytes=args.body_bytes)
    doc["duration_s"] = round(time.perf_counter() - started, 1)
    Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    if args.markdown:
        machine_line = (
            f"{doc['date']}, {doc['mode']} run, {doc['machine']['cores']} cores "
            f"({doc['machine']['cpu']}), Python {doc['machine']['python']}, "
            f"mitmproxy {doc['machine']['mitmproxy']}, websockets {doc['machine']['websockets']}"
        )
        Path(args.markdown).write_text(
            machine_line + "\n\n" + format_report(doc, markdown=True) + "\n"
        )
    print()
    print(format_report(doc))
    if "scaleout" in doc:
        print()
        print(format_scaleout(doc["scaleout"]))
    problems = check_document(doc)
    print(f"\n{doc['duration_s']} s; figures in {args.json}")
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
