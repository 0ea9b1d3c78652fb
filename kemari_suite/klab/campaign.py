"""Power-loss campaigns in the kernel lab: many :func:`~.protectdemo.run_protect_demo`
runs, each on a fresh pair of L1s, with the host that loses power and the moment drawn
at random.

Each trial: both L1s boot, Kemari protects the L2 guest (under nested KVM), a client
writes fsynced records and logs every acknowledgement, and after a random number of
acknowledged records (``acks``, drawn from :data:`ACKS`) one L1's QEMU is SIGKILLed:
its page cache, its engine and its guest die at once, as on a power loss.

- victim ``primary``: the standby must resume the guest with every acknowledged record;
- victim ``secondary``: the primary must go on alone with every acknowledged record.

Then the survivor's agent and guest are stopped and its copy of the disk is read offline
(:meth:`~.protectdemo.ProtectScenario.offline_check`): every acknowledged record must be
there. A trial that fails before the kill (an L1 that does not boot on a loaded host, a
guest never protected) is kept with its error and counted apart as a setup error: it
says nothing about data, but it is not hidden. An error after the kill fails the trial.

With the iSCSI backend each trial is a fresh :class:`~.iscsi.IscsiLab` (a storage L1
and the two hosts; :func:`~.iscsidemo.run_iscsi_protect_demo`): the victim is one of the
hosts, never the storage L1; the offline check reads the LUN's backing file in the
storage L1, and a killed primary must also be fenced (its key preempted, its write
refused by the target once its L1 is back).

Each trial is one JSON line (``record``), so that a campaign interrupted half way keeps
what it measured.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kemari_suite.config import PathsConfig
from kemari_suite.errors import KemariError, LabError
from kemari_suite.klab.iscsi import IscsiLab
from kemari_suite.klab.iscsidemo import run_iscsi_protect_demo
from kemari_suite.klab.pair import L1Group, L1Pair
from kemari_suite.klab.protectdemo import ProtectRun, run_protect_demo
from kemari_suite.vm.image import GuestImage

#: Acknowledged records before the kill: the moment, relative to the workload.
ACKS = (3, 60)
VICTIMS = ("primary", "secondary")
#: What the report says more for the iSCSI backend.
ISCSI_NOTE = (
    "",
    "iSCSI: a third L1 serves the LUN (LIO) both hosts log in to; the engine's shared",
    "backend writes it from the primary only, fenced by SCSI-3 reservations. The storage",
    "L1 never loses power; the offline check reads the LUN's backing file there. After a",
    "primary's power loss its L1 is restarted and logged in again: fenced means its key",
    "was preempted and the target refused its write and its reservation with the old key.",
)


@dataclass
class Trial:
    n: int
    backend: str
    victim: str
    acks: int
    ok: bool = False
    #: The run's own figures (records acknowledged, found live and offline, times).
    run: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    took_s: float = 0.0

    @property
    def lost(self) -> int | None:
        """Acknowledged records missing live or offline; None when not measured (the
        guest was never served again: the trial failed without a count)."""
        if not self.run or not self.run.get("resumed"):
            return None
        acked = int(self.run.get("records_acked") or 0)
        found = [self.run.get("records_found"), self.run.get("records_offline")]
        counts = [int(x) for x in found if x is not None]
        return max(0, acked - min(counts)) if counts else None

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "lost": self.lost}


def plan(trials: int, seed: int) -> Iterator[tuple[str, int]]:
    """(victim, acks) of each trial: victims alternate, the moment is random (pure)."""
    rng = random.Random(seed)
    for n in range(trials):
        yield VICTIMS[n % 2], rng.randint(*ACKS)


def run_campaign(
    make_pair: Callable[[int], AbstractContextManager[L1Group]],
    guest: GuestImage,
    *,
    tree: str,
    work: Path,
    host_paths: PathsConfig,
    backend: str,
    trials: int,
    seed: int = 1,
    record: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[Trial]:
    """``trials`` trials, each on ``make_pair(n)`` (started here, stopped by the context):
    an :class:`L1Pair`, or for ``backend="iscsi"`` an :class:`IscsiLab`; every trial
    appended to ``record`` (JSON lines) as it ends."""
    say = progress or (lambda _m: None)

    def indented(msg: str) -> None:
        say(f"  {msg}")

    done: list[Trial] = []
    for n, (victim, acks) in enumerate(plan(trials, seed)):
        t = Trial(n=n, backend=backend, victim=victim, acks=acks)
        say(f"trial {n + 1}/{trials}: {backend}, power loss of the {victim} after {acks} acks")
        t0 = time.monotonic()
        run = ProtectRun()
        try:
            with make_pair(n) as lab:
                lab.start()
                if isinstance(lab, IscsiLab):
                    run_iscsi_protect_demo(
                        lab, guest, tree=tree, work=work / f"trial-{n}",
                        host_paths=host_paths, min_acks=acks, victim=victim,
                        offline_check=True, progress=indented, run=run,
                    )  # fmt: skip
                elif isinstance(lab, L1Pair):
                    run_protect_demo(
                        lab, guest, tree=tree, work=work / f"trial-{n}",
                        host_paths=host_paths, disk_backend=backend, min_acks=acks,
                        victim=victim, offline_check=True, progress=indented, run=run,
                    )  # fmt: skip
                else:
                    raise LabError(f"c{n}", f"no protect demo on a {type(lab).__name__}")
        except KemariError as err:
            t.error = str(err)[-2000:]
        if run.records_acked > 0:
            # The kill came: what followed is the trial's result, error or not.
            t.run, t.ok = run.as_dict(), run.ok and not t.error
        t.took_s = round(time.monotonic() - t0, 1)
        verdict = "ok" if t.ok else (f"FAILED: {t.error[:200]}" if t.error else "FAILED")
        say(f"trial {n + 1}/{trials}: lost {t.lost}, {verdict} ({t.took_s:.0f} s)")
        done.append(t)
        if record is not None:
            with record.open("a") as fh:
                fh.write(json.dumps(t.as_dict()) + "\n")
    return done


def summary(trials: list[Trial]) -> dict[str, Any]:
    """Per backend and victim: trials, completed, failed checks, setup errors, records
    lost (the campaign's verdict: no acknowledged record lost in any completed trial)."""
    out: dict[str, Any] = {}
    for t in trials:
        row = out.setdefault(t.backend, {}).setdefault(
            t.victim,
            {"trials": 0, "completed": 0, "ok": 0, "setup_errors": 0, "lost": 0},
        )
        row["trials"] += 1
        if t.run:
            row["completed"] += 1
            row["ok"] += int(t.ok)
            row["lost"] += t.lost or 0
        else:
            row["setup_errors"] += 1
    completed = [t for t in trials if t.run]
    return {
        "by_backend": out,
        "trials": len(trials),
        "completed": len(completed),
        "records_lost": sum(t.lost or 0 for t in completed),
        "all_ok": bool(completed) and all(t.ok for t in completed),
    }


def write_report(trials: list[Trial], folder: Path, backend: str, head: list[str]) -> Path:
    """``power-loss-<backend>.md`` in ``folder`` (beside the JSON lines the campaign
    appended): ``head`` (the benchmark header: command, commit, machine), the summary
    and one row per trial; returns its path."""
    s = summary(trials)
    lines = [
        *head,
        "",
        "Each trial boots two L1s (TCG, Debian's kernel), protects a guest under nested KVM",
        "that writes fsynced records acknowledged over TCP, and SIGKILLs one L1's QEMU after",
        "a random number of acknowledged records (the primary's and the standby's in turn).",
        "A record counts as lost when it was acknowledged before the kill and is missing",
        "from the guest that goes on, or from the surviving disk read offline afterwards.",
        *(ISCSI_NOTE if backend == "iscsi" else ()),
        "",
        "| victim | trials | completed | all checks passed | records lost | setup errors |",
        "|---|---|---|---|---|---|",
    ]
    for victim, row in sorted(s["by_backend"].get(backend, {}).items()):
        lines.append(
            f"| {victim} | {row['trials']} | {row['completed']} | {row['ok']} | {row['lost']} "
            f"| {row['setup_errors']} |"
        )
    lines += [
        "",
        f"Verdict: {s['records_lost']} acknowledged records lost in {s['completed']} completed "
        f"trials; {'every completed trial passed' if s['all_ok'] else 'NOT every trial passed'}.",
        "",
        "| # | victim | acks before the kill | acked | found live | found offline | failover ms "
        + ("| old primary fenced " if backend == "iscsi" else "")
        + "| ok | error |",
        "|---|---|---|---|---|---|---|" + ("---|" if backend == "iscsi" else "") + "---|---|",
    ]
    for t in trials:
        r = t.run
        fenced = r.get("fenced")
        lines.append(
            f"| {t.n} | {t.victim} | {t.acks} | {r.get('records_acked', '-')} "
            f"| {r.get('records_found', '-') if r.get('resumed') else '-'} "
            f"| {r.get('records_offline', '-')} | {r.get('failover_ms') or '-'} "
            + (
                f"| {'-' if fenced is None else 'yes' if fenced else 'NO'} "
                if backend == "iscsi"
                else ""
            )
            + f"| {'yes' if t.ok else 'no'} | {t.error[:120].replace('|', '/') or ''} |"
        )
    path = folder / f"power-loss-{backend}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


__all__ = ["ACKS", "VICTIMS", "Trial", "plan", "run_campaign", "summary", "write_report"]
