"""The failover campaign's scenarios beyond killing the primary (issue 13, item 12).

Every trial is one line in ``KEMARI_RECORD`` (:func:`record_trial`), named by its
scenario, so ``benchmarks/summarize_campaign.py`` counts trials, correct and failures
per scenario. A test runs many trials on one running pair (a pair start costs a guest
boot under TCG) and ends with a kill of the primary checked by the client: nothing the
client received is rewound by the resumed guest. The pairs run with output commit (the
guest NIC behind the frame proxy): what the client receives was acknowledged first.

Scenarios (the name is the record's ``point``):

``inject-<kind>-<p2s|s2p>-tls-off``
    One frame tampered with on the replication link by :class:`~.linkproxy.LinkProxy`
    (``forged``, ``corrupted``, ``replayed``, ``reordered``; primary to secondary or
    back). The link runs without TLS so that the relay sees frames. Correct: the
    receiver rejects it for that reason, the link is reset, the secondary still holds
    exactly the last epoch it acknowledged (never the tampered one), the primary
    protects the guest again over a new connection and the guest kept running.
``partition-<phase>-heal``
    The agent held at a fault point of the checkpoint's life (``faults`` action
    ``pause``), the link cut there, the agent let go into the cut, the link healed
    within the heartbeat timeout. Correct: the primary stays protected and commits
    further epochs; the client never sees a value go back.
``partition-<phase>-kill``
    The same cut, then the primary killed before the heartbeat timeout. Correct: the
    secondary resumes, and the client's first value from it is at or after its last
    value from the primary (no rewind).
``witness-restart-paired`` / ``witness-restart-solo``
    The witness killed by PID and started again while the primary is protected, or
    while it runs alone after a cut. Correct: the holder keeps its lease and its
    state (protected, or unprotected: never fenced); the guest keeps serving.
``witness-restart-solo-stale-refused``
    After the solo run and the witness restart, the primary dies: the standby's copy
    is stale and its takeover must be refused (the witness kept that on disk).
``secondary-killed-mid-apply``
    The secondary dies by its own fault point while applying a batch of pages; the
    primary goes on unprotected, a new secondary is started, the guest is protected
    again. Correct: all of that, and no rewind.
``*-final-failover``
    The kill of the primary that ends a test's pair, checked as above.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kemari_suite.config import KemariConfig, dump_toml
from kemari_suite.errors import KemariError
from kemari_suite.lab.addressing import LabLayout
from kemari_suite.lab.pair import REPL_PORT, LabPair, PairOptions
from kemari_suite.protocol import wire
from kemari_suite.protocol.files import write_owner_only
from kemari_suite.service import control
from tests.e2e.campaign import CounterWatcher
from tests.e2e.linkproxy import REJECTION, Direction, Kind, LinkProxy

#: One read of the counter by the client: with output commit an answer waits for an
#: acknowledgement, which takes over a second when the machine is loaded.
READ_TIMEOUT_S = 3.0
#: Where the relay listens, in the primary's namespace, on the primary's address.
RELAY_PORT = REPL_PORT + 10
#: Frame types a tamper aims at, by direction, taken in turn trial after trial: the
#: epoch's own frames one way, acknowledgements and heartbeats the other.
TARGETS: dict[Direction, tuple[tuple[int, ...], ...]] = {
    "p2s": (
        (wire.Pages.TYPE,),
        (wire.EpochEnd.TYPE,),
        # After the first epoch the device state travels as a change to the previous.
        (wire.DeviceState.TYPE, wire.DeviceStateDelta.TYPE),
        (wire.EpochBegin.TYPE,),
        (wire.Heartbeat.TYPE,),
    ),
    "s2p": ((wire.Ack.TYPE,), (wire.Heartbeat.TYPE,)),
}
#: Fault points a partition is cut at, in checkpoint order (see ``faults.POINTS``);
#: ``secondary-apply`` holds the secondary, every other the primary.
PHASES: tuple[str, ...] = (
    "window-stop",
    "window-capture",
    "window-scan",
    "window-stage",
    "stopped",
    "window-cont",
    "window-send",
    "mid-transfer",
    "before-ack",
    "ack-wait",
    "after-ack",
    "secondary-apply",
)


@dataclass
class Trial:
    """One trial's outcome (one record line)."""

    scenario: str
    ok: bool
    detail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    failover_ms: float | None = None


def record_trial(trial: Trial) -> None:
    """Append the trial to ``KEMARI_RECORD`` (if set): O_APPEND keeps lines whole."""
    path = os.environ.get("KEMARI_RECORD")
    if not path:
        return
    line = {
        "point": trial.scenario,
        "ok": trial.ok,
        "hit": True,
        "failover_ms": trial.failover_ms,
        "detail": trial.detail,
        **trial.extra,
    }
    with Path(path).open("a") as f:
        f.write(json.dumps(line, default=str) + "\n")


