"""A real DRBD split brain on two L1 hosts, seen by the engine's DRBD backend.

::

    both   modprobe drbd; resource file (the project's renderer, 8.4); create-md; up
    l1a    drbdadm primary --force: initial sync to l1b
    both   drbdadm disconnect                      the partition
    l1b    drbdadm primary (--force when 8.4 refuses: its disk is Outdated)
    l1a    writes block A at BLOCK_OFFSET; l1b writes block B there: both sides wrote
    l1a    drbdadm secondary (so that DRBD itself would let it promote again)
    l1a    python3 from the shared tree: DrbdBackend.for_resource(...).attach()
           (follows events2; adjust reconnects l1a), with an Alerter whose hook logs
    l1b    drbdadm connect                         DRBD detects the split brain:
                                                   after-sb-* disconnect -> StandAlone
    l1a    the backend: split_brain recorded, status() not up to date, promote() refused
           (DRBD is never asked), the alert sent through the hook; a second backend (a
           failover's) refuses too, from the marker file; close() stops drbdsetup
    both   /proc/drbd StandAlone; the backing disks still hold A (l1a) and B (l1b):
           nothing was discarded
    both   drbdadm down; stop

The pair must be built with ``share=tree`` (the suite's checkout, mounted read-only at
the same path inside each L1, see share.py). Nothing here prints: ``progress`` gets one
line per step. Each L1's ``drbdsetup events2`` is recorded (:attr:`SplitBrainRun.events`).
"""

from __future__ import annotations

import hashlib
import json
import shlex
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from kemari_suite.errors import DrbdError
from kemari_suite.klab.drbd import wait_drbd
from kemari_suite.klab.drbdfailover import RESOURCE, PowerLossScenario
from kemari_suite.klab.host import L1Host
from kemari_suite.klab.pair import L1Pair
from kemari_suite.klab.share import mount_command, python_env

#: Where each side writes its own block (inside the 32+ MiB data disk, before DRBD's
#: internal meta-data at its end; DRBD maps the device 1:1 onto the backing disk).
BLOCK_OFFSET = 1 << 20
BLOCK_SIZE = 4096
BACKING = "/dev/vda"
DEVICE = "/dev/drbd0"
STATE_DIR = "/run/kemari/drbd"
#: Files of the backend's run inside l1a.
SCRIPT = "/tmp/kemari-splitbrain.py"
ATTACHED = "/tmp/kemari-splitbrain.attached"
RESULT = "/tmp/kemari-splitbrain.json"
LOG = "/tmp/kemari-splitbrain.log"
HOOK = "/tmp/kemari-splitbrain-hook"
HOOK_OUT = "/tmp/kemari-splitbrain-alerts"
EVENTS = "/tmp/kemari-splitbrain-events2"

#: The hook the backend's Alerter runs: one alert (JSON) a line.
HOOK_SCRIPT = f"#!/bin/sh\ncat >> {HOOK_OUT}\necho >> {HOOK_OUT}\n"

#: Runs in l1a with the suite's tree: the engine's backend, as the engine opens it.
BACKEND_SCRIPT = f"""
import json, sys, threading, time, traceback
from pathlib import Path
from kemari_suite.alerts import Alerter
from kemari_suite.config import AlertConfig
from kemari_suite.disk.drbd import DrbdBackend
from kemari_suite.disk.drbdadm import detect_dialect
from kemari_suite.disk.drbdwatch import alert_on_split_brain
from kemari_suite.errors import DiskError

out = {{}}
try:
    dialect = detect_dialect()
    alerter = Alerter(AlertConfig(hook={HOOK!r}), vm="r0-demo", node="l1a",
                      syslog_path="/nonexistent")
    backend = DrbdBackend.for_resource({RESOURCE!r}, {DEVICE!r},
        config_path="/etc/drbd.d/{RESOURCE}.res", dialect=dialect, state_dir={STATE_DIR!r})
    alert_on_split_brain(backend, alerter)
    t0 = time.time()
    backend.attach()
    out["dialect"] = dialect
    out["attach_s"] = round(time.time() - t0, 2)
    Path({ATTACHED!r}).write_text("attached\\n")
    deadline = time.monotonic() + float(sys.argv[1])
    while time.monotonic() < deadline:
        sb = backend.split_brain
        if sb is not None and sb.unresolved:
            break
        time.sleep(0.1)
    sb = backend.split_brain
    out["split_brain"] = None if sb is None else sb.to_dict()
    out["seen_at"] = time.time()
    st = backend.status()
    out["status"] = {{"up_to_date": st.up_to_date, "connected": st.connected,
                     "role": st.role.value, "split_brain": st.detail.get("split_brain")}}
    try:
        backend.promote()
        out["refused"] = None
    except DiskError as err:
        out["refused"] = str(err)
        out["refused_type"] = type(err).__name__
    later = DrbdBackend.for_resource({RESOURCE!r}, {DEVICE!r},
        config_path="/etc/drbd.d/{RESOURCE}.res", dialect=dialect, state_dir={STATE_DIR!r},
        watch_events=False)
    try:
        later.promote()
        out["later_refused"] = None
    except DiskError as err:
        out["later_refused"] = str(err)
    backend.close()
    later.close()
    time.sleep(0.5)
    out["threads_after_close"] = [t.name for t in threading.enumerate()
                                  if t.name.startswith("drbd-events2")]
    alerter.close(timeout=30.0)
    out["alerts"] = alerter.history
except BaseException:
    out["error"] = traceback.format_exc()
Path({RESULT!r} + ".tmp").write_text(json.dumps(out))
Path({RESULT!r} + ".tmp").rename({RESULT!r})
"""


