"""The playbooks' CIB for a DRBD pair, run through Pacemaker's own scheduler.

The pacemaker role renders ``ocf:linbit:drbd`` and ``ocf:kemari:vm`` as promotable
clones with an order (DRBD promoted first) and a colocation (the VM promoted only where
DRBD is Promoted). ``crm_simulate`` (Debian's pacemaker-cli-utils) computes and
simulates the transitions Pacemaker would run from that CIB, with the project's
templates rendered as Ansible renders them: the first start, the loss of the promoted
node (fenced), and a move of the VM (``crm resource move`` bans it from its node). The
transition graph says which action waits for which; the checks follow those edges.

What this does not run: the agents themselves (the simulation fakes their results) and
DRBD's kernel module. Those run in the kernel lab (docs/kernel-lab.md); a Pacemaker
cluster inside the L1s needs systemd there, which the lab's init is not.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import jinja2
import pytest

REPO = Path(__file__).resolve().parents[2]
TEMPLATES = REPO / "playbooks" / "roles" / "pacemaker" / "templates"

pytestmark = pytest.mark.skipif(
    shutil.which("crm_simulate") is None, reason="needs pacemaker-cli-utils (crm_simulate)"
)

VM, DRBD = "kemari-vm", "drbd-r0"


def render(name: str, **extra: object) -> ET.Element:
    """A template of the pacemaker role, rendered with the role's variables."""

    def as_bool(v: object) -> bool:
        return v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes", "on")

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=False)
    env.filters["bool"] = as_bool
    params = {
        "pacemaker_stonith": [{"id": "fence-ipmi", "agent": "fence_watchdog", "params": {}}],
        "pacemaker_resource_id": VM,
        "pacemaker_config_path": "/etc/kemari/kemari.toml",
        "pacemaker_bootstrap": False,
        "pacemaker_drbd_resource": "r0",
        "pacemaker_drbd_id": DRBD,
        **extra,
    }
    return ET.fromstring(env.get_template(name).render(**params))


def make_cib(path: Path, *, constraints: bool = True, drbd: str = "r0") -> Path:
    """An empty CIB of the installed Pacemaker, two online nodes with quorum, fencing on,
    the role's resources and (``constraints``) its constraints."""
    cib = ET.fromstring(subprocess.run(["cibadmin", "--empty"], capture_output=True,
                                       text=True, check=True).stdout)  # fmt: skip
    cib.set("have-quorum", "1")
    conf = cib.find("configuration")
    assert conf is not None
    props = ET.SubElement(conf.find("crm_config"), "cluster_property_set", id="options")  # type: ignore[arg-type]
    ET.SubElement(props, "nvpair", id="o-stonith", name="stonith-enabled", value="true")
    nodes = conf.find("nodes")
    status = cib.find("status")
    assert nodes is not None and status is not None
    for i, name in enumerate(("a", "b"), start=1):
        ET.SubElement(nodes, "node", id=str(i), uname=name)
        ET.SubElement(status, "node_state", id=str(i), uname=name, in_ccm="true",
                      crmd="online", join="member", expected="member")  # fmt: skip
    conf.remove(conf.find("resources"))  # type: ignore[arg-type]
    conf.remove(conf.find("constraints"))  # type: ignore[arg-type]
    conf.append(render("kemari-resources.xml.j2", pacemaker_drbd_resource=drbd))
    conf.append(
        render("kemari-constraints.xml.j2", pacemaker_drbd_resource=drbd)
        if constraints
        else ET.Element("constraints")
    )
    ET.ElementTree(cib).write(path)
    return path