class TrialLog:
    """The trials of one test: each recorded as it ends; the test asserts on all.

    As a context manager around the pair, it also records a test that ends by an error
    outside any trial (a pair that never got protected, say) as one failed trial of
    ``<family>-aborted``: a campaign never loses a failure from its counts.
    """

    def __init__(self, family: str) -> None:
        self.family = family
        self.trials: list[Trial] = []

    def __enter__(self) -> TrialLog:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: Any
    ) -> None:
        if err is not None:
            detail = f"{type(err).__name__}: {err}"[-500:]
            self.add(Trial(f"{self.family}-aborted", False, detail))

    def add(self, trial: Trial) -> Trial:
        self.trials.append(trial)
        record_trial(trial)
        return trial

    def failures(self) -> list[str]:
        return [f"{t.scenario}: {t.detail}" for t in self.trials if not t.ok]


class TrialFailed(Exception):
    """A check of a trial did not hold (its message says which)."""


def check(cond: bool, what: str) -> None:
    if not cond:
        raise TrialFailed(what)


# --------------------------------------------------------------------------- the pair


def campaign_options(**changes: Any) -> PairOptions:
    """Output commit on (the client sees only acknowledged output), TLS off (the relay
    sees frames)."""
    return PairOptions(tapped_net=True, tls="off", **changes)


@contextlib.contextmanager
def relayed_pair(
    lab: LabLayout, base: KemariConfig, opts: PairOptions
) -> Iterator[tuple[LabPair, LinkProxy]]:
    """A protected pair whose primary reaches the secondary through a :class:`LinkProxy`
    (its ``replication.peer`` rewritten to the relay), the guest's counter answering."""
    pair = LabPair(lab, base, opts)
    path = pair.configs["primary"]
    tree = tomllib.loads(path.read_text())
    tree["replication"]["peer"] = f"{lab.repl_primary_ip}:{RELAY_PORT}"
    write_owner_only(path, dump_toml(tree))
    proxy = LinkProxy(
        lab.ns_primary, (lab.repl_primary_ip, RELAY_PORT), (lab.repl_secondary_ip, REPL_PORT)
    )
    try:
        proxy.start()
        pair.start()
        pair.wait_state("primary", {"protected"}, 240)
        pair.wait_counter(120)
        pair.settle()
        yield pair, proxy
    finally:
        proxy.close()
        pair.stop()


def watcher(pair: LabPair) -> CounterWatcher:
    """The client of the campaign: reads the counter every 50 ms (see CounterWatcher)."""
    return CounterWatcher(pair, timeout=READ_TIMEOUT_S)


def events(pair: LabPair, role: str, name: str) -> list[dict[str, Any]]:
    return [e for e in pair.artifact_records(role, "events.jsonl") if e.get("event") == name]


def wait_for(what: str, fn: Callable[[], Any], timeout: float, every: float = 0.05) -> Any:
    """Poll ``fn`` until it returns something true; that value.

    Raises:
        TrialFailed: not in time.
    """
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(KemariError, OSError):
            value = fn()
            if value:
                return value
        if time.monotonic() > deadline:
            raise TrialFailed(f"{what}: not within {timeout:.0f} s")
        time.sleep(every)


def reprotected(pair: LabPair, proxy: LinkProxy, after: int, timeout: float = 120) -> None:
    """A new connection through the relay, and the primary protected on it."""
    try:
        proxy.wait_connection(after, timeout)
    except TimeoutError as err:
        raise TrialFailed(str(err)) from err
    try:
        pair.wait_state("primary", {"protected"}, timeout)
    except KemariError as err:
        raise TrialFailed(f"not protected again: {err}") from err


def arm(pair: LabPair, role: str, point: str, *, action: str = "kill", target: str = "") -> None:
    """Arm a fault point in a running agent (any action; see ``testing.faults``)."""
    control.request(
        pair.control_path(role), "fault", point=point, count=1, target=target, action=action
    )


# --------------------------------------------------------------------------- frame injection


