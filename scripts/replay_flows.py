"""Replay the recorded fixtures of flows/ through the bridge, one line each.

    scripts/replay_flows.py [NAME ...]      # every fixture of flows/fixtures.json without names

For each fixture the replay server serves its recorded upstream sessions,
mitmdump with the bridge runs in front of it with the fixture's accounts and
options (flows/fixtures.json), and the recorded client requests are sent
again. A fixture passes when the client gets what it got when it was
recorded and the upstream sees exactly the recorded handshakes and messages;
otherwise each difference is printed. Exits 1 when any fixture failed, 2 when
a name is not a fixture. A thin shell over `harness.fixture_replay`.
"""

from __future__ import annotations

import argparse
import sys
import time

from harness import fixture_replay


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help="fixture file names in flows/")
    args = parser.parse_args(argv)
    known = fixture_replay.specs()
    names = args.names or sorted(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        print(f"not a fixture in flows/fixtures.json: {', '.join(unknown)}", file=sys.stderr)
        return 2
    failed = 0
    for name in names:
        started = time.monotonic()
        replayed = fixture_replay.replay(fixture_replay.FLOWS / name)
        found = fixture_replay.differences(replayed)
        took = time.monotonic() - started
        requests, sessions = len(replayed.responses), len(replayed.server.served)
        verdict = "ok  " if not found else "FAIL"
        counts = f"{_count(requests, 'request')}, {_count(sessions, 'upstream session')}"
        print(f"{verdict} {name}: {counts}, {took:.1f} s")
        for difference in found:
            print(f"       {difference}")
        failed += bool(found)
        sys.stdout.flush()
    print(f"{len(names) - failed} of {len(names)} fixtures replayed as recorded")
    return 1 if failed else 0


def _count(number: int, word: str) -> str:
    return f"{number} {word}{'' if number == 1 else 's'}"


if __name__ == "__main__":
    sys.exit(main())
