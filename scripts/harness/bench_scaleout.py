"""The scale-out row of `make bench`: clients split over two bridges on one state store.

Three setups in front of one local upstream, each measured with the same
clients (every stream a hard-affinity session doing several turns in a row,
as Codex CLI does): one bridge with in-memory state (the default), one bridge
on a Valkey store, and two bridges on that store with the streams split
evenly between them. The figures are aggregate events/s and time to first
event over all streams. Each setup gets a warm-up run first (connections,
bindings and upstream sessions opened), then the measured one.

    PYTHONPATH=scripts python -m harness.bench_scaleout [--streams N] [--turns N]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from typing import Any

from responses_ws_bridge.local.ports import free_port
from responses_ws_bridge.local.state_server import StateServer

from harness.bench_client import (
    CODEX_BODY_BYTES,
    Fleet,
    Target,
    TurnResult,
    turn_figures,
)
from harness.proxy_process import ProxyProcess

SETUPS = ("one_memory", "one_store", "two_store")


@dataclass(frozen=True)
class ScaleoutSpec:
    streams: int = 32
    turns: int = 10
    deltas: int = 50

    @classmethod
    def smoke(cls) -> ScaleoutSpec:
        return cls(streams=4, turns=2, deltas=5)


@contextmanager
def _upstream() -> Iterator[int]:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "responses_ws_bridge.local.upstream",
            "--port",
            str(port),
            "--no-record",
            "--quiet",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while not _accepts(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the local upstream did not start")
            time.sleep(0.05)
        yield port
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _bridge(upstream_port: int, store_url: str | None) -> ProxyProcess:
    args = ["--mode", f"reverse:http://127.0.0.1:{upstream_port}"]
    args += ["--set", "connection_strategy=lazy"]
    if store_url is not None:
        args += ["--set", f"bridge_state={store_url}"]
    return ProxyProcess(*args)


async def _measure(
    targets: Sequence[Target], spec: ScaleoutSpec, run_id: str, body_bytes: int
) -> dict[str, Any]:
    """`spec.streams` streams, split evenly over `targets`, warm-up then measured."""
    share = [spec.streams // len(targets)] * len(targets)
    share[0] += spec.streams - sum(share)
    fleets = [
        Fleet(target, n, f"{run_id}-{i}", body_bytes=body_bytes)
        for i, (target, n) in enumerate(zip(targets, share, strict=True))
    ]
    try:
        warm = await asyncio.gather(*(f.run(deltas=12) for f in fleets))
        warm_errors = [r.error for results in warm for r in results if r.error is not None]
        started = time.perf_counter()
        runs = await asyncio.gather(*(f.run(deltas=spec.deltas, turns=spec.turns) for f in fleets))
        wall_s = time.perf_counter() - started
    finally:
        await asyncio.gather(*(f.close() for f in fleets))
    results: list[TurnResult] = [r for results in runs for r in results]
    figures = turn_figures(results, wall_s)
    figures["instances"] = len(targets)
    if warm_errors:
        figures["warmup_errors"] = len(warm_errors)
        figures["errors"] += len(warm_errors)
    return figures


def measure_scaleout(
    spec: ScaleoutSpec | None = None, *, body_bytes: int = CODEX_BODY_BYTES, run_id: str = ""
) -> dict[str, Any]:
    """The three setups' figures, plus the two-instance ratios against one instance."""
    spec = spec or ScaleoutSpec()
    run_id = run_id or f"scaleout-{int(time.time())}"
    with ExitStack() as stack:
        upstream_port = stack.enter_context(_upstream())
        store = stack.enter_context(StateServer())
        memory = _bridge(upstream_port, None)
        shared = [_bridge(upstream_port, f"{store.url}/0/{run_id}") for _ in range(2)]
        for proxy in (memory, *shared):
            stack.callback(proxy.close)
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            for future in [pool.submit(p.start) for p in (memory, *shared)]:
                future.result()

        def target(proxy: ProxyProcess) -> Target:
            return Target("bridge", "http", "127.0.0.1", proxy.port)

        async def run_all() -> dict[str, Any]:
            return {
                "one_memory": await _measure([target(memory)], spec, f"{run_id}-m", body_bytes),
                "one_store": await _measure([target(shared[0])], spec, f"{run_id}-s", body_bytes),
                "two_store": await _measure(
                    [target(p) for p in shared], spec, f"{run_id}-t", body_bytes
                ),
            }

        results = asyncio.run(run_all())
    one, two = results["one_store"], results["two_store"]
    return {
        "spec": asdict(spec),
        "results": results,
        "two_vs_one_events_per_s": _ratio(two["events_per_s"], one["events_per_s"]),
        "two_vs_one_ttfe_p50": _ratio(two["ttfe_ms_p50"], one["ttfe_ms_p50"]),
        "store_vs_memory_ttfe_p50": _ratio(
            one["ttfe_ms_p50"], results["one_memory"]["ttfe_ms_p50"]
        ),
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a is not None and b else None


def format_scaleout(doc: dict[str, Any]) -> str:
    spec = doc["spec"]
    lines = [
        f"scale-out: {spec['streams']} hard-affinity streams x {spec['turns']} turns "
        f"x {spec['deltas']} deltas",
        f"  {'setup':<34} {'events/s':>10} {'TTFE p50 ms':>12} {'TTFE p99 ms':>12} {'errors':>7}",
    ]
    names = {
        "one_memory": "1 instance, in-memory state",
        "one_store": "1 instance, shared store",
        "two_store": "2 instances, one shared store",
    }
    for key in SETUPS:
        r = doc["results"][key]
        lines.append(
            f"  {names[key]:<34} {_num(r['events_per_s']):>10} {_num(r['ttfe_ms_p50']):>12} "
            f"{_num(r['ttfe_ms_p99']):>12} {r['errors']:>7}"
        )
    lines.append(
        f"  two instances / one: events/s x{_num(doc['two_vs_one_events_per_s'])}, "
        f"TTFE p50 x{_num(doc['two_vs_one_ttfe_p50'])}; "
        f"store / memory TTFE p50 x{_num(doc['store_vs_memory_ttfe_p50'])}"
    )
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = ScaleoutSpec()
    parser.add_argument("--streams", type=int, default=defaults.streams)
    parser.add_argument("--turns", type=int, default=defaults.turns)
    parser.add_argument("--deltas", type=int, default=defaults.deltas)
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    doc = measure_scaleout(ScaleoutSpec(args.streams, args.turns, args.deltas))
    print(format_scaleout(doc))
    if args.json:
        with open(args.json, "w") as out:
            out.write(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
