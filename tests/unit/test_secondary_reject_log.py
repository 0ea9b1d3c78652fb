"""The secondary's account of refused connections: a bad Hello (wrong key, a relay, a
TLS mismatch) is the operator's business, but a flood of them must not flood the log.
The first one is an error line; then at most one summary line per interval, with the
count of those left out."""

from __future__ import annotations

import asyncio
import logging

import pytest

from kemari_suite.errors import AuthError, ConnectError
from kemari_suite.replica.rejects import RejectLog, RejectLogger

BAD_HELLO = AuthError("handshake failed: the peer does not hold our key")
TLS = ConnectError("10.0.0.9:1", "the primary has replication.tls off, this host on")
SCAN = ConnectError("10.0.0.9:2", "closed the connection before its link preamble")


def _levels(lines: list[tuple[int, str]]) -> list[int]:
    return [level for level, _ in lines]


def test_first_bad_hello_is_an_error_the_rest_a_summary_per_interval() -> None:
    rl = RejectLog(interval_s=60.0)
    first = rl.refused(0.0, "10.0.0.9:1", BAD_HELLO)
    assert _levels(first) == [logging.ERROR]
    assert "10.0.0.9:1" in first[0][1] and "does not hold our key" in first[0][1]
    # A flood within the interval: nothing above debug.
    for i in range(1, 500):
        lines = rl.refused(i * 0.1, f"10.0.0.9:{i}", BAD_HELLO)
        assert _levels(lines) == [logging.DEBUG]
    assert rl.suppressed == 499
    # The interval is over: one summary line with the count, then counting again.
    lines = rl.refused(61.0, "10.0.0.8:7", TLS)
    assert _levels(lines) == [logging.ERROR, logging.DEBUG]
    assert "499" in lines[0][1] and "60 s" in lines[0][1]
    assert "10.0.0.9:499" in lines[0][1]  # the latest one left out, as an example
    assert rl.suppressed == 1
    # The timer's turn: the one left out since, summarized once, then quiet.
    tick = rl.tick(121.5)
    assert tick is not None and tick[0] == logging.ERROR and " 1 more" in tick[1]
    assert rl.tick(121.6) is None
    assert rl.tick(182.0) is None  # a quiet interval ends the episode
    # A bad Hello after a quiet interval is a first one again.
    assert _levels(rl.refused(300.0, "10.0.0.9:1", BAD_HELLO)) == [logging.ERROR]


def test_scans_and_timeouts_stay_at_debug_and_are_not_counted() -> None:
    rl = RejectLog(interval_s=60.0)
    for i in range(100):
        assert _levels(rl.refused(float(i), "p", SCAN)) == [logging.DEBUG]
    assert rl.suppressed == 0
    assert _levels(rl.refused(200.0, "p", BAD_HELLO)) == [logging.ERROR]


def test_tick_before_the_interval_ends_says_nothing() -> None:
    rl = RejectLog(interval_s=10.0)
    rl.refused(0.0, "p", BAD_HELLO)
    rl.refused(1.0, "p", BAD_HELLO)
    assert rl.tick(5.0) is None
    assert rl.next_tick == 10.0
    assert rl.tick(10.0) is not None


def test_a_bad_interval_is_refused() -> None:
    with pytest.raises(ValueError):
        RejectLog(interval_s=0.0)


def test_the_logger_writes_one_error_then_a_timed_summary(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("kemari_suite.replica.secondary")

    async def main() -> None:
        rejects = RejectLogger(logger, interval_s=0.2)
        try:
            for i in range(50):
                rejects(f"10.0.0.9:{i}", BAD_HELLO)
            # No further reject: the summary comes from the timer.
            await asyncio.sleep(0.5)
        finally:
            rejects.close()

    with caplog.at_level(logging.DEBUG, logger="kemari_suite.replica.secondary"):
        asyncio.run(main())
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 2, errors
    assert "10.0.0.9:0" in errors[0]
    assert "49 more" in errors[1]
    debug = [r for r in caplog.records if r.levelno == logging.DEBUG]
    assert len(debug) == 49  # every one left out is still there at debug level


def test_the_logger_works_outside_an_event_loop(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("kemari_suite.replica.secondary")
    rejects = RejectLogger(logger, interval_s=60.0)
    with caplog.at_level(logging.ERROR, logger="kemari_suite.replica.secondary"):
        rejects("p:1", BAD_HELLO)
        rejects("p:2", BAD_HELLO)
    rejects.close()
    assert len(caplog.records) == 1
