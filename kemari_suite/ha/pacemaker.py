"""``replication.tiebreaker = "pacemaker"``: the cluster decides, Kemari follows.

Under Pacemaker the failover decision is the cluster's: Corosync's quorum (with
corosync-qdevice/qnetd as the third vote of a two-node cluster), STONITH, and the
promotion of the ``ocf:kemari:vm`` clone. This tiebreaker answers the agents'
questions (:class:`~kemari_suite.ha.witness.Decision`, like the witness and the lease)
from what the cluster decided::

    op        asked by                            granted when
    takeover  the standby, at heartbeat timeout;  Pacemaker promotes this node: a
              the standby, taking a switchover     promotion grant is in force (below)
    query     a failover, for staleness           always answered, never stale (the
                                                   cluster fences; see docs/pacemaker.md)
    renew     the primary, every heartbeat         this node's partition is not known to
    solo      the primary, its standby lost        be inquorate (``crm_node -q``)
    release,  the primary                         always (nothing to give back)
    paired

A *promotion grant* is a file, ``<run_dir>/ocf-<vm>.promote``, written only by the
resource agent that Pacemaker runs on this node: by its ``promote`` action, and by a
``pre`` notification of a transition that promotes this node (so that the standby may
take the switchover the peer's ``demote`` hands it). ``stop``, ``start`` and ``demote``
remove it, and it expires. Without it the standby's own heartbeat-timeout takeover is
refused ("Pacemaker decides"): Kemari never resumes a guest the cluster did not promote.

:func:`fencing_status` reads the CIB: a cluster without STONITH (``stonith-enabled``
false, or no ``stonith`` resource) is refused, because without fencing a cut cluster
link runs the guest twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree as ET

from kemari_suite.config import KemariConfig
from kemari_suite.errors import ConfigError, ConnectError
from kemari_suite.ha.witness import Decision, Op

_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
#: How long a quorum answer is reused: the primary renews every heartbeat interval.
QUORUM_TTL_S = 1.0


def grant_path(cfg: KemariConfig) -> Path:
    """Where the resource agent on this host records Pacemaker's promotion."""
    return cfg.paths.run_dir / f"ocf-{cfg.vm.name}.promote"


