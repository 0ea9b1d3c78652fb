"""Replication-link profiles: what the veth between the two lab hosts pretends to be.

Each profile is applied with a ``tbf`` qdisc on *both* ends of the replication veth
(``netem`` is not available on the test machines, and a qdisc only shapes what leaves
its own interface, so one end alone would leave the other direction at memory speed).

Choice of ``tbf`` parameters (measured with one TCP stream between two namespaces on
the 2-CPU test machine, iproute2 6.1, kernel 6.x with high-resolution timers):

``1g``  rate 1 Gbit/s, MTU 1500, burst 64 KiB, latency 5 ms
    The kernel's tbf sleeps on an hrtimer, so the old "burst >= rate / HZ" rule does
    not apply: bursts from 32 KiB to 512 KiB all gave 0.94-0.96 Gbit/s. A small
    bucket keeps short messages (a sync point's device state is ~320 KB) paced like
    a real 1GbE wire instead of leaving at memory speed; 64 KiB is about 0.5 ms at
    line rate and holds any GSO super-packet tbf does not segment. ``latency 5 ms``
    bounds the queue to rate * 5 ms + burst (~690 KB), about what a switch port
    buffers, so a saturating sender sees a few ms of queueing, not bufferbloat.
``10g`` rate 10 Gbit/s, MTU 9000 (jumbo frames, veth allows up to 65535), burst 1 MiB,
    latency 2 ms
    128 KiB gave 8.9 Gbit/s and 256 KiB 9.3 Gbit/s; 1 MiB (~0.8 ms at line rate)
    reached 9.9 Gbit/s. 2 ms bounds the queue to ~3.5 MB.
``unlimited`` no qdisc, MTU 9000
    The veth as fast as the machine moves bytes (about 15 Gbit/s here for one
    Python stream), for tests that care about correctness, not timing.

tbf counts layer-2 bytes without preamble and inter-frame gap, so TCP goodput on the
``1g`` profile comes out slightly above a real 1GbE link (0.95 versus ~0.94 Gbit/s).
"""

from __future__ import annotations

from dataclasses import dataclass

from kemari_suite.errors import LabError


@dataclass(frozen=True)
class LinkProfile:
    """How the replication link is shaped.

    ``rate_bit`` is None for an unshaped link; then ``burst_bytes`` and ``latency_ms``
    are 0 and no qdisc is installed.
    """

    name: str
    rate_bit: int | None
    mtu: int
    burst_bytes: int
    latency_ms: float

    @property
    def shaped(self) -> bool:
        """True when a tbf qdisc is installed for this profile."""
        return self.rate_bit is not None

    def tbf_args(self) -> list[str]:
        """The arguments after ``tc qdisc add dev X root`` (empty for an unshaped link)."""
        if self.rate_bit is None:
            return []
        return [
            "tbf",
            "rate",
            f"{self.rate_bit}bit",
            "burst",
            str(self.burst_bytes),
            "latency",
            f"{self.latency_ms:g}ms",
        ]


PROFILES: dict[str, LinkProfile] = {
    "1g": LinkProfile(
        name="1g", rate_bit=1_000_000_000, mtu=1500, burst_bytes=64 * 1024, latency_ms=5.0
    ),
    "10g": LinkProfile(
        name="10g", rate_bit=10_000_000_000, mtu=9000, burst_bytes=1024 * 1024, latency_ms=2.0
    ),
    "unlimited": LinkProfile(
        name="unlimited", rate_bit=None, mtu=9000, burst_bytes=0, latency_ms=0
    ),
}


def get_profile(name: str, *, lab_id: str = "-") -> LinkProfile:
    """Return the profile called ``name``.

    Raises:
        LabError: ``name`` is not a known profile.
    """
    try:
        return PROFILES[name]
    except KeyError:
        known = ", ".join(PROFILES)
        raise LabError(lab_id, f"unknown link profile {name!r} (known: {known})") from None


def profile_for_rate(rate_bit: int | None) -> LinkProfile | None:
    """The profile whose tbf rate is ``rate_bit`` (None: the unshaped profile), if any."""
    for profile in PROFILES.values():
        if profile.rate_bit == rate_bit:
            return profile
    return None
