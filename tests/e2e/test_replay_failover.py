"""Replay at failover: a client's connection that reached the dead primary's guest in an
epoch that never committed is answered by the resumed guest at once, not after the
client's next SYN retransmission.

The primary runs 3-second epochs (remus policy). Right after a commit the client opens
a connection: its SYN reaches the primary's guest (whose SYN-ACK output commit holds)
and a copy of it goes to the standby. The primary is killed inside that epoch. The
standby times out, resumes the last committed checkpoint and replays the SYN: the
resumed guest answers at once. Without replay it never saw that SYN and the client
waits for its retransmission (1 s, 3 s, 7 s after the first try: with the 3 s
heartbeat timeout the resume falls between the second and the third): the client's
retries are made exponential and its ARP entry for the guest permanent first
(:func:`classic_client`), or the next retry or ARP probe would come within a second
anyway and blur the difference.
"""

from __future__ import annotations

import subprocess
import threading
import time

import pytest

from kemari_suite.config import KemariConfig
from kemari_suite.errors import KemariError
from kemari_suite.lab.pair import LabPair, PairOptions
from tests.conftest import needs_root

pytestmark = [pytest.mark.e2e, needs_root]

#: The resumed guest answers the replayed SYN well within this after it runs again;
#: the client's own retransmission comes seconds later.
ANSWER_AFTER_RESUME_S = 1.5
#: The primary's epochs (remus policy): long enough to kill inside one.
EPOCH_MS = 3000


class Connect:
    """One counter request from the client namespace, in a thread: when it was sent,
    when (wall clock) and what it was answered."""

    def __init__(self, pair: LabPair) -> None:
        self.pair = pair
        self.sent = 0.0
        self.answered: float | None = None
        self.value: int | None = None
        self.error = ""
        self._thread = threading.Thread(target=self._run, name="replay-client", daemon=True)

    def start(self) -> None:
        self.sent = time.time()
        self._thread.start()

    def _run(self) -> None:
        try:
            self.value = self.pair.read_counter(timeout=30.0)
            self.answered = time.time()
        except KemariError as err:
            self.error = str(err)

    def wait(self, timeout: float) -> None:
        self._thread.join(timeout)


def read_counter(pair: LabPair, timeout: float) -> int:
    """The guest's counter (each answer held for up to an epoch)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return pair.read_counter(timeout=2 * EPOCH_MS / 1000)
        except KemariError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def classic_client(pair: LabPair) -> None:
    """Make the client's SYN retries exponential (1 s, 3 s, 7 s: Linux from 6.5 retries
    the first four a second apart) and its ARP entry for the guest permanent (so a retry
    never waits on ARP probes to the moved guest): then only the replay can get the
    client an answer soon after the resume."""
    ns, ip = pair.lab.ns_client, pair.lab.guest_ip
    linear = "/proc/sys/net/ipv4/tcp_syn_linear_timeouts"
    script = f"if [ -e {linear} ]; then echo 0 > {linear}; fi"
    subprocess.run(["ip", "netns", "exec", ns, "sh", "-c", script], check=True)
    out = subprocess.run(
        ["ip", "-n", ns, "neigh", "show", ip], capture_output=True, text=True, check=True
    ).stdout.split()
    assert "lladdr" in out and "dev" in out, f"no ARP entry for the guest: {out}"
    mac, dev = out[out.index("lladdr") + 1], out[out.index("dev") + 1]
    subprocess.run(
        ["ip", "-n", ns, "neigh", "replace", ip, "lladdr", mac, "dev", dev, "nud", "permanent"],
        check=True,
    )


def forwarded(pair: LabPair) -> int:
    """Copies of guest-bound frames the primary has put on the link so far."""
    return int(pair.status("primary")["io"]["net"]["forward"]["sent_frames"])


def test_a_request_of_the_lost_epoch_is_replayed_into_the_resumed_guest(
    lab_factory, base_config: KemariConfig
) -> None:
    lab = lab_factory()
    # Epochs of EPOCH_MS: after a commit, the next epoch stays open that long, so the
    # kill lands in it without racing a sync point, and the link is idle then.
    opts = PairOptions(
        tapped_net=True, policy="remus", remus_interval_ms=EPOCH_MS, max_interval_ms=EPOCH_MS
    )
    pair = LabPair(lab, base_config, opts)
    try:
        pair.start()
        pair.wait_state("primary", {"protected"}, 180)
        read_counter(pair, 120)
        classic_client(pair)
        pair.settle(epochs=2, timeout=120)
        assert forwarded(pair) > 0, "no inbound copy was forwarded"
        pair.settle(epochs=1, timeout=120)  # returns right after a commit
        before = forwarded(pair)
        client = Connect(pair)
        client.start()
        # The SYN reaches the primary's guest and its copy goes on the link.
        deadline = time.monotonic() + EPOCH_MS / 2000
        while (fwd := forwarded(pair)) <= before:
            assert time.monotonic() < deadline, "the client's SYN did not reach the guest"
            time.sleep(0.005)
        time.sleep(0.05)
        committed = int(pair.status("primary")["last_committed_epoch"])
        pair.kill("primary")
        assert client.answered is None, "answered before the kill: output was not held"
        st = pair.wait_state("secondary", {"active"}, 60)
        rep = st["failover"]
        assert rep["epoch"] == committed, "a sync point ran between the request and the kill"
        client.wait(40)
        assert client.answered is not None, f"the client was never answered: {client.error}"
        assert rep["replayed_frames"] >= 1, (rep, st["replay"], fwd)
        assert rep["replay_dropped"] == 0, rep
        resumed = rep["detected_at"] + rep["failover_ms"] / 1e3
        assert client.answered - resumed < ANSWER_AFTER_RESUME_S, (
            f"answered {client.answered - client.sent:.2f} s after the request, "
            f"{client.answered - resumed:.2f} s after the resume: a retransmission, not the replay"
        )
        # The resumed guest's answer never goes back behind what was committed.
        assert client.value is not None and client.value >= rep["probes"]["counter"]
        assert pair.status("secondary")["replay"]["taken_frames"] >= rep["replayed_frames"]
    finally:
        pair.stop()
