"""The engine's shared backend fenced by SCSI-3 reservations on the kernel lab's LUN.

:func:`run_backend_fencing` runs :class:`~kemari_suite.disk.shared.SharedDiskBackend`
with ``disk.fencing = "scsi-pr"`` in the two host L1s of an :class:`~.iscsi.IscsiLab`,
from the suite's tree shared into them (virtiofs, as in ``klab/engine.py``): l1a promotes
and writes; l1b promotes at failover (preempt-and-abort) and reads l1a's block; l1a,
still believing it is the writer, writes again and the target refuses it (fenced).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from kemari_suite.disk.scsipr import format_key
from kemari_suite.klab.iscsi import IscsiLab, PrFencingScenario
from kemari_suite.klab.share import mount_command, python_env

#: The engine's own shared backend in an L1, from a config with ``disk.fencing =
#: "scsi-pr"`` (``config.load`` -> ``disk.factory.open_backend`` -> SharedDiskBackend).
#: ``writer``: promote, write a block, then wait for /run/klab-go and write again (the
#: stale writer); ``takeover``: promote at failover, read the writer's block, write.
#: Prints one JSON object per phase.
BACKEND_SCRIPT = """
import hashlib, json, os, sys, time
from kemari_suite.config import load
from kemari_suite.disk.factory import open_backend
from kemari_suite.errors import DiskError
conf, node, mode = sys.argv[1:4]
disk = open_backend(load(conf), node_id=node)
disk.attach()
def say(**kw):
    kw.update(role=disk.role.value, node=node)
    print(json.dumps(kw), flush=True)
def write(tag):
    data = hashlib.sha256(tag.encode()).digest() * 2048
    disk.apply([(0 if tag == "writer" else 1 << 20, data)])
    disk.flush()
    return hashlib.sha256(data).hexdigest()
t0 = time.monotonic()
disk.promote()
promote_s = round(time.monotonic() - t0, 3)
if mode == "writer":
    say(phase="promoted", promote_s=promote_s, sha256=write("writer"),
        status=disk.status().detail)
    open("/run/klab-written", "w").close()
    while not os.path.exists("/run/klab-go"):
        time.sleep(0.2)
    try:
        write("writer again")
        say(phase="stale write", refused=False)
    except DiskError as err:
        say(phase="stale write", refused=True, error=str(err))
else:
    seen = hashlib.sha256(disk.read(0, 65536)).hexdigest()
    say(phase="promoted", promote_s=promote_s, read_sha256=seen, sha256=write("takeover"),
        status=disk.status().detail)
disk.close()
"""


def _backend_config(dev: str) -> str:
    """The TOML config both hosts load: the shared backend on the LUN, fenced by it."""
    return (
        f'[vm]\nname = "kemari0"\n\n[disk]\nbackend = "shared"\npath = "{dev}"\n'
        'fencing = "scsi-pr"\n'
    )


@dataclass(frozen=True)
class BackendFencingRun:
    """What :func:`run_backend_fencing` found: each host's JSON lines, and timings."""

    writer: tuple[dict[str, Any], ...]
    takeover: dict[str, Any]
    keys_after: tuple[str, ...]
    total_s: float
    steps: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        first = self.writer[0] if self.writer else {}
        last = self.writer[-1] if self.writer else {}
        return (
            first.get("role") == "primary"
            and self.takeover.get("role") == "primary"
            and self.takeover.get("read_sha256") == first.get("sha256")
            and last.get("phase") == "stale write"
            and last.get("refused") is True
            and last.get("role") == "secondary"
            and self.keys_after == (self.takeover.get("status", {}).get("scsi_pr_key"),)
        )

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def _json_lines(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def run_backend_fencing(
    lab: IscsiLab, tree: str, *, progress: Callable[[str], None] | None = None
) -> BackendFencingRun:
    """The engine's shared backend with ``disk.fencing = "scsi-pr"`` on the real LUN: l1a
    promotes and writes; l1b promotes at failover (preempt-and-abort) and reads l1a's
    block; l1a, still believing it is the writer, writes again and is refused (fenced).
    ``lab`` is started with ``share=tree``; every L1 is stopped at the end.

    Raises:
        AgentError: an L1 command failed or an L1 stopped answering.
        DiskError: the LUN did not appear on a host.
    """
    t_start = time.monotonic()
    sc = PrFencingScenario(lab, progress)
    sc.setup()
    a, b = lab.a, lab.b
    t0 = time.monotonic()
    for h in (a, b):
        h.run(mount_command(tree), timeout=300)
        conf = _backend_config(sc.dev[h.spec.host]).encode()
        h.run("cat > /run/kemari.toml", stdin=conf)
        h.run("cat > /run/klab-backend.py", stdin=BACKEND_SCRIPT.encode())
    sc.step("mount the tree, write the configs", t0)
    t0 = time.monotonic()
    run = f"env {python_env(tree)} python3 /run/klab-backend.py /run/kemari.toml"
    a.run(
        # Every fd away from the agent's pipes, or the agent waits for the writer's end.
        f"setsid -f {run} {a.spec.host} writer </dev/null >/run/klab-a.out 2>&1",
        timeout=60,
    )
    a.run("for i in $(seq 600); do [ -e /run/klab-written ] && exit 0; sleep 0.5; done; "
          "cat /run/klab-a.out; exit 1", timeout=400)  # fmt: skip
    sc.step("l1a: open_backend, promote (reserve), write", t0)
    t0 = time.monotonic()
    out_b = b.run(f"{run} {b.spec.host} takeover", timeout=400).stdout
    sc.step("l1b: open_backend, promote (preempt-and-abort), read, write", t0)
    t0 = time.monotonic()
    a.run("touch /run/klab-go && for i in $(seq 600); do "
          "grep -q 'stale write' /run/klab-a.out && exit 0; sleep 0.5; done; exit 1",
          timeout=400, check=False)  # fmt: skip
    out_a = a.run("cat /run/klab-a.out").stdout
    sc.step("l1a: the stale writer writes again", t0)
    keys = sc.pr[b.spec.host].read_keys()
    sc.finish()
    takeover = _json_lines(out_b)
    return BackendFencingRun(
        writer=tuple(_json_lines(out_a)),
        takeover=takeover[-1] if takeover else {},
        keys_after=tuple(format_key(k) for k in keys.keys),
        total_s=round(time.monotonic() - t_start, 2),
        steps=sc.steps,
    )


__all__ = ["BACKEND_SCRIPT", "BackendFencingRun", "run_backend_fencing"]
