"""Test-only mitmproxy script: switches the original hard-affinity bug back on.

Loaded after addon/bridge.py, it makes the bridge exclude the hard-affinity
owner after a close 1011 and retry elsewhere, as the buggy bridge did. The
replay of flows/hard-1011-retry-on-owner.mitm must then report a deviation.
"""

from collections.abc import Callable
from typing import Any

import responses_ws_bridge.core.attempt_plan as plan
from responses_ws_bridge.core.affinity import AffinityKind
from responses_ws_bridge.core.failures import UpstreamClosed
from responses_ws_bridge.core.retry_policy import Decision, RetryOther, RetrySame

_decide: Callable[..., Decision] = vars(plan)["decide"]


def _buggy_decide(**kwargs: Any) -> Decision:
    decision = _decide(**kwargs)
    failure = kwargs["failure"]
    if (
        kwargs["affinity"] is AffinityKind.HARD
        and isinstance(failure, UpstreamClosed)
        and failure.code == 1011
        and isinstance(decision, RetrySame)
    ):
        return RetryOther(kwargs["account_id"])
    return decision


vars(plan)["decide"] = _buggy_decide