def simulate(
    cib: Path, out: Path, *args: str
) -> tuple[str, dict[str, dict[str, str]], dict[str, set[str]]]:
    """Run the transition; (summary text, actions by id, inputs of each action id)."""
    graph = out.with_suffix(".graph.xml")
    done = subprocess.run(
        ["crm_simulate", "-x", str(cib), "-S", "-O", str(out), "--save-graph", str(graph), *args],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    actions: dict[str, dict[str, str]] = {}
    inputs: dict[str, set[str]] = {}
    for synapse in ET.parse(graph).getroot().iter("synapse"):
        for act in synapse.find("action_set") or []:
            key = act.get("operation_key", "")
            node = act.get("on_node", "")
            actions[act.get("id", "")] = {"key": key, "node": node, "tag": act.tag}
            ins = {
                t.get("id", "")
                for t in synapse.iter()
                if t.tag in ("rsc_op", "pseudo_event", "crm_event") and t.get("id") != act.get("id")
            }
            inputs[act.get("id", "")] = ins
    return done.stdout, actions, inputs


def find(actions: dict[str, dict[str, str]], rsc: str, op: str) -> list[tuple[str, str]]:
    """(action id, node) of every ``op`` of ``rsc`` (any clone instance)."""
    return [
        (i, a["node"])
        for i, a in actions.items()
        if a["tag"] == "rsc_op" and a["key"] == f"{rsc}_{op}_0"
    ]


def waits_for(inputs: dict[str, set[str]], later: str, earlier: str) -> bool:
    """Whether action ``later`` waits, directly or through others, for ``earlier``."""
    seen, todo = set(), [later]
    while todo:
        for dep in inputs.get(todo.pop(), set()):
            if dep == earlier:
                return True
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return False


def set_scores(cib: Path, scores: dict[str, dict[str, int]]) -> None:
    """Promotion scores as the agents set them (transient node attributes)."""
    env = {**os.environ, "CIB_file": str(cib)}
    for rsc, per_node in scores.items():
        for node, score in per_node.items():
            argv = ["crm_attribute", "-N", node, "-l", "reboot", "-n", f"master-{rsc}"]
            subprocess.run([*argv, "-v", str(score)], env=env, check=True, capture_output=True)


def started(tmp_path: Path, *, constraints: bool = True) -> Path:
    """Both clones started (Unpromoted) on both nodes; DRBD prefers a, the VM b."""
    out = tmp_path / "started.xml"
    simulate(make_cib(tmp_path / "cib.xml", constraints=constraints), out)
    set_scores(out, {DRBD: {"a": 10000, "b": 5000}, VM: {"a": 5, "b": 10}})
    return out


def test_the_vm_is_promoted_after_drbd_and_on_its_node(tmp_path: Path) -> None:
    _, actions, inputs = simulate(started(tmp_path), tmp_path / "promoted.xml")
    [(drbd_promote, drbd_node)] = find(actions, DRBD, "promote")
    [(vm_promote, vm_node)] = find(actions, VM, "promote")
    assert drbd_node == vm_node == "a"  # the colocation overrides the VM's own preference
    assert waits_for(inputs, vm_promote, drbd_promote)
    assert not waits_for(inputs, drbd_promote, vm_promote)


def test_without_the_constraints_the_check_sees_the_difference(tmp_path: Path) -> None:
    _, actions, inputs = simulate(started(tmp_path, constraints=False), tmp_path / "p.xml")
    [(drbd_promote, drbd_node)] = find(actions, DRBD, "promote")
    [(vm_promote, vm_node)] = find(actions, VM, "promote")
    assert (drbd_node, vm_node) == ("a", "b")
    assert not waits_for(inputs, vm_promote, drbd_promote)


def test_the_promoted_node_lost_is_fenced_then_both_promoted_on_the_other(tmp_path: Path) -> None:
    promoted = tmp_path / "promoted.xml"
    simulate(started(tmp_path), promoted)
    text, actions, inputs = simulate(promoted, tmp_path / "failed.xml", "--node-fail", "a")
    assert "Fence (reboot) a" in text or "Fencing a" in text, text
    [(drbd_promote, drbd_node)] = find(actions, DRBD, "promote")
    [(vm_promote, vm_node)] = find(actions, VM, "promote")
    assert drbd_node == vm_node == "b"
    assert waits_for(inputs, vm_promote, drbd_promote)
    fence = [i for i, a in actions.items() if a["tag"] == "crm_event"]
    assert fence and all(waits_for(inputs, vm_promote, f) for f in fence)


def promoted_then_banned(tmp_path: Path, rsc: str) -> Path:
    """The promoted state, then what `crm resource move --promoted <rsc>-clone b` leaves:
    a ban of ``rsc``'s promoted role on a."""
    promoted = tmp_path / "promoted.xml"
    simulate(started(tmp_path), promoted)
    cib = ET.parse(promoted)
    cons = cib.getroot().find("configuration/constraints")
    assert cons is not None
    ET.SubElement(cons, "rsc_location", id="cli-ban", rsc=f"{rsc}-clone", role="Promoted",
                  node="a", score="-INFINITY")  # fmt: skip
    cib.write(promoted)
    return promoted


def test_moving_drbd_moves_the_vm_demoted_first_and_promoted_last(tmp_path: Path) -> None:
    _, actions, inputs = simulate(promoted_then_banned(tmp_path, DRBD), tmp_path / "moved.xml")
    [(vm_demote, n1)] = find(actions, VM, "demote")
    [(drbd_demote, n2)] = find(actions, DRBD, "demote")
    [(drbd_promote, n3)] = find(actions, DRBD, "promote")
    [(vm_promote, n4)] = find(actions, VM, "promote")
    assert (n1, n2, n3, n4) == ("a", "a", "b", "b")
    assert waits_for(inputs, drbd_demote, vm_demote)  # the VM leaves a before DRBD does
    assert waits_for(inputs, drbd_promote, drbd_demote)
    assert waits_for(inputs, vm_promote, drbd_promote)


def test_moving_the_vm_alone_leaves_it_unpromoted(tmp_path: Path) -> None:
    """The colocation makes the VM follow DRBD, not DRBD the VM: a ban of the VM's
    promoted role demotes it and promotes it nowhere (docs/pacemaker.md says to move
    the DRBD clone)."""
    _, actions, _ = simulate(promoted_then_banned(tmp_path, VM), tmp_path / "moved.xml")
    assert [n for _, n in find(actions, VM, "demote")] == ["a"]
    assert find(actions, VM, "promote") == [] and find(actions, DRBD, "demote") == []


@pytest.mark.parametrize("drbd", ["r0", ""])
def test_the_rendered_cib_is_valid(tmp_path: Path, drbd: str) -> None:
    """What `cibadmin --modify` will be given passes Pacemaker's own schema check, with
    and without DRBD."""
    cib = make_cib(tmp_path / "cib.xml", drbd=drbd)
    done = subprocess.run(["crm_verify", "-x", str(cib)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    conf = ET.parse(cib).getroot().find("configuration")
    assert conf is not None
    ids = [e.get("id") for part in ("resources", "constraints") for e in conf.find(part).iter()  # type: ignore[union-attr]
           if e.get("id")]  # fmt: skip
    assert len(ids) == len(set(ids))
    assert (f"{DRBD}-clone" in ids) == bool(drbd)
