"""Serve recorded upstream sessions as a fake upstream, reporting deviations.

WebSocket sessions answer handshakes in recorded order; requests the pool
forwarded over HTTP (compaction, models, …) answer plain requests on the same
port, in recorded order too.

    scripts/replay.py --flows flows/hard-1011.mitm --port 8765 [--speed 1]
                      [--accounts accounts.json] [--exit-after-all] [--summary]

Prints one line per served session and per deviation (`--summary`: per
session only, with its count of deviations). Exits 1 when any
deviation occurred, 0 otherwise (on Ctrl-C / SIGTERM, or once every session
was served with --exit-after-all), and 2 when the flows or accounts cannot be
read. A thin shell over `responses_ws_bridge.recording.replay`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from responses_ws_bridge.core.accounts import AccountsFileError, parse_accounts
from responses_ws_bridge.local.loop_thread import serve_until_stopped
from responses_ws_bridge.recording.replay import (
    Deviation,
    FlowFileError,
    ReplayServer,
    ServedSession,
    load_exchanges,
    load_sessions,
)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flows", nargs="+", required=True, metavar="PATH", help="flow files")
    parser.add_argument("--port", type=int, required=True, help="port on 127.0.0.1 (0: any)")
    parser.add_argument(
        "--speed",
        type=float,
        default=None,
        help="replay recorded gaps divided by this (1: as recorded); default: no waiting",
    )
    parser.add_argument(
        "--accounts", metavar="PATH", help="accounts file, to map incoming tokens to account ids"
    )
    parser.add_argument(
        "--exit-after-all", action="store_true", help="exit once every session was served"
    )
    parser.add_argument(
        "--cycle",
        action="store_true",
        help="after the last recorded session, serve the first again (never runs dry)",
    )
    parser.add_argument(
        "--summary",
        action="store_true",
        help="one line per served session with its count of deviations, not each deviation",
    )
    parser.add_argument(
        "--message-timeout",
        type=float,
        default=30.0,
        help="seconds to wait for each recorded client message (default 30)",
    )
    args = parser.parse_args(argv)
    if args.speed is not None and args.speed <= 0:
        parser.error("--speed must be > 0")
    return args


def _tokens(path: str) -> dict[str, str]:
    config = parse_accounts(Path(path).read_text(encoding="utf-8"))
    return {account.bearer: account.id for account in config.accounts}


def _print(line: str) -> None:
    print(line, flush=True)


def _report(item: ServedSession | Deviation) -> None:
    _print(f"DEVIATION {item}" if isinstance(item, Deviation) else str(item))


def _summary(item: ServedSession | Deviation) -> None:
    if isinstance(item, ServedSession):
        _print(str(item))


def _totals(server: ReplayServer, cycle: bool) -> str:
    served, recorded = len(server.served), len(server.sessions)
    count = f"{served} of {recorded} sessions"
    if cycle:
        count = f"{served} sessions ({recorded} recorded, served in a cycle)"
    exchanges = f"{server.exchanges_served} of {len(server.exchanges)} exchanges"
    return f"{count} and {exchanges} served, {len(server.deviations)} deviations"


async def _serve(args: argparse.Namespace, server: ReplayServer) -> None:
    def ready() -> None:
        _print(
            f"replaying {len(server.sessions)} sessions and {len(server.exchanges)} forwarded "
            f"HTTP exchanges on {server.url}"
        )
        for note in server.notes:
            _print(f"note: {note}")

    until = server.wait_all_served if args.exit_after_all else None
    await serve_until_stopped(server, ready, until)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        sessions = load_sessions(args.flows)
        exchanges = load_exchanges(args.flows)
        tokens = _tokens(args.accounts) if args.accounts else None
    except (FlowFileError, AccountsFileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot read {args.accounts}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    if not sessions:
        print("error: no recorded WebSocket session in the flow files", file=sys.stderr)
        return 2
    server = ReplayServer(
        sessions,
        port=args.port,
        speed=args.speed,
        tokens=tokens,
        message_timeout=args.message_timeout,
        observer=_summary if args.summary else _report,
        cycle=args.cycle,
        exchanges=exchanges,
    )
    try:
        asyncio.run(_serve(args, server))
    except OSError as exc:
        print(f"error: cannot listen on 127.0.0.1:{args.port}: {exc}", file=sys.stderr)
        return 2
    _print(_totals(server, args.cycle))
    return 1 if server.deviations else 0


if __name__ == "__main__":
    sys.exit(main())
