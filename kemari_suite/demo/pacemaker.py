"""The failover demo under a real Pacemaker cluster: the cluster promotes, Kemari follows.

1. a lab (two hosts and a LAN) and, on it, a Corosync + Pacemaker cluster of two nodes
   with corosync-qnetd on the LAN as the third vote (:mod:`kemari_suite.lab.cluster`);
2. a fence device: ``fence_kemari_lab``, a *test-only stand-in* that "powers off" a lab
   node by SIGKILLing every process in its namespace (a real cluster uses a real one;
   the agents refuse to run protected without any);
3. ``ocf:kemari:vm`` as a promotable clone with ``replication.tiebreaker =
   "pacemaker"``: Pacemaker cold-boots the guest on node ``a`` (``bootstrap=true``),
   the standby on ``b`` receives its checkpoints;
4. the client reads the guest's counter over the LAN; node ``a`` is lost (every process
   of that host killed by PID); the cluster, quorate with qnetd's vote, fences ``a`` and
   promotes ``b``, whose agent resumes the last committed checkpoint;
5. the counter read again from the client is never behind anything read before.

:class:`PacemakerPair` is the same rig for the tests (tests/e2e/test_pacemaker.py).
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

from kemari_suite import lab as labmod
from kemari_suite.config import KemariConfig
from kemari_suite.errors import KemariError, LabError
from kemari_suite.lab.addressing import LabLayout
from kemari_suite.lab.cluster import ClusterLab, missing_binaries
from kemari_suite.lab.pair import LabPair, PairOptions
from kemari_suite.protocol.files import mkdir_owner_only
from kemari_suite.vm.define import ensure_image

DEMO_LAB_ID = "dpm"
RESOURCE = "kemari-vm"
CLONE = "kemari-vm-clone"
FENCE_AGENT = "fence_kemari_lab"

_FENCE_SCRIPT = """#!/bin/sh
# fence_kemari_lab: a TEST-ONLY stand-in for a fence device, for Kemari's cluster lab
# (kemari_suite.lab.cluster). "Powering off" node N SIGKILLs every process in N's
# network namespace (its cluster daemons, Kemari agents, QEMU), by PID. Never use it
# on real hosts: a real cluster fences with a real device (IPMI, PDU, SBD ...).
action=reboot
target=
# Options come as arguments (-o ACTION -n NODE: nothing on stdin, which may stay open)
# or as key=value lines on stdin (how pacemaker-fenced calls fence agents).
if [ $# -gt 0 ]; then
  while [ $# -gt 1 ]; do
    case "$1" in -o|--action) action="$2" ;; -n|--plug) target="$2" ;; esac
    shift 2
  done
else
  while IFS= read -r line; do
    case "$line" in
      action=*|option=*) action="${line#*=}" ;;
      port=*|plug=*|nodename=*) target="${line#*=}" ;;
    esac
  done
fi
ns_of() {
  case "$1" in
@CASES@
  esac
}
case "$action" in
  metadata)
    cat <<'XML'
<?xml version="1.0" ?>
<resource-agent name="fence_kemari_lab"
    shortdesc="Test-only stand-in fence device of the Kemari cluster lab">
<longdesc lang="en">Kills every process of a lab node's network namespace. Test only.</longdesc>
<parameters>
<parameter name="action" unique="0" required="0">
<getopt mixed="-o, --action=[action]"/><content type="string" default="reboot"/>
<shortdesc lang="en">Fencing action</shortdesc></parameter>
<parameter name="port" unique="0" required="0">
<getopt mixed="-n, --plug=[id]"/><content type="string"/>
<shortdesc lang="en">The lab node to fence</shortdesc></parameter>
</parameters>
<actions><action name="on"/><action name="off"/><action name="reboot"/><action name="status"/>
<action name="list"/><action name="monitor"/><action name="metadata"/>
<action name="validate-all"/></actions>
</resource-agent>
XML
    exit 0 ;;
  monitor|validate-all|on) exit 0 ;;
  list) @LIST@; exit 0 ;;
  status)
    ns="$(ns_of "$target")"; [ -n "$ns" ] || exit 1
    [ -n "$(ip netns pids "$ns")" ] && exit 0
    exit 2 ;;
  off|reboot)
    ns="$(ns_of "$target")"; [ -n "$ns" ] || exit 1
    for pid in $(ip netns pids "$ns"); do kill -9 "$pid" 2>/dev/null; done
    for _ in 1 2 3 4 5 6 7 8 9 10; do
      [ -z "$(ip netns pids "$ns")" ] && exit 0
      sleep 0.5
    done
    exit 1 ;;
