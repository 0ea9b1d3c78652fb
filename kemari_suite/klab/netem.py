"""The replication link's profiles inside the L1s: ``netem`` on each host's eth0.

The L1s' link is a QEMU socket netdev over UDP on the host's loopback: no latency, no
jitter, and a rate set by how fast two TCG machines move frames. The host lab shapes its
veth with ``tbf``; in the kernel lab each L1 shapes its own end with ``netem`` (Debian's
kernel has ``sch_netem``, loaded on demand by ``tc``). Delay and jitter are one way, on
each end, so a round trip sees twice the delay.

=========  ===========  ==============  =============================================
profile    rate         delay / jitter  what it stands for
=========  ===========  ==============  =============================================
1g         1 Gbit/s     50 / 10 us      two hosts on one 1 GbE switch
10g        10 Gbit/s    15 / 3 us       a 10 GbE link, back to back or one switch
wan        100 Mbit/s   5 / 1 ms        a metro link between two rooms or sites
unlimited  (no qdisc)   -               the bare socket netdev
=========  ===========  ==============  =============================================

The rate is a ceiling: emulated NICs on a shared host reach far less than 10 Gbit/s.
Only the delays change what an engine inside sees (a sync point's round trip).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from kemari_suite.errors import ConfigError


@dataclass(frozen=True)
class NetemProfile:
    name: str
    #: tc's rate (e.g. "1gbit"); "" for no qdisc at all.
    rate: str
    delay_us: int
    jitter_us: int


PROFILES: dict[str, NetemProfile] = {
    p.name: p
    for p in (
        NetemProfile("1g", "1gbit", 50, 10),
        NetemProfile("10g", "10gbit", 15, 3),
        NetemProfile("wan", "100mbit", 5000, 1000),
        NetemProfile("unlimited", "", 0, 0),
    )
}


def get_profile(name: str) -> NetemProfile:
    """Raises ConfigError naming the profiles there are."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ConfigError(
            f"no kernel-lab link profile {name!r}: {', '.join(PROFILES)}", key="profile"
        ) from None


def tc_command(profile: NetemProfile, dev: str = "eth0") -> str:
    """The shell command that gives ``dev`` the profile in an L1 (idempotent: replaces
    whatever root qdisc is there; ``unlimited`` removes it)."""
    d = shlex.quote(dev)
    if not profile.rate:
        return f"tc qdisc del dev {d} root 2>/dev/null; true"
    return (
        f"tc qdisc replace dev {d} root netem delay {profile.delay_us}us "
        f"{profile.jitter_us}us distribution normal rate {profile.rate}"
    )


def parse_qdisc(text: str) -> dict[str, str]:
    """The root netem qdisc of ``tc qdisc show dev X`` output: {"delay", "jitter",
    "rate"} as tc prints them; {} when there is no netem qdisc."""
    for line in text.splitlines():
        words = line.split()
        if "netem" not in words or "root" not in words:
            continue
        found: dict[str, str] = {}
        for key in ("delay", "rate"):
            if key in words and words.index(key) + 1 < len(words):
                found[key] = words[words.index(key) + 1]
        if "delay" in words:
            i = words.index("delay") + 2
            if i < len(words) and words[i][:1].isdigit():
                found["jitter"] = words[i]
        return found
    return {}


__all__ = ["PROFILES", "NetemProfile", "get_profile", "parse_qdisc", "tc_command"]