@dataclass(frozen=True)
class PromotionGrant:
    """Pacemaker promotes (or is about to promote) this node: written by the resource
    agent, valid until ``until`` (wall clock, seconds)."""

    node: str
    until: float
    why: str

    def valid(self, now: float) -> bool:
        return now < self.until

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"node": self.node, "until": self.until, "why": self.why}, f)
        tmp.replace(path)

    @classmethod
    def read(cls, path: Path) -> PromotionGrant | None:
        """The grant in ``path``; None when there is none or it is unreadable."""
        try:
            raw = json.loads(path.read_text())
            return cls(str(raw["node"]), float(raw["until"]), str(raw.get("why", "")))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    @staticmethod
    def clear(path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


# ---- the cluster's fencing ----------------------------------------------------------------


@dataclass(frozen=True)
class FencingStatus:
    """``stonith-enabled`` and the ``stonith`` resources in the CIB."""

    enabled: bool
    devices: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return self.enabled and bool(self.devices)

    def refusal(self) -> str:
        """Why protection is refused ("" when fencing is configured)."""
        if not self.enabled:
            return (
                "the cluster has stonith-enabled=false: without fencing a cut cluster link "
                "runs the guest twice; refusing to run protected under Pacemaker"
            )
        if not self.devices:
            return (
                "the cluster has no fencing device (no stonith resource in the CIB): "
                "refusing to run protected under Pacemaker"
            )
        return ""


Runner = Callable[[list[str]], subprocess.CompletedProcess[str]]


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    binary = shutil.which(argv[0], path=_PATH)
    if binary is None:
        raise FileNotFoundError(argv[0])
    return subprocess.run(
        [binary, *argv[1:]], capture_output=True, text=True, timeout=20, check=False
    )


def fencing_status(run: Runner = _run) -> FencingStatus:
    """Read the CIB of the cluster this host belongs to.

    Raises:
        ConnectError: no cluster answers (no tools, or the CIB cannot be read).
    """
    try:
        prop = run(["crm_attribute", "-t", "crm_config", "-n", "stonith-enabled", "-G", "-q"])
        res = run(["cibadmin", "-Q", "-o", "resources"])
    except (OSError, subprocess.TimeoutExpired) as err:
        raise ConnectError("pacemaker", f"cannot read the CIB: {err}") from err
    if res.returncode != 0:
        raise ConnectError("pacemaker", f"cibadmin: {(res.stderr or res.stdout).strip()[-300:]}")
    # An unset stonith-enabled means its default, true.
    value = prop.stdout.strip().lower() if prop.returncode == 0 else "true"
    enabled = value not in ("false", "no", "off", "0", "n")
    try:
        tree = ET.fromstring(res.stdout)
    except ET.ParseError as err:
        raise ConnectError("pacemaker", f"unreadable CIB resources: {err}") from err
    devices = tuple(str(p.get("id")) for p in tree.iter("primitive") if p.get("class") == "stonith")
    return FencingStatus(enabled, devices)


def require_fencing(run: Runner = _run) -> FencingStatus:
    """The cluster's fencing, when it has some.

    Raises:
        ConfigError: fencing is disabled or there is no fencing device, or no cluster
            answers.
    """
    key = "replication.tiebreaker"
    try:
        st = fencing_status(run)
    except ConnectError as err:
        raise ConfigError(
            f'tiebreaker = "pacemaker" but no cluster answers: {err}', key=key
        ) from err
    if not st.ok:
        raise ConfigError(st.refusal(), key=key)
    return st


# ---- quorum -------------------------------------------------------------------------------


async def crm_quorate(timeout: float = 5.0) -> bool:
    """``crm_node -q``: is this node's partition quorate?

    Raises:
        ConnectError: the tool is missing, fails, or does not answer in time.
    """
    binary = shutil.which("crm_node", path=_PATH)
    if binary is None:
        raise ConnectError("pacemaker", "no crm_node (pacemaker-cli-utils)")
    proc = await asyncio.create_subprocess_exec(
        binary, "-q", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError as exc:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise ConnectError("pacemaker", "crm_node -q did not answer") from exc
    text = out.decode(errors="replace").strip()
    if proc.returncode != 0 or text not in ("0", "1"):
        raise ConnectError("pacemaker", f"crm_node -q: {err.decode(errors='replace')[-200:]}")
    return text == "1"


class PacemakerTiebreaker:
    """The tiebreaker of ``tiebreaker = "pacemaker"``; see the module docstring."""

    def __init__(
        self,
        grant: Path,
        node_id: str,
        *,
        quorate: Callable[[], Awaitable[bool]] = crm_quorate,
        wall: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.grant = grant
        self.node_id = node_id
        self._quorate = quorate
        self.wall = wall
        self.clock = clock
        self.last_granted_sent: float | None = None
        self._quorum: tuple[float, bool] | None = None

    async def _is_quorate(self) -> bool:
        now = self.clock()
        if self._quorum is not None and now - self._quorum[0] < QUORUM_TTL_S:
            return self._quorum[1]
        value = bool(await self._quorate())
        self._quorum = (self.clock(), value)
        return value

    def _decision(self, granted: bool, reason: str) -> Decision:
        return Decision(granted, self.node_id if granted else None, 0, 0.0, reason)

    async def ask(self, op: Op) -> Decision:
        """Raises:
        ConnectError: the cluster does not answer (``renew`` and ``solo`` only).
        """
        sent = self.clock()
        if op == "takeover":
            g = PromotionGrant.read(self.grant)
            if g is None:
                return self._decision(False, "Pacemaker decides: this node is not promoted")
            if not g.valid(self.wall()):
                return self._decision(False, f"the promotion grant expired ({g.why})")
            return self._decision(True, f"Pacemaker promotes {g.node}: {g.why}")
        if op in ("renew", "solo"):
            if not await self._is_quorate():
                return self._decision(False, "this node's cluster partition has no quorum")
            self.last_granted_sent = sent
            return self._decision(True, "the cluster partition is quorate")
        if op == "query":
            return self._decision(False, "Pacemaker decides (and fences)")
        return self._decision(True, "nothing to do under Pacemaker")

    def lease_valid(self, lease_s: float, margin_s: float) -> bool:
        if self.last_granted_sent is None:
            return False
        return self.clock() < self.last_granted_sent + lease_s - margin_s


__all__ = [
    "FencingStatus",
    "PacemakerTiebreaker",
    "PromotionGrant",
    "crm_quorate",
    "fencing_status",
    "grant_path",
    "require_fencing",
]