@dataclass(frozen=True)
class SplitBrainRun:
    """What one run found (seconds on the host's clock)."""

    module_version: str
    #: ``drbdadm primary`` on the partitioned l1b needed ``--force`` (its disk Outdated).
    forced: bool
    #: From l1b's ``drbdadm connect`` until the backend's result was read (an upper
    #: bound of the detection's delay, which includes the L1's Python).
    detected_within_s: float
    #: The backend's report (split_brain, status, refused, later_refused, alerts, ...).
    backend: dict[str, Any]
    #: /proc/drbd of (l1a, l1b) at the end.
    states: tuple[str, str]
    #: sha256 of each side's own block and of what each backing disk holds there.
    written: tuple[str, str]
    found: tuple[str, str]
    #: Each L1's ``drbdsetup events2 all --statistics --timestamps`` during the run.
    events: dict[str, str] = field(default_factory=dict)
    steps: dict[str, float] = field(default_factory=dict)

    @property
    def nothing_discarded(self) -> bool:
        return self.written == self.found and self.written[0] != self.written[1]

    @property
    def ok(self) -> bool:
        b = self.backend
        sb = b.get("split_brain") or {}
        status = b.get("status") or {}
        refused = b.get("refused") or ""
        return (
            "error" not in b
            and bool(sb.get("unresolved"))
            and status.get("up_to_date") is False
            and status.get("split_brain") is not None
            and "split brain" in refused
            and "DRBD split brain" in refused
            and "split brain" in (b.get("later_refused") or "")
            and [a.get("kind") for a in b.get("alerts", [])] == ["split-brain"]
            and not b.get("threads_after_close")
            and all("cs:StandAlone" in s for s in self.states)
            and self.nothing_discarded
        )

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "nothing_discarded": self.nothing_discarded, "ok": self.ok}


def _block_sha(host: L1Host, path: str) -> str:
    skip = BLOCK_OFFSET // BLOCK_SIZE
    out = host.run(
        f"dd if={path} bs={BLOCK_SIZE} skip={skip} count=1 iflag=direct status=none | sha256sum"
    ).stdout
    return out.split()[0]


def _background(command: str) -> str:
    """A shell command that starts ``command`` detached from the agent's command (its
    own session, no pipe to the agent left open)."""
    return f"setsid sh -c {shlex.quote(command)} </dev/null >/dev/null 2>&1 &"


