"""A planned switchover on DRBD in the kernel lab: the old primary demotes, the new one
promotes, nothing acknowledged is lost, and the pair protects the VM again.

::

    both     DRBD 8.4 up, l1a Primary, initial sync (ProtectScenario.drbd_up)
    both     the tree, eth1, KVM, the guest, configs; the witness on the host
    l1b      kemari standby                 l1a  kemari protect, records acknowledged
    l1a      `kemari switchover` (its control socket, from a short Python run in l1a:
             the agent's own client, as EngineProcess asks for the status): the final
             sync point, the disk demoted (drbdadm secondary), the lease released, the
             peer asked
    l1b      takes the lease, promotes DRBD (meets a Secondary), resumes the guest, and
             goes on as the primary; l1a's node goes on as its standby
    host     /proc/drbd: l1b Primary, l1a Secondary; the guest answers from l1b with
             every acknowledged record and takes a new one
    l1b      re-protected: `protected` again, DRBD Connected and UpToDate/UpToDate (the
             connection never dropped: DRBD's own bitmap had nothing to resync)
    (back)   optionally the same from l1b to l1a

Before the engine demoted its disk at a switchover, l1b's promotion met a connected
Primary peer, waited (bounded, 60 s) for DRBD to lose it and failed: the switchover was
refused and the VM ran on in l1a.
"""

from __future__ import annotations

import itertools
import json
import shlex
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kemari_suite.config import PathsConfig
from kemari_suite.errors import LabError
from kemari_suite.klab.drbd import proc_drbd, wait_drbd
from kemari_suite.klab.engine import FENCE_PEER_LOG, EngineProcess, role_run_dir
from kemari_suite.klab.pair import L1Pair
from kemari_suite.klab.protectdemo import ACK_LOG, CHECKER, ProtectRun, ProtectScenario
from kemari_suite.klab.share import python_env
from kemari_suite.vm.image import GuestImage

#: Asks an agent's control socket (argv[1]) for a switchover; prints the answer as JSON
#: (or the error, with exit code 1). The engine answers once the peer resumed the VM.
SWITCH_SCRIPT = (
    "import json, sys; from pathlib import Path; "
    "from kemari_suite.service import control; "
    "r = control.request(Path(sys.argv[1]), 'switchover', timeout=float(sys.argv[2])); "
    "print(json.dumps(r, default=str))"
)
#: States of a node that took the VM over at a switchover (it runs as the primary).
PRIMARY_STATES = {"active", "starting", "syncing", "protected", "unprotected", "held"}
#: States of a node standing by (the old primary after a switchover).
STANDBY_STATES = {"waiting", "receiving", "standby"}


@dataclass
class SwitchLeg:
    """One switchover, from ``source`` to ``target`` (L1 names)."""

    source: str
    target: str
    switched: bool = False
    #: /proc/drbd after it: the target Primary, the source Secondary.
    promoted: bool = False
    demoted: bool = False
    #: The engine's figures (its answer, as in its ``switchover`` event).
    pause_ms: float | None = None
    peer_resume_ms: float | None = None
    spans_ms: dict[str, float] = field(default_factory=dict)
    #: The control request's round trip on the host clock (an upper bound of the pause).
    request_ms: float | None = None
    #: Records the guest held when asked from the target's L1, and its next write.
    records_found: int = 0
    wrote_after_switch: bool = False
    #: The target protected again (``protected``), DRBD Connected, UpToDate/UpToDate.
    reprotected: bool = False
    reprotect_s: float | None = None
    drbd: dict[str, str] = field(default_factory=dict)
    #: How many times DRBD left Connected in either L1 (their kernel logs) from the
    #: request until re-protected: 0 when the roles changed over a live connection.
    drbd_conn_lost: int | None = None


@dataclass
class SwitchRun:
    """What :func:`run_drbd_switchover` measured and found (host clock unless named)."""

    accel: str = ""
    protected: bool = False
    #: Records acknowledged to the client in l1a before the switchover (all of them:
    #: read once the switchover answered, when no more can come).
    records_acked: int = 0
    legs: list[SwitchLeg] = field(default_factory=list)
    boot_s: dict[str, float] = field(default_factory=dict)
    steps: dict[str, float] = field(default_factory=dict)
    total_s: float = 0.0

    def _first(self) -> SwitchLeg:
        return self.legs[0] if self.legs else SwitchLeg("l1a", "l1b")

    @property
    def switched(self) -> bool:
        return bool(self.legs) and all(leg.switched for leg in self.legs)

    @property
    def promoted(self) -> bool:
        return bool(self.legs) and all(leg.promoted for leg in self.legs)

    @property
    def demoted(self) -> bool:
        return bool(self.legs) and all(leg.demoted for leg in self.legs)

    @property
    def reprotected(self) -> bool:
        return bool(self.legs) and all(leg.reprotected for leg in self.legs)

    @property
    def records_lost(self) -> int:
        """Acknowledged records the guest no longer had after the first switchover."""
        return max(0, self.records_acked - self._first().records_found)

    @property
    def ok(self) -> bool:
        found = [leg.records_found for leg in self.legs]
        return (
            self.protected
            and self.records_acked > 0
            and self.records_lost == 0
            and self.switched
            and self.promoted
            and self.demoted
            and self.reprotected
            and all(leg.wrote_after_switch for leg in self.legs)
            # Each leg keeps what the one before wrote after it, its new record too.
            and all(b >= a + 1 for a, b in itertools.pairwise(found))
        )

    def as_dict(self) -> dict[str, Any]:
        first = self._first()
        return {
            "switched": self.switched,
            "promoted": self.promoted,
            "demoted": self.demoted,
            "reprotected": self.reprotected,
            "records_acked": self.records_acked,
            "records_lost": self.records_lost,
            "pause_ms": first.pause_ms,
            "spans_ms": first.spans_ms,
            **asdict(self),
            "ok": self.ok,
        }


