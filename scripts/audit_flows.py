"""Audit upstream WebSocket handshakes in flow files against the handshake header policy.

    scripts/audit_flows.py flows/*.mitm

Prints one `file: flow id, url: violation` line per finding, then a summary.
Exit status: 1 when it finds any, 0 when all are clean, 2 when a file cannot be
read. A thin shell over `responses_ws_bridge.recording.audit`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from responses_ws_bridge.recording.audit import audit_files


def main(argv: Sequence[str] | None = None) -> int:
    paths = list(sys.argv[1:] if argv is None else argv)
    if not paths or any(p in ("-h", "--help") for p in paths):
        print(__doc__.strip().split("\n\n")[1].strip())
        return 0 if paths else 2
    report = audit_files(paths)
    for finding in report.findings:
        print(finding)
    for problem in report.unreadable:
        print(f"error: {problem}", file=sys.stderr)
    print(report.summary())
    return report.exit_status


if __name__ == "__main__":
    sys.exit(main())