class SplitBrainScenario:
    """The steps of :func:`run_split_brain`, one method each, on a started pair."""

    def __init__(
        self, pair: L1Pair, tree: str, progress: Callable[[str], None] | None = None
    ) -> None:
        self.pair, self.tree = pair, tree
        self.a, self.b = pair[0], pair[1]
        self.drbd = PowerLossScenario(pair, progress)
        self.steps = self.drbd.steps
        self.step = self.drbd.step

    def partition_and_write(self) -> tuple[bool, tuple[str, str]]:
        """Disconnect both, make l1b Primary too, each side writes its own block at the
        same place, l1a goes Secondary: (``--force`` needed, sha256 of A and of B)."""
        a, b = self.a, self.b
        res_a, res_b = self.drbd.res[a.spec.host], self.drbd.res[b.spec.host]
        t0 = time.monotonic()
        res_a.disconnect()
        res_b.disconnect()
        wait_drbd(b, 0, lambda m: m.cs == "StandAlone", "StandAlone", timeout=120)
        forced = False
        try:
            res_b.primary()
        except DrbdError:
            # 8.4: the disconnected Secondary's disk is Outdated ("Need access to
            # UpToDate data"); the operator who splits the brain forces it.
            res_b.primary(force=True)
            forced = True
        shas = []
        for host, text in ((a, "A from l1a"), (b, "B from l1b")):
            block = (text.encode() * (BLOCK_SIZE // len(text) + 1))[:BLOCK_SIZE]
            host.run(
                f"dd of={DEVICE} bs={BLOCK_SIZE} seek={BLOCK_OFFSET // BLOCK_SIZE} count=1 "
                "iflag=fullblock oflag=direct conv=notrunc status=none",
                stdin=block,
            )
            shas.append(hashlib.sha256(block).hexdigest())
        res_a.secondary()
        self.step("partition, both Primary, both write", t0)
        return forced, (shas[0], shas[1])

    def record_events(self) -> None:
        """Start ``drbdsetup events2 all`` on both, into a file (for the fixtures)."""
        for h in (self.a, self.b):
            h.run(_background(f"drbdsetup events2 all --statistics --timestamps > {EVENTS}"))

    def start_backend(self, wait_s: float) -> None:
        """The engine's backend in l1a, attached (it follows events2): waits for it."""
        a = self.a
        t0 = time.monotonic()
        a.run(mount_command(self.tree), timeout=300)
        a.run(f"cat > {HOOK} && chmod 755 {HOOK}", stdin=HOOK_SCRIPT.encode())
        a.run(f"cat > {SCRIPT}", stdin=BACKEND_SCRIPT.encode())
        a.run(f"rm -f {ATTACHED} {RESULT} {HOOK_OUT}; rm -rf {STATE_DIR}")
        cmd = f"cd / && env {python_env(self.tree)} python3 {SCRIPT} {wait_s:.0f} > {LOG} 2>&1"
        a.run(_background(cmd))
        deadline = time.monotonic() + 300
        while a.run(f"test -e {ATTACHED} || test -e {RESULT}", check=False).exit_code != 0:
            if time.monotonic() > deadline:
                log = a.run(f"cat {LOG}", check=False).stdout
                raise DrbdError(RESOURCE, "DrbdBackend.attach", 124, f"not attached: {log}")
            time.sleep(0.5)
        self.step("backend attached in l1a (python3 from the shared tree)", t0)

    def reconnect(self, timeout: float) -> tuple[float, dict[str, Any]]:
        """``drbdadm connect`` on l1b; wait for the backend's report: (seconds, report)."""
        a = self.a
        t0 = time.monotonic()
        self.drbd.res[self.b.spec.host].connect()
        deadline = t0 + timeout
        while a.run(f"test -e {RESULT}", check=False).exit_code != 0:
            if time.monotonic() > deadline:
                log = a.run(f"cat {LOG}", check=False).stdout
                raise DrbdError(RESOURCE, "DrbdBackend", 124, f"no report: {log}")
            time.sleep(0.5)
        took = self.step("reconnect, split brain seen by the backend", t0)
        report: dict[str, Any] = json.loads(a.run(f"cat {RESULT}").stdout)
        return took, report

    def inspect(self) -> tuple[tuple[str, str], tuple[str, str], dict[str, str]]:
        """(/proc/drbd of both, sha256 of each backing disk's block, events2 of both)."""
        t0 = time.monotonic()
        wait_drbd(self.a, 0, lambda m: m.cs == "StandAlone", "StandAlone", timeout=60)
        wait_drbd(self.b, 0, lambda m: m.cs == "StandAlone", "StandAlone", timeout=60)
        states = (self.a.run("cat /proc/drbd").stdout, self.b.run("cat /proc/drbd").stdout)
        found = (_block_sha(self.a, BACKING), _block_sha(self.b, BACKING))
        events = {h.spec.host: h.run(f"cat {EVENTS}", check=False).stdout for h in self.pair.hosts}
        self.step("inspect both sides", t0)
        return states, found, events

    def finish(self) -> None:
        """``drbdadm down`` and stop both L1s."""
        t0 = time.monotonic()
        for h in self.pair.hosts:
            if h.alive():
                self.drbd.res[h.spec.host].down()
                h.stop()
        self.step("down, stop", t0)


def run_split_brain(
    pair: L1Pair, tree: str, *, progress: Callable[[str], None] | None = None
) -> SplitBrainRun:
    """Run the scenario on a started ``pair`` (built with ``share=tree``, data disks of
    32 MiB or more). Every L1 is stopped at the end.

    Raises:
        DrbdError: a drbd-utils command failed, DRBD did not reach a state in time, or
            the backend in l1a did not attach or report in time (its log attached).
        AgentError: an L1 stopped answering.
    """
    sc = SplitBrainScenario(pair, tree, progress)
    version = sc.drbd.bring_up()
    sc.drbd.initial_sync()
    sc.record_events()
    forced, written = sc.partition_and_write()
    sc.start_backend(wait_s=180)
    took, report = sc.reconnect(timeout=300)
    states, found, events = sc.inspect()
    sc.finish()
    return SplitBrainRun(
        module_version=version,
        forced=forced,
        detected_within_s=took,
        backend=report,
        states=states,
        written=written,
        found=found,
        events=events,
        steps=sc.steps,
    )


__all__ = [
    "BACKEND_SCRIPT",
    "BLOCK_OFFSET",
    "SplitBrainRun",
    "SplitBrainScenario",
    "run_split_brain",
]
