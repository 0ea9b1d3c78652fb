"""The DRBD backend's promotion at a takeover: ``drbdadm primary``; refused, it reads
the status: DRBD lost the peer meanwhile, ``primary`` again; DRBD still counts the lost
primary as its connected Primary peer (8.4 notices a dead peer only after ``ping-int``
plus the ping timeout), it waits, bounded, for DRBD to lose it, then ``primary`` again;
a peer that stays connected is alive and is never promoted over.

The commands run through ``sh`` as in production: drbdadm and drbdsetup are scripts
answering as the tools do (their messages and exit codes), since no DRBD module is
loaded here; the argv is checked against the real drbdadm's and drbdadm-84's dry runs.
The promotion in a kernel, with the fence-peer handler, is the kernel lab's
(tests/klab/test_kemari_in_l1.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from kemari_suite.disk.drbd import (
    DrbdBackend,
    DrbdConfig,
    DrbdNode,
    DrbdTools,
    Promotion,
    peer_lost,
    peer_still_primary,
    promote_resource,
    render_resource,
)
from kemari_suite.disk.drbd84 import status_from_events
from kemari_suite.disk.drbdadm import DrbdAdm, DrbdResource
from kemari_suite.disk.drbdevents import parse_events2
from kemari_suite.disk.drbdstatus import ResourceStatus
from kemari_suite.errors import DrbdError

SBIN = "/usr/local/sbin:/usr/sbin:/sbin:/usr/bin:/bin"
DRBDADM_84 = Path("/usr/lib/drbd/drbdadm-84")

CFG = DrbdConfig(
    "r0",
    (DrbdNode("alpha", "10.99.0.1", 0), DrbdNode("beta", "10.99.0.2", 1)),
    disk="/dev/vda",
)

# ---- 8.4's events2 --now --statistics --timestamps on the standby (beta) ----------------

T = "2025-01-20T10:00:00.000113+00:00"
DEV = "upper-pending:0 lower-pending:0 al-suspended:no blocked:no"
PEER = "name:r0 peer-node-id:0 conn-name:peer"
PD = "resync-suspended:no received:8256 sent:0 out-of-sync:0 pending:0 unacked:0"


def events(role: str, connection: str, peer_role: str, replication: str, peer_disk: str) -> str:
    return f"""\
{T} exists resource name:r0 role:{role} suspended:no write-ordering:flush
{T} exists device name:r0 volume:0 minor:0 disk:UpToDate size:65496 read:0 written:8256 \
al-writes:0 bm-writes:0 {DEV}
{T} exists connection {PEER} connection:{connection} role:{peer_role} congested:no
{T} exists peer-device {PEER} volume:0 minor:0 replication:{replication} \
peer-disk:{peer_disk} {PD}
{T} exists -
"""


#: The primary's L1 lost power seconds ago; DRBD has not noticed yet.
PEER_PRIMARY = events("Secondary", "Connected", "Primary", "Established", "UpToDate")
#: After a ``drbdadm disconnect``: alone, the peer's disk unknown.
STANDALONE = events("Secondary", "StandAlone", "Unknown", "Off", "DUnknown")
#: DRBD noticed the loss by itself.
LOST = events("Secondary", "Connecting", "Unknown", "Off", "DUnknown")
#: A switchover: the old primary demoted first.
PEER_SECONDARY = events("Secondary", "Connected", "Secondary", "Established", "UpToDate")

#: What drbdsetup primary prints (through drbdadm) when the peer is Primary (exit 11).
TWO_PRIMARIES = "r0: State change failed: (-1) Multiple primaries not allowed by config"
#: ... when it found the peer Primary, lost it during its retry and ran the fence-peer
#: handler, but had spent its tries (exit 11).
PRIMARY_NOP = "r0: State change failed: (-7) Refusing to be Primary while peer is not outdated"
#: ... and when the fence-peer handler said the peer holds the lease (exit 6: this host's
#: disk was outdated instead).
OUTDATED = "r0: State change failed: (-2) Need access to UpToDate data"


def status_of(text: str) -> ResourceStatus | None:
    return status_from_events(parse_events2(text.splitlines()), "r0")


def test_peer_still_primary_reads_the_status() -> None:
    assert peer_still_primary(status_of(PEER_PRIMARY))
    for text in (STANDALONE, LOST, PEER_SECONDARY):
        assert not peer_still_primary(status_of(text))
    assert not peer_still_primary(None)  # the resource is down
    assert peer_lost(status_of(LOST)) and peer_lost(status_of(STANDALONE))
    assert not peer_lost(status_of(PEER_PRIMARY)) and not peer_lost(None)
    # Both Primary (two-primaries): nothing to take over here.
    assert not peer_still_primary(
        status_of(events("Primary", "Connected", "Primary", "Established", "UpToDate"))
    )


class Tools:
    """A scripted drbdadm and drbdsetup under ``tmp``: every call is logged; drbdadm
    answers the n-th ``primary`` with ``replies[n]`` (stderr, exit code; None or past
    the list: success); drbdsetup prints ``before`` for its first ``lost_after`` calls
    (None: always), then LOST (DRBD noticed the dead peer)."""

    def __init__(
        self,
        tmp: Path,
        *,
        before: str,
        replies: tuple[tuple[str, int] | None, ...] = ((TWO_PRIMARIES, 11),),
        lost_after: int | None = None,
    ) -> None:
        self.log = tmp / "calls"
        tries, polls = tmp / "tries", tmp / "polls"
        (tmp / "before").write_text(before)
        (tmp / "after").write_text(LOST)
        cases = "".join(f"    {i}) {_answer(r)} ;;\n" for i, r in enumerate(replies))
        adm = tmp / "drbdadm"
        adm.write_text(
            f"""#!/bin/sh
