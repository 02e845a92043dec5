"""When the delay relay delivers a chunk: half an RTT each way, after the modelled TCP handshake."""

from __future__ import annotations

import pytest
from harness.delay_relay import due_at, parse_route


@pytest.mark.parametrize(
    ("arrival", "opened", "rtt", "from_client", "due"),
    [
        # The client's first bytes wait for the handshake (one RTT), then half an RTT.
        (10.0, 10.0, 0.04, True, 10.06),
        (10.01, 10.0, 0.04, True, 10.06),
        # After the handshake, every chunk takes half an RTT, independently of the others.
        (10.5, 10.0, 0.04, True, 10.52),
        (10.5001, 10.0, 0.04, True, 10.5201),
        # The server's bytes never wait for the handshake (it is over by then).
        (10.0, 10.0, 0.04, False, 10.02),
        (12.0, 10.0, 0.04, False, 12.02),
        # No RTT: delivered at once.
        (10.0, 10.0, 0.0, True, 10.0),
        (10.0, 10.0, 0.0, False, 10.0),
    ],
)
def test_due_at(arrival: float, opened: float, rtt: float, from_client: bool, due: float) -> None:
    assert due_at(arrival, opened, rtt, from_client=from_client) == pytest.approx(due)


def test_chunks_in_flight_overlap_instead_of_queueing() -> None:
    # Ten chunks 1 ms apart on a 40 ms link arrive 1 ms apart, 20 ms later each.
    dues = [due_at(1.0 + i / 1000, 0.0, 0.04, from_client=False) for i in range(10)]
    assert dues == pytest.approx([1.02 + i / 1000 for i in range(10)])
    assert dues == sorted(dues)


def test_parse_route() -> None:
    assert parse_route("9000:8000") == (9000, 8000)
    with pytest.raises(Exception, match="LISTEN_PORT:TARGET_PORT"):
        parse_route("9000")
