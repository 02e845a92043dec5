"""The scrubbing row of `make bench` runs and reports every pool size."""

from __future__ import annotations

from harness.bench_scrub import POOLS, format_scrub, measure_scrub


def test_the_scrub_row_measures_every_pool() -> None:
    doc = measure_scrub(deltas=5, turns=2, repeat=1)
    assert [row["accounts"] for row in doc["rows"]] == list(POOLS)
    assert all(row["relay_ns_per_frame"] > 0 for row in doc["rows"])
    assert "relay ns/frame" in format_scrub(doc)