echo "drbdadm $*" >> {self.log}
case "$*" in
  *" primary "*)
    n=$(cat {tries} 2>/dev/null || echo 0)
    echo $((n + 1)) > {tries}
    case $n in
{cases}    esac ;;
esac
exit 0
"""
        )
        limit = -1 if lost_after is None else lost_after
        setup = tmp / "drbdsetup"
        setup.write_text(
            f"""#!/bin/sh
echo "drbdsetup $*" >> {self.log}
n=$(cat {polls} 2>/dev/null || echo 0)
echo $((n + 1)) > {polls}
if [ {limit} -ge 0 ] && [ $n -ge {limit} ]; then cat {tmp / "after"}; \
else cat {tmp / "before"}; fi
"""
        )
        for script in (adm, setup):
            script.chmod(0o755)
        self.tools = DrbdTools(binaries={"drbdadm": str(adm), "drbdsetup": str(setup)})

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []


def _answer(reply: tuple[str, int] | None) -> str:
    if reply is None:
        return "exit 0"
    text, rc = reply
    return f'echo "{text}" >&2; exit {rc}'


def adm84(tools: DrbdTools) -> DrbdAdm:
    return DrbdAdm("r0", config_path="/etc/drbd.d/r0.res", tools=tools, dialect="8.4")


C = "drbdadm -c /etc/drbd.d/r0.res"
EVENTS = "drbdsetup events2 r0 --now --statistics --timestamps"


def test_a_peer_still_counted_primary_is_waited_for_then_promoted(tmp_path: Path) -> None:
    t = Tools(tmp_path, before=PEER_PRIMARY, lost_after=3)
    assert promote_resource(adm84(t.tools), poll_s=0.01) is Promotion.WAITED
    assert t.calls() == [f"{C} primary r0", EVENTS, EVENTS, EVENTS, EVENTS, f"{C} primary r0"]


def test_a_peer_that_stays_connected_is_never_promoted_over(tmp_path: Path) -> None:
    """Alive (a switchover without demotion, an engine dead on a live host): nothing is
    disconnected, nothing forced; the refusal says why, bounded."""
    t = Tools(tmp_path, before=PEER_PRIMARY)
    with pytest.raises(DrbdError) as info:
        promote_resource(adm84(t.tools), peer_wait_s=0.3, poll_s=0.05)
    err = info.value
    assert (err.resource, err.command, err.rc) == ("r0", f"{C} primary r0", 11)
    assert "Multiple primaries" in err.stderr
    assert "still counts as a connected Primary after 0 s" in err.stderr
    assert isinstance(err.__cause__, DrbdError)
    calls = t.calls()
    assert calls.count(f"{C} primary r0") == 1 and len(calls) > 2
    assert not any("disconnect" in c for c in calls)


def test_a_peer_already_lost_or_demoted_is_promoted_at_once(tmp_path: Path) -> None:
    for i, before in enumerate((LOST, PEER_SECONDARY)):
        d = tmp_path / str(i)
        d.mkdir()
        t = Tools(d, before=before, replies=())
        assert promote_resource(adm84(t.tools)) is Promotion.DIRECT
        assert t.calls() == [f"{C} primary r0"]


def test_a_peer_lost_during_the_first_try_gets_a_second_primary(tmp_path: Path) -> None:
    """Seen in the lab: 8.4 found the peer Primary, retried once a ping timeout later,
    lost the peer meanwhile and ran the fence-peer handler (exit 7: the peer is
    Outdated now), but its tries were spent and it refused. The next one succeeds."""
    t = Tools(tmp_path, before=LOST, replies=((PRIMARY_NOP, 11),))
    assert promote_resource(adm84(t.tools)) is Promotion.PEER_LOST
    assert t.calls() == [f"{C} primary r0", EVENTS, f"{C} primary r0"]


def test_a_refusal_for_another_reason_is_raised_as_is(tmp_path: Path) -> None:
    """Our data is not up to date and the peer is gone: nothing to disconnect."""
    t = Tools(tmp_path, before=PEER_SECONDARY, replies=((OUTDATED, 17),))
    with pytest.raises(DrbdError) as info:
        promote_resource(adm84(t.tools))
    err = info.value
    assert (err.resource, err.command, err.rc) == ("r0", f"{C} primary r0", 17)
    assert "Need access to UpToDate data" in err.stderr
    assert "`drbdadm -c /etc/drbd.d/r0.res primary r0` exited 17" in str(err)
    assert t.calls() == [f"{C} primary r0", EVENTS]


def test_a_lost_peer_and_a_second_refusal_raise_the_second(tmp_path: Path) -> None:
    t = Tools(tmp_path, before=LOST, replies=((PRIMARY_NOP, 11), (OUTDATED, 17)))
    with pytest.raises(DrbdError) as info:
        promote_resource(adm84(t.tools))
    assert info.value.rc == 17 and "UpToDate data" in info.value.stderr
    assert isinstance(info.value.__cause__, DrbdError) and info.value.__cause__.rc == 11


def test_a_refusal_after_the_wait_names_the_second_primary(tmp_path: Path) -> None:
    """The fence-peer handler said the peer holds the lease: DRBD outdated this disk."""
    t = Tools(
        tmp_path, before=PEER_PRIMARY, lost_after=1, replies=((TWO_PRIMARIES, 11), (OUTDATED, 11))
    )
    with pytest.raises(DrbdError) as info:
        promote_resource(adm84(t.tools), poll_s=0.01)
    err = info.value
    assert (err.command, err.rc) == (f"{C} primary r0", 11)
    assert "Need access to UpToDate data" in err.stderr
    first = err.__cause__
    assert isinstance(first, DrbdError) and "Multiple primaries" in first.stderr
    assert t.calls()[-1] == f"{C} primary r0"


def test_the_backend_promotes_through_the_takeover_and_opens_the_device(tmp_path: Path) -> None:
    t = Tools(tmp_path, before=PEER_PRIMARY, lost_after=1)
    dev = tmp_path / "drbd0"
    dev.write_bytes(bytes(1 << 16))
    backend = DrbdBackend.for_resource(
        "r0", dev, config_path="/etc/drbd.d/r0.res", tools=t.tools, dialect="8.4"
    )
    backend.promote()
    assert backend.promotion is Promotion.WAITED
    backend.apply([(512, b"after the takeover")])
    backend.flush()
    backend.close()
    assert dev.read_bytes()[512:530] == b"after the takeover"
    assert t.calls()[-1] == f"{C} primary r0"


def test_the_promotion_timeout_is_its_own(tmp_path: Path) -> None:
    """The kernel runs the fence-peer handler inside ``drbdadm primary``: its bound is
    the promotion's, not the tools' default."""
    slow = tmp_path / "drbdadm"
    slow.write_text("#!/bin/sh\nsleep 5\n")
    slow.chmod(0o755)
    adm = DrbdAdm("r0", tools=DrbdTools(timeout_s=30, binaries={"drbdadm": str(slow)}))
    with pytest.raises(DrbdError) as info:
        promote_resource(adm, timeout_s=0.3)
    assert info.value.rc == 124 and "0.3 s" in info.value.stderr
    # No module here: the status after the refusal fails too; the refusal is raised.
    assert isinstance(info.value.__cause__, DrbdError)
    assert "drbdsetup status r0 --json" in info.value.__cause__.command


# ---- the argv, against drbd-utils' own dry runs ----------------------------------------------


@pytest.mark.skipif(shutil.which("drbdadm", path=SBIN) is None, reason="drbd-utils not installed")
def test_drbdadm_expands_a_forced_disconnect_and_primary(tmp_path: Path) -> None:
    conf = tmp_path / "r0.res"
    conf.write_text(render_resource(CFG))
    rec = DrbdTools(dry_run=True)
    res = DrbdResource(CFG, "beta", config_path=conf, tools=rec)
    res.disconnect(force=True)
    res.primary()
    real = DrbdTools()
    got = [
        [Path(c[0]).name, *c[1:]]
        for argv in rec.recorded
        for c in real.drbdadm_dry_run("r0", argv, "beta")
    ]
    assert got == [
        ["drbdsetup", "disconnect", "r0", "0", "--force"],
        ["drbdsetup", "primary", "r0"],
    ]


@pytest.mark.skipif(not DRBDADM_84.exists(), reason="drbd-utils' drbdadm-84 not installed")
def test_drbdadm_84_expands_a_forced_disconnect_and_primary(tmp_path: Path) -> None:
    conf = tmp_path / "r0.res"
    conf.write_text(render_resource(CFG, dialect="8.4"))
    rec = DrbdTools(dry_run=True)
    res = DrbdResource(CFG, "beta", config_path=conf, tools=rec, dialect="8.4")
    res.disconnect(force=True)
    res.primary()
    out = []
    for argv in rec.recorded:
        done = subprocess.run(
            [str(DRBDADM_84), "-d", *argv[1:]],
            capture_output=True,
            text=True,
            env={**os.environ, "__DRBD_NODE__": "beta", "LC_ALL": "C"},
            check=True,
        )
        out += [line.split() for line in done.stdout.splitlines() if line.strip()]
    assert [[Path(c[0]).name, *c[1:]] for c in out] == [
        ["drbdsetup-84", "disconnect", "ipv4:10.99.0.2:7789", "ipv4:10.99.0.1:7789", "--force"],
        ["drbdsetup-84", "primary", "0"],
    ]


# ---- ping-int: how long a silent peer still counts as connected ----------------------------


@pytest.mark.parametrize("dialect", ["9", "8.4"])
def test_ping_int_is_rendered_in_the_net_section(dialect: str) -> None:
    cfg = DrbdConfig(CFG.resource, CFG.nodes, disk=CFG.disk, ping_int_s=120)
    net = render_resource(cfg, dialect=dialect).split("  net {")[1].split("  }")[0]
    assert "    ping-int 120;" in net.splitlines()
    assert "ping-int" not in render_resource(CFG, dialect=dialect)


@pytest.mark.parametrize("bad", [0, 121, True, "10"])
def test_ping_int_out_of_drbds_range_is_refused(bad: object) -> None:
    from kemari_suite.errors import ConfigError

    with pytest.raises(ConfigError, match="ping_int_s"):
        DrbdConfig(CFG.resource, CFG.nodes, disk=CFG.disk, ping_int_s=bad)  # type: ignore[arg-type]


@pytest.mark.skipif(not DRBDADM_84.exists(), reason="drbd-utils' drbdadm-84 not installed")
@pytest.mark.parametrize("dialect", ["9", "8.4"])
def test_drbdadm_passes_ping_int_to_drbdsetup(tmp_path: Path, dialect: str) -> None:
    conf = tmp_path / "r0.res"
    cfg = DrbdConfig(CFG.resource, CFG.nodes, disk=CFG.disk, ping_int_s=120)
    conf.write_text(render_resource(cfg, dialect=dialect))
    tool = str(DRBDADM_84) if dialect == "8.4" else (shutil.which("drbdadm", path=SBIN) or "")
    done = subprocess.run(
        [tool, "-c", str(conf), "-d", "up", "r0"],
        capture_output=True,
        text=True,
        env={**os.environ, "__DRBD_NODE__": "beta", "LC_ALL": "C"},
        check=True,
    )
    assert "--ping-int=120" in done.stdout
