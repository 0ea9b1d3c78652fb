"""What TLS costs the replication link: MAC-only beside TLS 1.3, on the product's Link.

One secondary-side listener (:func:`kemari_suite.protocol.link.serve`) and one primary
(:func:`~kemari_suite.protocol.link.connect`) in this process, over loopback TCP. The
primary sends ``epochs`` times one epoch's pages (``Pages`` with ``epoch_pages``
incompressible pages: the worst case, nothing for compression to take) and waits for
the Ack of each. Loopback has no bandwidth limit, so what differs between the two rows
is the CPU each end spends: the MAC alone, or TLS's AES-GCM on top of it.

- ``epoch_ms``: send one epoch and have its Ack back (in classic mode this is inside the
  guest's pause; in speculative mode the guest runs meanwhile, and the cost shows in the
  protected phases' throughput instead);
- ``throughput_mib_s``: epoch bytes over the whole run's time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from kemari_suite.errors import BenchmarkError, ProtocolError
from kemari_suite.protocol import wire
from kemari_suite.protocol.link import Link, connect, serve

PAGE = 4096
_KEY = os.urandom(32)


@dataclass
class LinkCost:
    """One mode's figures (see the module docstring)."""

    tls: str
    epoch_pages: int
    epochs: int
    epoch_ms_p50: float | None = None
    epoch_ms_p99: float | None = None
    throughput_mib_s: float | None = None
    tls_version: str | None = None


class _Acker:
    """The secondary's side: an Ack for every Pages; ``done`` once the link ended."""

    def __init__(self) -> None:
        self.done = asyncio.Event()

    async def __call__(self, link: Link) -> None:
        try:
            with contextlib.suppress(ConnectionError, ProtocolError):
                while True:
                    msg = await link.recv()
                    if isinstance(msg, wire.Pages):
                        await link.send(wire.Ack(epoch=msg.epoch))
        finally:
            link.close()
            self.done.set()


async def _measure(tls_on: bool, epoch_pages: int, epochs: int) -> LinkCost:
    payload = np.frombuffer(os.urandom(epoch_pages * PAGE), np.uint8)
    acker = _Acker()
    server = await serve("127.0.0.1", 0, key=_KEY, node_id="bench-sec", on_link=acker, tls=tls_on)
    port = server.sockets[0].getsockname()[1]
    cost = LinkCost(tls="on" if tls_on else "off", epoch_pages=epoch_pages, epochs=epochs)
    try:
        link = await connect(
            f"127.0.0.1:{port}", key=_KEY, node_id="bench-pri", timeout=30, tls=tls_on
        )
        cost.tls_version = link.tls_version
        times: list[float] = []
        try:
            t_start = time.perf_counter()
            for epoch in range(epochs):
                t0 = time.perf_counter()
                await link.send(wire.Pages(epoch=epoch, encoded=payload.data))
                ack = await asyncio.wait_for(link.recv(), 60)
                if not isinstance(ack, wire.Ack) or ack.epoch != epoch:
                    raise BenchmarkError("linkcost", f"expected Ack({epoch}), got {ack}")
                times.append((time.perf_counter() - t0) * 1e3)
            total = time.perf_counter() - t_start
        finally:
            link.close()
        # The secondary's side sees the end before this loop ends.
        await asyncio.wait_for(acker.done.wait(), 30)
    finally:
        server.close()
    cost.epoch_ms_p50 = float(np.percentile(times, 50))
    cost.epoch_ms_p99 = float(np.percentile(times, 99))
    cost.throughput_mib_s = epochs * payload.nbytes / (1 << 20) / total
    return cost


def run(epoch_pages: int = 4000, epochs: int = 20) -> list[LinkCost]:
    """The MAC-only row, then the TLS row.

    Raises:
        BenchmarkError: no epoch or page to send, or an epoch not acknowledged as sent.
        KemariError: the link could not be set up.
    """
    if epochs < 1 or epoch_pages < 1:
        raise BenchmarkError("linkcost", f"{epochs} epochs of {epoch_pages} pages: nothing to time")
    return [asyncio.run(_measure(tls_on, epoch_pages, epochs)) for tls_on in (False, True)]


class PhaseFigures(Protocol):
    """What :func:`tls_cost` reads of a protected run (``memsync.Phase`` has it)."""

    pattern: str
    tls: str
    tracker: str
    pipelining: bool
    pause_ms_p50: float | None
    pause_ms_p99: float | None
    throughput_ratio: float | None


def tls_cost(phases: Sequence[PhaseFigures]) -> dict[str, float]:
    """TLS minus MAC-only on the compressible runs: pause p50 and p99 (ms) and the
    throughput ratio against the baseline (negative: throughput TLS took).

    The MAC-only run is set beside the TLS run that differs from it in TLS alone (same
    tracker, same pre-copy), not beside whichever TLS run came last.
    """
    out: dict[str, float] = {}
    off = next((p for p in phases if p.pattern == "compressible" and p.tls == "off"), None)
    if off is None:
        return out
    on = next(
        (
            p
            for p in phases
            if p.pattern == "compressible"
            and p.tls == "on"
            and p.tracker == off.tracker
            and p.pipelining == off.pipelining
        ),
        None,
    )
    if on is None:
        return out
    for name in ("pause_ms_p50", "pause_ms_p99", "throughput_ratio"):
        a, b = getattr(on, name), getattr(off, name)
        if a is not None and b is not None:
            out[f"{name}_delta"] = a - b
    return out


def markdown(
    rows: Sequence[tuple[str, dict[str, float], list[dict[str, Any]], str | None]],
) -> list[str]:
    """The TLS section of the memsync results, from the recorded figures: per profile,
    its :func:`tls_cost`, its link rows (:class:`LinkCost` as dicts) and why they are
    missing, if they are."""
    lines = ["", "TLS 1.3 against the MAC-only link (`replication.tls`), compressible pages:", ""]
    for profile, c, _, _ in rows:
        if not c:
            lines.append(f"- {profile}: not measured (a protected run has no figures)")
            continue
        lines.append(
            f"- {profile}: pause p50 {c.get('pause_ms_p50_delta', 0.0):+.2f} ms, "
            f"p99 {c.get('pause_ms_p99_delta', 0.0):+.2f} ms, throughput vs base "
            f"{c.get('throughput_ratio_delta', 0.0):+.3f}"
        )
    lines += [
        "",
        "The link alone (loopback, one epoch of incompressible pages at a time, sent and "
        "acknowledged; `kemari_suite/bench/linkcost.py`):",
        "",
        "| profile | tls | version | pages per epoch | epochs | epoch ms p50 | epoch ms p99 "
        "| MiB/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for profile, _, link, error in rows:
        if error:
            lines.append(f"| {profile} | - | - | - | - | failed: {error} | | |")
        for c in link:
            lines.append(
                f"| {profile} | {c['tls']} | {c['tls_version'] or 'none'} | {c['epoch_pages']} "
                f"| {c['epochs']} | {c['epoch_ms_p50']:.1f} | {c['epoch_ms_p99']:.1f} "
                f"| {c['throughput_mib_s']:.0f} |"
            )
    return lines


__all__ = ["LinkCost", "PhaseFigures", "markdown", "run", "tls_cost"]