class SwitchScenario:
    """The steps of :func:`run_drbd_switchover`; the pair already runs. The DRBD, engine
    and records steps are :class:`~kemari_suite.klab.protectdemo.ProtectScenario`'s."""

    def __init__(
        self,
        pair: L1Pair,
        work: Path,
        host_paths: PathsConfig,
        progress: Callable[[str], None] | None = None,
        run: SwitchRun | None = None,
    ) -> None:
        self.pair = pair
        self.run = run if run is not None else SwitchRun()
        self.base = ProtectScenario(pair, work, host_paths, progress, ProtectRun())
        #: Which agent (EngineProcess) runs in which L1: the nodes keep running across
        #: a switchover, changing roles, so the handles follow the L1, not the role.
        self.primary = 0
        self._losses = 0

    def note(self, msg: str) -> None:
        self.base.note(msg)

    def agent(self, index: int) -> EngineProcess:
        return self.base.agents["primary" if index == 0 else "secondary"]

    def setup(self, guest: GuestImage, tree: str, *, accel: str, min_acks: int) -> None:
        """DRBD up, the engines protecting, ``min_acks`` records acknowledged."""
        b = self.base
        b.drbd_up()
        b.prepare(guest, tree, accel=accel, disk_backend="drbd")
        self.run.accel = b.run.accel
        b.protect()
        self.run.protected = True
        b.write_records(min_acks)

    def switchover(self, timeout: float = 300.0) -> SwitchLeg:
        """Ask the primary's node for a switchover; wait for the roles to change."""
        b = self.base
        assert b.spec is not None
        src, dst = self.primary, 1 - self.primary
        host, agent = self.pair[src], self.agent(src)
        leg = SwitchLeg(self.pair[src].spec.host, self.pair[dst].spec.host)
        self.run.legs.append(leg)
        self._losses = self.conn_losses()
        sock = f"{b.spec.agent_dir(agent.role)}/control.sock"
        cmd = (
            f"cd / && env {python_env(b.spec.tree)} python3 -c {shlex.quote(SWITCH_SCRIPT)} "
            f"{shlex.quote(sock)} {timeout:.0f}"
        )
        t0 = time.monotonic()
        r = host.run(cmd, check=False, timeout=timeout + 60)
        leg.request_ms = round((time.monotonic() - t0) * 1e3, 1)
        if r.exit_code != 0:
            raise LabError(
                self.pair.spec.lab_id,
                f"switchover from {leg.source}: rc {r.exit_code}: {r.stderr[-1500:]}",
            )
        answer = json.loads(r.stdout.strip().splitlines()[-1])
        leg.switched = bool(answer.get("switched"))
        leg.pause_ms = answer.get("pause_ms")
        leg.peer_resume_ms = answer.get("peer_resume_ms")
        leg.spans_ms = dict(answer.get("spans_ms") or {})
        b.step(
            f"switchover {leg.source}->{leg.target}",
            f"switched to {leg.target}: pause {leg.pause_ms} ms, spans {leg.spans_ms}",
        )
        self.agent(dst).wait_state(PRIMARY_STATES, timeout, self.note)
        self.agent(src).wait_state(STANDBY_STATES, timeout, self.note)
        self.primary = dst
        new, old = proc_drbd(self.pair[dst]).minors[0], proc_drbd(self.pair[src]).minors[0]
        leg.promoted = new.role == "Primary"
        leg.demoted = old.role == "Secondary"
        self.note(f"/proc/drbd: {leg.target} {new.summary()}; {leg.source} {old.summary()}")
        return leg

    def records_acked(self) -> int:
        """Every record acknowledged in l1a (the writer's log): none come after the
        switchover has answered, the guest no longer runs there."""
        lines = self.pair[0].run(f"tail -n 1 {ACK_LOG} 2>/dev/null || true").stdout.split()
        return int(lines[-1]) + 1 if lines else 0

    def check_guest(self, leg: SwitchLeg, timeout: float = 300.0) -> None:
        """Ask the guest from the new primary's L1: its records, then one more."""
        host = self.pair[self.primary]
        host.run("cat > /run/klab-checker.py", stdin=CHECKER.encode())
        r = host.run(f"python3 /run/klab-checker.py {timeout:.0f}", timeout=timeout + 60)
        answer = json.loads(r.stdout.strip().splitlines()[-1])
        leg.records_found = int(answer["last"]) + 1
        leg.wrote_after_switch = bool(answer["wrote_next"])
        self.base.step(
            f"guest on {leg.target}",
            f"the guest answers from {leg.target}: {leg.records_found} records, "
            f"next write {'acknowledged' if leg.wrote_after_switch else 'NOT acknowledged'}",
        )

    def reprotect(self, leg: SwitchLeg, timeout: float = 900.0) -> None:
        """Wait for the new primary to be protected again, DRBD in sync."""
        t0 = time.monotonic()
        self.agent(self.primary).wait_state({"protected"}, timeout, self.note)
        minor, _ = wait_drbd(
            self.pair[self.primary], 0, lambda m: m.in_sync, "in sync", timeout=300
        )
        leg.reprotect_s = round(time.monotonic() - t0, 2)
        leg.drbd_conn_lost = self.conn_losses() - self._losses
        leg.reprotected = minor.in_sync and minor.role == "Primary"
        leg.drbd = {h.spec.host: proc_drbd(h).minors[0].summary() for h in self.pair.hosts}
        self.base.step(f"reprotect {leg.target}", f"{leg.target} protected again, DRBD {leg.drbd}")

    def conn_losses(self) -> int:
        """DRBD's ``conn( Connected -> ...`` lines in both L1s' kernel logs."""
        cmd = "dmesg | grep -c 'conn( Connected ->' || true"
        return sum(int(h.run(cmd, timeout=60).stdout.split()[-1]) for h in self.pair.hosts)

    def diagnose(self) -> None:
        """Send what explains a failure to ``progress``: each L1's DRBD kernel log and
        fence-peer log, and the events of every agent that ran there (the nodes change
        roles: all of their artifact folders)."""
        b = self.base
        if b.spec is None:
            return
        for i, h in enumerate(self.pair.hosts):
            run_dir = role_run_dir(b.spec.lab_id, "primary" if i == 0 else "secondary")
            cmd = (
                "dmesg | grep -iE 'drbd|blocked|lockup|rcu' | tail -n 80; "
                "echo '--- kernel'; dmesg | tail -n 25; "
                "echo '--- ps'; ps -eo pid,stat,pcpu,etime,args --sort=-pcpu | head -n 15 | "
                "cut -c1-200; "
                f"echo '--- fence-peer'; cat {FENCE_PEER_LOG} 2>/dev/null | tail -n 30; "
                f'for f in {run_dir}/artifacts/*/events.jsonl; do echo "--- $f"; '
                'tail -c 2500 "$f"; done'
            )
            try:
                self.note(f"=== {h.spec.host}\n{h.run(cmd, check=False, timeout=120).stdout}")
            except Exception:  # a report on a failure must not hide the failure
                pass

    def close(self) -> None:
        self.run.steps.update(self.base.run.steps)
        self.base.close()