def inject_once(
    pair: LabPair,
    proxy: LinkProxy,
    watch: CounterWatcher,
    kind: Kind,
    direction: Direction,
    types: tuple[int, ...],
) -> Trial:
    """One tampered frame; see the module docstring for what makes it correct."""
    scenario = f"inject-{kind}-{direction}-tls-off"
    extra: dict[str, Any] = {"kind": kind, "direction": direction}
    receiver = "secondary" if direction == "p2s" else "primary"
    rejected_event = "rejected" if receiver == "secondary" else "secondary-lost"
    conn = proxy.current
    try:
        check(conn is not None, "no live connection through the relay")
        assert conn is not None
        seen = len(events(pair, receiver, rejected_event))
        counter_before = pair.read_counter()
        # Hold the primary's reconnection: the secondary is read before a resync.
        proxy.hold_new()
        tamper = proxy.tamper(kind, direction, types)
        check(tamper.applied.wait(20), f"no {direction} frame of types {types} to tamper with")
        extra.update(frame=tamper.target, seq=tamper.seq, epoch=tamper.epoch)
        check(conn.closed.wait(20), "the link was not reset after the tamper")
        new = wait_for(
            f"the {receiver}'s rejection",
            lambda: events(pair, receiver, rejected_event)[seen:],
            10,
        )
        reason = str(new[0].get("reason", ""))
        extra["rejection"] = reason[:200]
        check(REJECTION[kind] in reason, f"rejected for another reason: {reason!r}")
        sec = pair.status("secondary")
        committed = int(sec["last_committed_epoch"])
        extra.update(committed=committed, acked=proxy.max_ack)
        check(sec["state"] == "standby", f"secondary is {sec['state']}: {sec.get('reason')}")
        check(
            committed == proxy.max_ack,
            f"the secondary holds epoch {committed}, it acknowledged {proxy.max_ack}",
        )
        if direction == "p2s" and tamper.epoch is not None:
            check(committed < tamper.epoch, f"tampered epoch {tamper.epoch} was committed")
        proxy.hold_new(False)
        reprotected(pair, proxy, conn.index)
        check(pair.read_counter() > counter_before, "the guest stopped counting")
        check(watch.rewinds() == 0, "the client saw the counter go back")
    except (TrialFailed, KemariError, OSError) as err:
        proxy.disarm()
        proxy.hold_new(False)
        # The next trial starts from a protected pair, or its failure is its own.
        if conn is None or conn.closed.is_set():
            with contextlib.suppress(TrialFailed):
                reprotected(pair, proxy, conn.index if conn is not None else -1, timeout=60)
        return Trial(scenario, False, str(err), extra)
    return Trial(scenario, True, "", extra)


# --------------------------------------------------------------------------- partitions


def _pause_at(pair: LabPair, phase: str) -> tuple[Path, str]:
    """Hold the agent at ``phase``; returns the flag file (remove it to go on)."""
    who = "secondary" if phase == "secondary-apply" else "primary"
    flag = pair.root / f"pause-{phase}"
    with contextlib.suppress(FileNotFoundError):
        flag.unlink()
    arm(pair, who, phase, action="pause", target=str(flag))
    wait_for(f"{who} at {phase}", flag.exists, 30, every=0.002)
    return flag, who


def partition_heal_once(
    pair: LabPair, proxy: LinkProxy, watch: CounterWatcher, phase: str, hold_s: float = 1.0
) -> Trial:
    """Cut at ``phase`` for ``hold_s`` (below the heartbeat timeout), then heal."""
    scenario = f"partition-{phase}-heal"
    try:
        start = int(pair.status("primary")["last_committed_epoch"])
        flag, _ = _pause_at(pair, phase)
        proxy.partition()
        flag.unlink()
        time.sleep(hold_s)
        proxy.heal()
        pair.settle(epochs=2, timeout=30)
        st = pair.status("primary")
        check(st["state"] == "protected", f"primary is {st['state']}: {st.get('reason')}")
        check(int(st["last_committed_epoch"]) > start, "no epoch committed after the heal")
        check(pair.status("secondary")["state"] == "standby", "the secondary left standby")
        check(watch.rewinds() == 0, "the client saw the counter go back")
    except (TrialFailed, KemariError, OSError) as err:
        proxy.heal()
        return Trial(scenario, False, str(err))
    return Trial(scenario, True)


