"""The secret-scrubbing row of `make bench`: what cutting known secrets out of every event costs.

Every upstream frame is searched once for every known secret (account
tokens, refresh tokens, client keys, in their JSON-escaped forms too) before
the relay writes it (`core.redaction.SecretScrubber.known`). This measures,
in process and single-threaded, the relay's CPU per frame for one turn of
Codex-sized events taken one frame per batch (the worst case: no batching),
with no secret to look for and with the secrets of a small and a large pool;
and the search alone on a text delta and on the final `response.completed`.

    PYTHONPATH=scripts python -m harness.bench_scrub
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

from responses_ws_bridge.core.event_relay import SseRelay
from responses_ws_bridge.core.redaction import SecretScrubber
from responses_ws_bridge.local.response_events import TurnSpec, encode, turn_events

# Accounts in the pools measured (each: an access token, a refresh token; plus two client keys).
POOLS = (0, 3, 32)


def _secrets(accounts: int) -> list[str]:
    found: list[str] = []
    for n in range(accounts):
        found.append(f"eyJhbGciOiJSUzI1NiJ9.{'eyJzdWIiOiJhY2NvdW50' * 12}{n:04d}.c2lnbmF0dXJl{n}")
        found.append(f"rt_{n:04d}{'refreshtokenmaterial' * 3}")
    return [*found, "client-key-one", "client-key-two"] if accounts else []


def _best(call: Callable[[], object], number: int, repeat: int) -> float:
    """Seconds per call, the best of `repeat` runs (the least disturbed by other work)."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            call()
        best = min(best, (time.perf_counter() - start) / number)
    return best


def measure_scrub(*, deltas: int = 200, turns: int = 100, repeat: int = 5) -> dict[str, Any]:
    """ns per frame through the relay, and ns per search, for each pool size."""
    request = {"model": "gpt-5-codex", "input": "hi"}
    frames = [
        encode(e)
        for e in turn_events(
            request, TurnSpec(deltas=deltas), response_id="resp_b", item_id="msg_b", created_at=0
        )
    ]
    delta = next(f for f in frames if '"response.output_text.delta"' in f)
    completed = frames[-1]
    rows = []
    for accounts in POOLS:
        scrub = SecretScrubber(_secrets(accounts))

        def turn(scrub: SecretScrubber = scrub) -> None:
            relay = SseRelay(scrub, lambda: 0.0)
            for frame in frames:
                relay.take([frame])

        per_turn = _best(turn, turns, repeat)
        on_delta = _best(functools.partial(scrub.known, delta), 20_000, repeat)
        on_completed = _best(functools.partial(scrub.known, completed), 2_000, repeat)
        rows.append(
            {
                "accounts": accounts,
                "secrets": len(_secrets(accounts)),
                "relay_ns_per_frame": round(per_turn / len(frames) * 1e9),
                "search_ns_delta": round(on_delta * 1e9),
                "search_ns_completed": round(on_completed * 1e9),
            }
        )
    return {
        "frames_per_turn": len(frames),
        "delta_bytes": len(delta),
        "completed_bytes": len(completed),
        "rows": rows,
    }


def format_scrub(doc: dict[str, Any]) -> str:
    head = (
        f"Scrubbing known secrets from every event (one turn of {doc['frames_per_turn']} "
        f"frames, one frame per batch; delta {doc['delta_bytes']} B, completed "
        f"{doc['completed_bytes']} B)"
    )
    lines = [
        head,
        f"{'accounts':>8} {'secrets':>8} {'relay ns/frame':>15} {'search ns/delta':>16} "
        f"{'search ns/completed':>20}",
    ]
    for row in doc["rows"]:
        lines.append(
            f"{row['accounts']:>8} {row['secrets']:>8} {row['relay_ns_per_frame']:>15} "
            f"{row['search_ns_delta']:>16} {row['search_ns_completed']:>20}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    doc = measure_scrub()
    print(json.dumps(doc, indent=2) if args.json else format_scrub(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