esac
exit 1
"""


def fence_script(namespaces: dict[str, str]) -> str:
    """The test-only fence agent for these nodes (name -> network namespace)."""
    cases = "\n".join(f"    {n}) echo {ns} ;;" for n, ns in namespaces.items())
    listing = "; ".join(f"echo {n}" for n in namespaces)
    return _FENCE_SCRIPT.replace("@CASES@", cases).replace("@LIST@", listing)


def _nv(parent: ET.Element, prefix: str, name: str, value: str) -> None:
    ET.SubElement(parent, "nvpair", id=f"{prefix}-{name}", name=name, value=value)


def resources_xml(configs: dict[str, Path], kemari: str, *, monitor_s: int = 3) -> str:
    """The CIB ``<resources>``: the stand-in fence device and ``ocf:kemari:vm`` as a
    promotable clone, each node with its own config (a rule on ``#uname``)."""
    res = ET.Element("resources")
    fence = ET.SubElement(
        res, "primitive", {"class": "stonith", "id": "fence-lab", "type": FENCE_AGENT}
    )
    ia = ET.SubElement(fence, "instance_attributes", id="fence-lab-ia")
    _nv(ia, "fence-lab", "pcmk_host_list", " ".join(configs))
    ops = ET.SubElement(fence, "operations")
    ET.SubElement(ops, "op", id="fence-lab-mon", name="monitor", interval="60s")
    clone = ET.SubElement(res, "clone", id=CLONE)
    meta = ET.SubElement(clone, "meta_attributes", id=f"{CLONE}-meta")
    for k, v in (
        ("promotable", "true"),
        ("promoted-max", "1"),
        ("promoted-node-max", "1"),
        ("clone-max", "2"),
        ("clone-node-max", "1"),
        ("notify", "true"),
    ):
        _nv(meta, CLONE, k, v)
    prim = ET.SubElement(
        clone, "primitive", {"class": "ocf", "id": RESOURCE, "provider": "kemari", "type": "vm"}
    )
    for i, (node, cfg) in enumerate(configs.items()):
        ias = ET.SubElement(
            prim, "instance_attributes", id=f"{RESOURCE}-{node}", score=str(len(configs) - i)
        )
        rule = ET.SubElement(ias, "rule", id=f"{RESOURCE}-{node}-rule", score="0")
        ET.SubElement(
            rule,
            "expression",
            id=f"{RESOURCE}-{node}-expr",
            attribute="#uname",
            operation="eq",
            value=node,
        )
        _nv(ias, f"{RESOURCE}-{node}", "config", str(cfg))
    common = ET.SubElement(prim, "instance_attributes", id=f"{RESOURCE}-common", score="0")
    _nv(common, RESOURCE, "kemari", kemari)
    _nv(common, RESOURCE, "bootstrap", "true")
    ops = ET.SubElement(prim, "operations")
    for name, timeout, extra in (
        ("start", 120, {}),
        ("stop", 90, {}),
        ("promote", 180, {}),
        ("demote", 180, {}),
        ("notify", 30, {}),
        ("monitor", 30, {"interval": f"{monitor_s}s", "role": "Promoted"}),
        ("monitor", 30, {"interval": f"{monitor_s + 1}s", "role": "Unpromoted"}),
    ):
        attrib = {"name": name, "timeout": f"{timeout}s", "interval": "0s", **extra}
        attrib["id"] = f"{RESOURCE}-{name}-{attrib['interval']}"
        ET.SubElement(ops, "op", attrib)
    return ET.tostring(res, encoding="unicode")


class PacemakerPair:
    """A protected VM under a real Pacemaker cluster in a lab that is already up."""

    def __init__(self, lab: LabLayout, base: KemariConfig, opts: PairOptions) -> None:
        missing = missing_binaries()
        if missing:
            raise LabError(lab.lab_id, f"not installed: {', '.join(missing)} (scripts/setup.sh)")
        self.lab = lab
        self.pair = LabPair(lab, base, replace(opts, tiebreaker="pacemaker"))
        self.root = self.pair.root / "cluster"
        mkdir_owner_only(self.root)
        ocf = self.root / "ocf"
        sbin = self.root / "sbin"
        (ocf / "kemari").mkdir(parents=True, exist_ok=True)
        sbin.mkdir(exist_ok=True)
        wrapper = ocf / "kemari" / "vm"
        wrapper.write_text(
            "#!/bin/sh\n# ocf:kemari:vm for the cluster lab (the playbooks' wrapper).\n"
            f'exec {sys.executable} -m kemari_suite.cli.ocf "$@"\n'
        )
        wrapper.chmod(0o755)
        fence = sbin / FENCE_AGENT
        fence.write_text(fence_script({"a": lab.ns_primary, "b": lab.ns_secondary}))
        fence.chmod(0o755)
        self.cluster = ClusterLab(lab, self.root, ocf_dir=ocf, sbin_dir=sbin)
        #: Cluster node -> the lab role whose config it runs.
        self.roles = {"a": "primary", "b": "secondary"}

    def start(self, timeout: float = 180) -> None:
        """The cluster, then the resources; returns once it is online and quorate."""
        self.cluster.start()
        self.cluster.wait_online(timeout)
        a = self.cluster
        a.run("a", ["crm_attribute", "-t", "crm_config", "-n", "stonith-enabled", "-v", "true"])
        # Small lab: do not move a healthy promoted instance back after a failure.
        a.run(
            "a", ["crm_attribute", "-t", "rsc_defaults", "-n", "resource-stickiness", "-v", "100"]
        )
        kemari = str(Path(sys.executable).with_name("kemari"))
        configs = {n: self.pair.configs[r] for n, r in self.roles.items()}
        a.run("a", ["cibadmin", "-R", "-o", "resources", "-X", resources_xml(configs, kemari)])
        a.run(
            "a",
            [
                "cibadmin",
                "-C",
                "-o",
                "constraints",
                "-X",
                f'<rsc_location id="{CLONE}-first-on-a" rsc="{CLONE}" role="Promoted" '
                'node="a" score="50"/>',
            ],
        )

    def status(self, node: str) -> dict[str, Any]:
        return self.pair.status(self.roles[node])

    def promoted_on(self, via: str) -> str | None:
        """The node where the cluster (asked on node ``via``) runs the promoted instance."""
        try:
            tree = ET.fromstring(self.cluster.crm_mon_xml(via))
        except (KemariError, ET.ParseError):
            return None
        for r in tree.iter("resource"):
            if r.get("id") == RESOURCE and r.get("role") in ("Promoted", "Master"):
                node = r.find("node")
                if node is not None:
                    return node.get("name")
        return None

    def wait_protected(self, timeout: float = 240) -> dict[str, Any]:
        """Until the primary on ``a`` is protected and ``b`` holds a committed copy."""
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            with contextlib.suppress(KemariError):
                last = self.status("a")
                sec = self.status("b")
                if (
                    last.get("role") == "primary"
                    and last.get("state") == "protected"
                    and sec.get("state") == "standby"
                ):
                    return last
            time.sleep(0.5)
        raise LabError(
            self.lab.lab_id,
            f"not protected in {timeout} s (a: {last.get('role')} {last.get('state')})\n"
            + self.cluster.log("a")[-3000:],
        )

    def wait_promoted(self, node: str, timeout: float) -> dict[str, Any]:
        """Until the cluster says ``node`` is promoted and its agent runs the VM."""
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            with contextlib.suppress(KemariError):
                last = self.status(node)
                running = last.get("state") == "active" or last.get("role") == "primary"
                if running and self.promoted_on(node) == node:
                    return last
            time.sleep(0.3)
        raise LabError(
            self.lab.lab_id,
            f"{node} not promoted in {timeout} s (agent: {last.get('role')} "
            f"{last.get('state')})\n" + self.cluster.log(node)[-4000:],
        )

    def stop(self) -> None:
        with contextlib.suppress(KemariError):
            self.cluster.run(
                "a",
                ["crm_attribute", "-t", "crm_config", "-n", "maintenance-mode", "-v", "true"],
                check=False,
            )
        self.cluster.stop()
        self.pair.stop()


def run_pacemaker_demo(
    cfg: KemariConfig,
    progress: Callable[[str], None] | None = None,
    *,
    lab_id: str = DEMO_LAB_ID,
    run_seconds: float = 3.0,
    keep: bool = False,
) -> dict[str, Any]:
    """Run the failover demo under Pacemaker; returns what happened (never prints).

    The dict has ``resumed``, ``promoted_by`` ("pacemaker"), ``quorum`` (the surviving
    node's partition was quorate), ``failover_ms`` (from the kill of node ``a`` to the
    client's first answer from the guest on ``b``), and the counters behind ``resumed``.

    Raises:
        KemariError: a step failed (lab, cluster, image, agents); all is torn down first.
    """
    say = progress or (lambda _m: None)
    out: dict[str, Any] = {
        "resumed": False,
        "promoted_by": "pacemaker",
        "quorum": False,
        "failover_ms": None,
        "promote_s": None,
        "counter_before_kill": None,
        "counter_after_resume": None,
        "fenced": False,
        "error": None,
    }
    say("building the guest image (cached after the first run)")
    ensure_image(cfg, progress=lambda m: say(f"image: {m}"))
    say(f"lab {lab_id}: hosts a and b, qnetd on the LAN")
    lay = labmod.fresh(lab_id, "1g", say=say)
    opts = PairOptions(tapped_net=True)
    pp: PacemakerPair | None = None
    try:
        pp = PacemakerPair(lay, cfg, opts)
        say("starting corosync, corosync-qdevice and pacemaker on a and b, qnetd on the LAN")
        pp.start()
        say("the cluster is online and quorate; Pacemaker cold-boots the guest on a")
        pp.wait_protected()
        pp.pair.settle(3)
        before = pp.pair.wait_counter(60)
        t_end = time.monotonic() + run_seconds
        while time.monotonic() < t_end:
            with contextlib.suppress(KemariError):
                before = max(before, pp.pair.read_counter())
            time.sleep(0.3)
        out["counter_before_kill"] = before
        say(f"protected; the client reads the counter: {before}; killing every process of a")
        t_kill = time.monotonic()
        pp.cluster.kill_node("a")
        pp.wait_promoted("b", 180)
        out["promote_s"] = round(time.monotonic() - t_kill, 2)
        after = pp.pair.wait_counter(60)
        out["failover_ms"] = round((time.monotonic() - t_kill) * 1e3, 1)
        out["counter_after_resume"] = after
        out["quorum"] = pp.cluster.quorate("b")
        hist = pp.cluster.run("b", ["stonith_admin", "--history", "a"], check=False).stdout
        out["fenced"] = "successful" in hist or "was able to" in hist
        out["resumed"] = after >= before
        say(f"Pacemaker promoted b; counter {after} (before the kill: {before})")
    except KemariError as err:
        out["error"] = str(err)
        raise
    finally:
        if not keep:
            if pp is not None:
                pp.stop()
            labmod.down(lab_id)
            if pp is not None:
                shutil.rmtree(pp.root, ignore_errors=True)
    return out


__all__ = [
    "DEMO_LAB_ID",
    "FENCE_AGENT",
    "PacemakerPair",
    "fence_script",
    "resources_xml",
    "run_pacemaker_demo",
]