def kill_primary_checked(
    pair: LabPair,
    watch: CounterWatcher,
    scenario: str,
    *,
    before_kill: Callable[[], None] | None = None,
    timeout_ms: int = 3000,
) -> Trial:
    """Kill the primary (after ``before_kill``), and check the resumed guest by the
    client: its first value after is at or after its last value before."""
    extra: dict[str, Any] = {}
    try:
        # The check needs a value the client received just before the kill.
        check(watch.wait_fresh(30) is not None, "the client cannot read the counter")
        if before_kill is not None:
            before_kill()
        dead_at = time.monotonic()
        pair.kill("primary")
        st = pair.wait_state("secondary", {"active"}, timeout_ms / 1000 + 60)
        active_at = time.monotonic()
        rep = st.get("failover") or {}
        pair.wait_counter(60)
        wait_for("the client reading the resumed guest", lambda: watch.first_after(active_at), 15)
        time.sleep(0.5)
        last, first = watch.last_before(dead_at), watch.first_after(active_at)
        extra.update(
            epoch=rep.get("epoch"),
            client_last_before=last,
            client_first_after=first,
            client_rewinds=watch.rewinds(),
        )
        check(last is not None, "the client never read the counter before the kill")
        assert last is not None and first is not None
        check(first >= last, f"rewound: the client saw {last}, then {first}")
        check(watch.rewinds() == 0, "the client saw the counter go back")
        return Trial(scenario, True, "", extra, rep.get("failover_ms"))
    except (TrialFailed, KemariError, OSError) as err:
        return Trial(scenario, False, str(err), extra)


def partition_kill(pair: LabPair, proxy: LinkProxy, watch: CounterWatcher, phase: str) -> Trial:
    """Cut at ``phase``, let the agent on into the cut, kill the primary before the
    heartbeat timeout; the secondary resumes the last committed checkpoint."""

    def cut() -> None:
        flag, _ = _pause_at(pair, phase)
        proxy.partition()
        flag.unlink()
        time.sleep(random.uniform(0.05, 1.0))

    return kill_primary_checked(pair, watch, f"partition-{phase}-kill", before_kill=cut)


# --------------------------------------------------------------------------- witness


def restart_witness(pair: LabPair) -> None:
    """SIGKILL the witness by its PID and start it again (same state file)."""
    proc = pair.procs["witness"]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    pair.start_witness()


def witness_restart_once(
    pair: LabPair, watch: CounterWatcher, state: str, scenario: str, down_s: float = 0.5
) -> Trial:
    """Restart the witness; the primary must stay ``state`` (its lease kept) for two
    lease periods after, the guest serving."""
    try:
        before = pair.read_counter()
        proc = pair.procs["witness"]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        time.sleep(down_s)
        pair.start_witness()
        # Two heartbeat timeouts: every lease the restarted witness gave out has run
        # out once, and been renewed.
        deadline = time.monotonic() + 2 * pair.opts.heartbeat_timeout_ms / 1000 + 1
        while time.monotonic() < deadline:
            check(pair.alive("witness"), f"the witness died:\n{pair.output('witness')[-800:]}")
            st = pair.status("primary")
            check(st["state"] == state, f"primary is {st['state']}: {st.get('reason')}")
            time.sleep(0.2)
        check(pair.read_counter() > before, "the guest stopped counting")
        check(pair.status("secondary")["state"] == "standby", "the secondary left standby")
        check(watch.rewinds() == 0, "the client saw the counter go back")
    except (TrialFailed, KemariError, OSError) as err:
        return Trial(scenario, False, str(err))
    return Trial(scenario, True)


# --------------------------------------------------------------------------- the secondary


def secondary_killed_mid_apply(pair: LabPair, proxy: LinkProxy, watch: CounterWatcher) -> Trial:
    """Kill the secondary at its apply fault point; the primary goes on unprotected; a
    new secondary is started and the guest is protected again."""
    scenario = "secondary-killed-mid-apply"
    try:
        conn = proxy.current
        check(conn is not None, "no live connection through the relay")
        assert conn is not None
        before = pair.read_counter()
        arm(pair, "secondary", "secondary-apply")
        wait_for("the secondary to die at secondary-apply", lambda: not pair.alive("secondary"), 30)
        check("KEMARI-FAULT-HIT secondary-apply" in pair.output("secondary"), "no fault hit")
        # Its QEMU, if any (a standby runs none until a failover or a trial restore).
        pair.kill("secondary")
        st = pair.wait_state("primary", {"unprotected"}, 30)
        check("witness" in st.get("reason", ""), f"unprotected for {st.get('reason')!r}")
        check(pair.read_counter() > before, "the guest stopped counting")
        pair.start_secondary()
        pair.wait_control("secondary", 60)
        reprotected(pair, proxy, conn.index)
        pair.settle(epochs=2, timeout=60)
        check(watch.rewinds() == 0, "the client saw the counter go back")
    except (TrialFailed, KemariError, OSError) as err:
        return Trial(scenario, False, str(err))
    return Trial(scenario, True)


__all__ = [
    "PHASES",
    "TARGETS",
    "Trial",
    "TrialLog",
    "campaign_options",
    "inject_once",
    "kill_primary_checked",
    "partition_heal_once",
    "partition_kill",
    "record_trial",
    "relayed_pair",
    "restart_witness",
    "secondary_killed_mid_apply",
    "witness_restart_once",
]
