"""Which mitmproxy the bridge runs in, and a one-line refusal for any other.

The bridge streams its answers from inside mitmproxy's HTTP layer
(`addons.flow_streaming`), which relies on internals mitmproxy does not
promise to keep. Every 12.x release has them (`make test-mitmproxy-range`
runs the end-to-end answer tests on the lowest and the highest); another
major version is refused rather than guessed at. This module imports nothing
of mitmproxy but its version, so that `addon/bridge.py` can ask it first.
"""

from __future__ import annotations

import re

# Keep in step with the `mitmproxy` range in pyproject.toml.
LOWEST = (12, 0)
BELOW = (13, 0)
SUPPORTED = "mitmproxy>=12.0,<13"


def version_problem(version: str) -> str | None:
    """Why the bridge does not run in this mitmproxy version, or None when it does."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        return f"cannot tell which mitmproxy this is ({version!r}); the bridge needs {SUPPORTED}"
    found = (int(match[1]), int(match[2]))
    if LOWEST <= found < BELOW:
        return None
    return f"the bridge needs {SUPPORTED}, this is mitmproxy {version}"


def startup_problem() -> str | None:
    """Why the bridge cannot load into the installed mitmproxy, or None.

    The version first (an unsupported mitmproxy may fail to import the bridge
    at all), then the internals `flow_streaming` uses.
    """
    from mitmproxy import version

    problem = version_problem(version.VERSION)
    if problem is not None:
        return problem
    try:
        from responses_ws_bridge.addons import flow_streaming
    except ImportError as exc:
        if exc.name is not None and not exc.name.startswith("mitmproxy"):
            # Not mitmproxy's lack: a dependency of the bridge is not installed here.
            return (
                f"the bridge cannot import {exc.name} ({exc}); install the bridge with its "
                "dependencies into the Python mitmproxy runs in (`make`, or pip install .)"
            )
        return f"mitmproxy {version.VERSION} lacks what the bridge imports ({exc}); {SUPPORTED}"
    return flow_streaming.internals_problem()