def run_drbd_switchover(
    pair: L1Pair,
    guest: GuestImage,
    *,
    tree: str,
    work: Path,
    host_paths: PathsConfig,
    accel: str = "auto",
    min_acks: int = 30,
    switch_back: bool = False,
    progress: Callable[[str], None] | None = None,
    run: SwitchRun | None = None,
) -> SwitchRun:
    """Run the scenario on a started pair (built with ``share=tree``, ``lan=True`` and a
    data disk, DRBD's backing device: as ``run_protect_demo`` with ``disk_backend="drbd"``).

    ``switch_back``: once re-protected, switch again from l1b to l1a (and re-protect).
    ``run`` (optional) is filled in as the steps go, so that a caller keeps what was
    measured when a step raises. The agents and the witness are stopped at the end; the
    L1s are the caller's.

    Raises:
        LabError: an agent exited, refused the switchover, or a state or an answer did
            not come in time.
        DrbdError: DRBD not in sync in time.
        AgentError, VMError: an L1 did not answer.
        ConfigError: the suite refused a rendered config.
    """
    t0 = time.monotonic()
    sc = SwitchScenario(pair, work, host_paths, progress, run)
    sc.run.boot_s = {h.spec.host: round(h.boot_s or 0.0, 2) for h in pair.hosts}
    try:
        sc.setup(guest, tree, accel=accel, min_acks=min_acks)
        for _ in range(2 if switch_back else 1):
            leg = sc.switchover()
            if len(sc.run.legs) == 1:
                sc.run.records_acked = sc.records_acked()
            sc.check_guest(leg)
            sc.reprotect(leg)
    except Exception:
        sc.diagnose()
        raise
    finally:
        sc.close()
    sc.run.total_s = round(time.monotonic() - t0, 2)
    return sc.run


__all__ = ["SwitchLeg", "SwitchRun", "SwitchScenario", "run_drbd_switchover"]
