"""`make bench`: the bridge against plain mitmproxy and a direct client, over TLS and a model RTT.

The benchmark itself is `harness.bench` (scripts/harness/bench.py); this is
its command line. It prints the tables, ratios and targets, and writes the raw
figures as JSON (`--json`, default bench-results.json). `--quick` is a run of
a minute or two whose verdicts are indicative only; `--smoke` is the tiny one
the test suite runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from harness.bench import ALL_PATHS, RunOptions, run
from harness.bench_client import (
    CODEX_BODY_BYTES,
    check_document,
    format_report,
)
from harness.bench_scaleout import (
    ScaleoutSpec,
    format_scaleout,
    measure_scaleout,
)
from harness.bench_scrub import format_scrub, measure_scrub


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench.py", description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller workloads, a minute or two")
    size.add_argument("--smoke", action="store_true", help="tiny workloads (the test suite)")
    parser.add_argument("--json", default="bench-results.json", help="where to write the figures")
    parser.add_argument("--markdown", metavar="PATH", help="also write the tables as Markdown")
    parser.add_argument(
        "--paths",
        default=",".join(ALL_PATHS),
        help=f"comma-separated subset of {','.join(ALL_PATHS)}",
    )
    parser.add_argument(
        "--rtt-ms",
        type=float,
        default=40.0,
        help="round-trip time the relay adds to every upstream connection (a full run "
        "also measures the time to first event at 0)",
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
        help="extra mitmproxy script for every bridge proxy, for experiments (repeatable)",
    )
    parser.add_argument(
        "--bridge-set",
        action="append",
        default=[],
        metavar="OPTION=VALUE",
        help="extra mitmproxy option for every bridge proxy (repeatable)",
    )
    parser.add_argument(
        "--scaleout",
        action="store_true",
        help="also measure two bridge instances on one state store against one",
    )
    parser.add_argument(
        "--scrub",
        action="store_true",
        help="also measure what cutting known secrets out of every event costs per frame",
    )
    args = parser.parse_args(argv)
    asked = args.paths.split(",")
    unknown = set(asked) - set(ALL_PATHS)
    if unknown or not asked:
        parser.error(f"unknown paths: {', '.join(sorted(unknown)) or '(none given)'}")
    if args.rtt_ms < 0:
        parser.error("--rtt-ms must not be negative")
    profile_dir = Path(args.profile) if args.profile else None
    if profile_dir is not None:
        if not Path(sys.executable).with_name("py-spy").exists():
            parser.error("--profile needs py-spy in this environment: pip install py-spy")
        profile_dir.mkdir(parents=True, exist_ok=True)
    options = RunOptions(
        mode="quick" if args.quick else "smoke" if args.smoke else "full",
        paths=tuple(p for p in ALL_PATHS if p in asked),
        rtt_ms=args.rtt_ms,
        pace_ms=args.pace_ms,
        body_bytes=args.body_bytes,
        bridge_options=tuple(args.bridge_set),
        bridge_scripts=tuple(args.bridge_script),
        profile_dir=profile_dir,
    )
    doc = run(options)
    if args.scaleout:
        spec = ScaleoutSpec.smoke() if args.smoke else None
        doc["scaleout"] = measure_scaleout(spec, body_bytes=args.body_bytes)
    if args.scrub:
        doc["scrub"] = measure_scrub(turns=5 if args.smoke else 100)
    Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    if args.markdown:
        machine_line = (
            f"{doc['date']}, {doc['mode']} run, {doc['machine']['cores']} cores "
            f"({doc['machine']['cpu']}), Python {doc['machine']['python']}, "
            f"mitmproxy {doc['machine']['mitmproxy']}, websockets {doc['machine']['websockets']}, "
            f"{doc['settings']['rtt_ms']:g} ms RTT, TLS"
        )
        Path(args.markdown).write_text(
            machine_line + "\n\n" + format_report(doc, markdown=True) + "\n"
        )
    print()
    print(format_report(doc))
    if "scaleout" in doc:
        print()
        print(format_scaleout(doc["scaleout"]))
    if "scrub" in doc:
        print()
        print(format_scrub(doc["scrub"]))
    for note in doc["notes"]:
        print(f"note: {note}")
    problems = check_document(doc)
    print(f"\n{doc['duration_s']} s; figures in {args.json}")
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
