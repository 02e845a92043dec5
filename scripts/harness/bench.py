"""`make bench`: the bridge, plain mitmproxy and a direct client, over a model network.

Starts on 127.0.0.1, each in its own process: the local WebSocket upstream and
the local HTTP SSE upstream, both serving TLS with a throwaway certificate
(`responses_ws_bridge.local.tls`), a delay relay in front of both that adds a
round-trip time each way (`harness.delay_relay`, `--rtt-ms`, default 40), plain `mitmdump`
streaming from the SSE upstream (passthrough), and the bridge in front of the
WebSocket upstream: reuse off (fresh), reuse on (reused), reuse off with a
TCP/TLS connection made ahead per upstream host (preconnect), and once more
to hold idle sessions for the memory figure. mitmproxy and the bridge trust the test CA
(`ssl_verify_upstream_trusted_ca`). Every path crosses the same relay.

Then it runs the same workloads through every path (direct = a `websockets`
client on the upstream itself), reads each proxy's CPU and RSS from /proc
around every workload, and returns the document `scripts/bench.py` prints and
writes. A full run measures the time to first event once more at 0 ms RTT, for
the comparison on loopback.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime
import gc
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, TextIO

from responses_ws_bridge.local.ports import free_port
from responses_ws_bridge.local.tls import TestPki, make_test_pki

from harness.bench_client import (
    CODEX_BODY_BYTES,
    PATHS,
    Fleet,
    ProcSample,
    Target,
    WorkloadSpec,
    add_added_latency,
    evaluate_targets,
    process_figures,
    ratios,
    reset_peak_rss,
    sample_process,
    saturation_notes,
    turn_figures,
)
from harness.proxy_process import ProxyProcess

# Where `python -m harness.…` finds this package: the server processes start there.
SCRIPTS = Path(__file__).resolve().parents[1]
STREAM_ALL = Path(__file__).resolve().with_name("stream_all.py")
# The bridge with reuse, started only to hold idle sessions for the RSS figure.
IDLE_PROXY = "bridge_idle"
# Seconds a proxy gets to release what closed connections held before RSS is read.
SETTLE_S = 1.0
# The bridge option that sizes the connections made ahead (absent: not in this bridge).
PRECONNECT_OPTION = "bridge_preconnect"
ALL_PATHS = (*PATHS[:4], "bridge_preconnect")


@dataclass(frozen=True)
class Mode:
    name: str
    workloads: tuple[WorkloadSpec, ...]
    # Idle reused sessions held for the memory figure, and turns each serves.
    idle_sessions: int
    idle_turns: int
    # Turns of the time-to-first-event workload.
    first_turns: int


def first_event(rtt_ms: float, turns: int) -> WorkloadSpec:
    """Time to first event over what a request opens; gaps let what was made ahead be replaced."""
    gap_ms = 4 * rtt_ms + 50
    return WorkloadSpec(
        f"first-{rtt_ms:g}ms", "first", 1, turns, 12, rtt_ms=rtt_ms, gap_ms=gap_ms, paths=PATHS
    )


def modes(pace_ms: float, rtt_ms: float) -> dict[str, Mode]:
    def paced(streams: int, deltas: int) -> WorkloadSpec:
        return WorkloadSpec(f"paced-{streams}", "paced", streams, 1, deltas, pace_ms, rtt_ms)

    def spec(name: str, kind: Any, streams: int, turns: int, deltas: int) -> WorkloadSpec:
        return WorkloadSpec(name, kind, streams, turns, deltas, rtt_ms=rtt_ms)

    return {
        "full": Mode(
            "full",
            (
                first_event(rtt_ms, 40),
                spec("short", "short", 1, 300, 12),
                spec("long", "long", 1, 6, 5000),
                paced(1, 1000),
                paced(64, 400),
                paced(256, 400),
                spec("flood", "flood", 8, 1, 20000),
            ),
            100,
            10,
            40,
        ),
        "quick": Mode(
            "quick",
            (
                first_event(rtt_ms, 12),
                spec("short", "short", 1, 30, 12),
                spec("long", "long", 1, 1, 5000),
                paced(1, 100),
                paced(64, 30),
                paced(256, 20),
                spec("flood", "flood", 2, 1, 5000),
            ),
            100,
            10,
            12,
        ),
        "smoke": Mode(
            "smoke",
            (
                first_event(rtt_ms, 3),
                spec("short", "short", 1, 8, 12),
                spec("long", "long", 1, 1, 1000),
                paced(1, 20),
                paced(8, 20),
                spec("flood", "flood", 2, 1, 1000),
            ),
            8,
            3,
            3,
        ),
    }


# -- processes ---------------------------------------------------------------------------


class ServerProcess:
    """One local server process (an upstream, the relay), ready once it accepts on `port`."""

    def __init__(
        self, module: str, *args: str, port: int | None = None, start_timeout: float = 20.0
    ) -> None:
        self.port = port if port is not None else free_port()
        cmd = [sys.executable, "-m", module, *args]
        if port is None:
            cmd += ["--port", str(self.port)]
        self.proc = subprocess.Popen(
            cmd, cwd=SCRIPTS, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
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
    upstreams: dict[str, ServerProcess]
    rtt_ms: float
    body_bytes: int = CODEX_BODY_BYTES
    notes: list[str] = field(default_factory=list)

    def proxy_pid(self, path: str) -> int | None:
        proxy = self.proxies.get(path)
        return proxy.proc.pid if proxy is not None and proxy.proc is not None else None

    def upstream_pid(self, path: str) -> int:
        return self.upstreams["sse" if path == "passthrough" else "ws"].pid


@contextmanager
def running_stack(
    paths: Sequence[str],
    rtt_ms: float,
    pki: TestPki,
    bridge_options_set: Sequence[str] = (),
    bridge_scripts: Sequence[str] = (),
    idle_sessions: bool = True,
) -> Iterator[Stack]:
    notes: list[str] = []
    tls = ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)]
    with ExitStack() as stack:
        ws = ServerProcess("responses_ws_bridge.local.upstream", "--no-record", "--quiet", *tls)
        stack.callback(ws.stop)
        upstreams = {"ws": ws}
        if "passthrough" in paths:
            sse = ServerProcess("harness.local_sse_upstream", *tls)
            stack.callback(sse.stop)
            upstreams["sse"] = sse
        # One relay process, one listener per upstream: every path crosses the same network.
        relay_ports = {name: free_port() for name in upstreams}
        routes = [f"{relay_ports[name]}:{up.port}" for name, up in upstreams.items()]
        relay = ServerProcess(
            "harness.delay_relay",
            *(arg for route in routes for arg in ("--route", route)),
            "--rtt-ms",
            f"{rtt_ms:g}",
            port=relay_ports["ws"],
        )
        stack.callback(relay.stop)
        upstreams["relay"] = relay
        trust = ["--set", f"ssl_verify_upstream_trusted_ca={pki.ca_cert}"]
        bridge_args = ["--set", "connection_strategy=lazy", *trust]
        for option in bridge_options_set:
            bridge_args += ["--set", option]
        for script in bridge_scripts:
            bridge_args += ["-s", script]
        wanted: dict[str, ProxyProcess] = {}
        if "passthrough" in paths:
            # Plain mitmdump: no bridge, so no ready line to wait for.
            wanted["passthrough"] = ProxyProcess(
                "--mode",
                f"reverse:https://127.0.0.1:{relay_ports['sse']}",
                *trust,
                "-s",
                str(STREAM_ALL),
                script=None,
            )
        # (path, idle TTL, connections made ahead per upstream host)
        bridges = [
            ("bridge_fresh", "0", 0),
            ("bridge_reused", "3600", 0),
            ("bridge_preconnect", "0", 1),
        ]
        if idle_sessions and "bridge_reused" in paths:
            # Its own process: after the workloads, freed memory would hide the sessions' cost.
            bridges.append((IDLE_PROXY, "3600", 0))
        for path, ttl, preconnect in bridges:
            if path in paths or path == IDLE_PROXY:
                extra = ["--set", f"{PRECONNECT_OPTION}={preconnect}"]
                wanted[path] = ProxyProcess(
                    "--mode",
                    f"reverse:https://127.0.0.1:{relay_ports['ws']}",
                    *bridge_args,
                    "--set",
                    f"bridge_session_idle_ttl={ttl}",
                    *extra,
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
        targets["direct"] = Target(
            "direct", "ws", "127.0.0.1", relay_ports["ws"], ssl_context=pki.client_context()
        )
        yield Stack(targets, wanted, upstreams, rtt_ms, notes=notes)


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
    first = workload.kind == "first"
    try:
        # Opens the connections (and, with reuse, the upstream sessions; with
        # preconnect, the first connection to the host and so the one made ahead)
        # outside the figures.
        if path in ("bridge_reused", "bridge_preconnect") or (first and path != "direct"):
            warm = await fleet.run(deltas=12, fresh=first)
            warm_errors = [r.error for r in warm if r.error is not None]
            if first:
                await asyncio.sleep(workload.gap_ms / 1000)
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
                deltas=workload.deltas,
                pace_ms=workload.pace_ms,
                turns=workload.turns,
                fresh=first,
                key_per_turn=first and path != "bridge_reused",
                gap_s=workload.gap_ms / 1000,
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


async def _turns_on(
    stack: Stack, count: int, turns: int, prefix: str, batch: int = 25
) -> list[str | None]:
    """`turns` turns on each of `count` sessions (keys `prefix-i`), `batch` at a time."""
    target = stack.targets[IDLE_PROXY]
    errors: list[str | None] = []
    for start in range(0, count, batch):
        fleet = Fleet(
            target, min(batch, count - start), f"{prefix}-{start}", body_bytes=stack.body_bytes
        )
        try:
            errors += [r.error for r in await fleet.run(deltas=12, turns=turns)]
        finally:
            await fleet.close()
    return errors


async def measure_idle_sessions(
    stack: Stack, count: int, turns: int, run_id: str
) -> dict[str, Any]:
    """RSS and sockets of the bridge per idle reused session, after 1 turn and after `turns`."""
    pid = stack.proxy_pid(IDLE_PROXY)
    assert pid is not None
    # A first batch warms whatever the bridge allocates once, so it is not counted.
    errors = await _turns_on(stack, min(count, 16), 2, f"{run_id}-idle-warm")
    await asyncio.sleep(SETTLE_S)
    before = sample_process(pid)
    fds_before = len(os.listdir(f"/proc/{pid}/fd"))
    prefix = f"{run_id}-idle"
    errors += await _turns_on(stack, count, 1, prefix)
    await asyncio.sleep(SETTLE_S)
    after_one = sample_process(pid)
    # The same keys again: every turn reuses its session's socket.
    errors += await _turns_on(stack, count, turns - 1, prefix)
    await asyncio.sleep(SETTLE_S)
    after = sample_process(pid)
    fds_after = len(os.listdir(f"/proc/{pid}/fd"))
    failed = [e for e in errors if e is not None]

    def per_session(sample: ProcSample) -> float:
        return round((sample.rss_kib - before.rss_kib) / count, 2)

    return {
        "path": "bridge_reused",
        "sessions": count,
        "turns": turns,
        "recording": True,
        "errors": len(failed),
        "first_errors": sorted(set(failed))[:3],
        "rss_before_kib": before.rss_kib,
        "rss_after_1_turn_kib": after_one.rss_kib,
        "rss_after_kib": after.rss_kib,
        "kib_per_session_1": per_session(after_one),
        "kib_per_session": per_session(after),
        "kib_per_session_per_turn": round(
            (after.rss_kib - after_one.rss_kib) / count / max(1, turns - 1), 3
        ),
        "fds_per_session": round((fds_after - fds_before) / count, 3),
    }


async def run_all(
    stack: Stack,
    paths: Sequence[str],
    workloads: Sequence[WorkloadSpec],
    idle: tuple[int, int] | None,
    log: TextIO,
    profile_dir: Path | None = None,
) -> tuple[dict[str, dict[str, Any]], dict[str, Any] | None]:
    run_id = f"bench-{os.getpid()}-{int(time.time())}-{stack.rtt_ms:g}"
    results: dict[str, dict[str, Any]] = {path: {} for path in paths}
    for workload in workloads:
        # Paths take turns per workload, so slow drift of the machine hits them alike.
        for path in paths:
            if path not in workload.paths or path not in stack.targets:
                continue
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
    idle_figures = None
    if idle is not None and IDLE_PROXY in stack.targets:
        started = time.perf_counter()
        idle_figures = await measure_idle_sessions(stack, idle[0], idle[1], run_id)
        print(
            f"  idle sessions: {idle[0]} x {idle[1]} turns"
            f" in {time.perf_counter() - started:.1f} s",
            file=log,
            flush=True,
        )
    return results, idle_figures


@dataclass(frozen=True)
class RunOptions:
    mode: str = "full"
    paths: tuple[str, ...] = ALL_PATHS
    rtt_ms: float = 40.0
    pace_ms: float = 5.0
    body_bytes: int = CODEX_BODY_BYTES
    bridge_options: tuple[str, ...] = ()
    bridge_scripts: tuple[str, ...] = ()
    profile_dir: Path | None = None


def run(options: RunOptions, log: TextIO = sys.stdout) -> dict[str, Any]:
    """Runs the benchmark and returns its document (see `bench_client.check_document`)."""
    mode = modes(options.pace_ms, options.rtt_ms)[options.mode]
    paths = [p for p in ALL_PATHS if p in options.paths]
    started = time.perf_counter()
    date = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    print(
        f"benchmark ({mode.name}) on {os.cpu_count()} cores, {options.rtt_ms:g} ms RTT, TLS: "
        + ", ".join(paths),
        file=log,
        flush=True,
    )
    # The loopback comparison of the time to first event, in a full run.
    rows = [(options.rtt_ms, mode.workloads)]
    if mode.name == "full" and options.rtt_ms != 0:
        rows.append((0.0, (first_event(0.0, mode.first_turns),)))
    results: dict[str, dict[str, Any]] = {path: {} for path in paths}
    idle: dict[str, Any] | None = None
    notes: list[str] = []
    workloads: list[WorkloadSpec] = []
    with tempfile.TemporaryDirectory(prefix="bench-pki-") as pki_dir:
        pki = make_test_pki(Path(pki_dir))
        for number, (rtt_ms, row) in enumerate(rows):
            row_paths = [p for p in paths if any(p in w.paths for w in row)]
            hold_idle = number == 0 and mode.idle_sessions > 0
            with running_stack(
                row_paths,
                rtt_ms,
                pki,
                options.bridge_options,
                options.bridge_scripts,
                hold_idle,
            ) as stack:
                stack.body_bytes = options.body_bytes
                notes += stack.notes
                print(
                    f"  processes ready in {time.perf_counter() - started:.1f} s "
                    f"({rtt_ms:g} ms RTT)",
                    file=log,
                    flush=True,
                )
                got, got_idle = asyncio.run(
                    run_all(
                        stack,
                        row_paths,
                        row,
                        (mode.idle_sessions, mode.idle_turns) if hold_idle else None,
                        log,
                        options.profile_dir,
                    )
                )
            for path, by_workload in got.items():
                results[path].update(by_workload)
            idle = idle or got_idle
            workloads += row
    ran = [p for p in paths if results.get(p)]
    add_added_latency(results)
    # What each workload really ran on (a path may have been skipped).
    workload_docs = []
    for w in workloads:
        doc_w = w.as_dict()
        doc_w["paths"] = [p for p in doc_w["paths"] if p in ran]
        workload_docs.append(doc_w)
    return {
        "schema": "responses-bridge-bench/2",
        "date": date,
        "mode": mode.name,
        "machine": machine(),
        "settings": {
            "rtt_ms": options.rtt_ms,
            "tls": True,
            "pace_ms": options.pace_ms,
            "body_bytes": options.body_bytes,
            "bridge_options": list(options.bridge_options),
            "bridge_scripts": list(options.bridge_scripts),
        },
        "paths": ran,
        "workloads": workload_docs,
        "results": {p: results[p] for p in ran},
        "idle_sessions": idle,
        "ratios": ratios(results),
        "targets": evaluate_targets(results, workloads, idle, rtt_ms=options.rtt_ms),
        "notes": notes + saturation_notes(workload_docs, results),
        "duration_s": round(time.perf_counter() - started, 1),
    }


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
