"""Account health records: the pool's rules applied to what the shared store holds.

Pure functions, mirrored by the shared store's scripts, so every store gives
the same answers: a cooldown is never shortened, a success ends cooldown and
strikes but not a disablement, and the record reads as the pool's `Health`.
"""

from __future__ import annotations

from dataclasses import replace

from responses_ws_bridge.core.account_pool import HEALTHY, Cooling, Disabled, Health
from responses_ws_bridge.state.store import AccountHealthRecord


def cooled(record: AccountHealthRecord, until: float, reason: str) -> AccountHealthRecord:
    if record.cooldown_until is not None and record.cooldown_until >= until:
        return record
    return replace(record, cooldown_until=until, cooldown_reason=reason)


def cleared(record: AccountHealthRecord) -> AccountHealthRecord:
    return replace(record, cooldown_until=None, cooldown_reason="", strikes=0)


def health_of(record: AccountHealthRecord, now: float) -> Health:
    """The record as the pool's health at `now` (an expired cooldown reads as healthy)."""
    if record.disabled is not None:
        return Disabled(record.disabled)
    if record.cooldown_until is not None and now < record.cooldown_until:
        return Cooling(record.cooldown_until, record.cooldown_reason)
    return HEALTHY
