"""A protected VM on a lab host pair: agents started in the lab's namespaces.

:class:`LabPair` writes one config file per role, starts the witness (client
namespace), the secondary (``kemari standby``) and the primary (``kemari protect``) as
processes inside their namespaces, and gives the demo and the tests what they need:
status, the guest's counter over the network, fault injection, kills by PID, teardown.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from kemari_suite.config import KemariConfig, dump_toml
from kemari_suite.errors import ConnectError, KemariError, LabError
from kemari_suite.lab import configs as labconfigs
from kemari_suite.lab.addressing import HostRole, LabLayout
from kemari_suite.lab.configs import (
    COUNTER_PORT,
    REPL_PORT,
    WITNESS_PORT,
    PairOptions,
    agent_run_dir,
    agent_shm_dir,
    role_shm_dir,
    several_options,
)
from kemari_suite.lab.lab import add_vm_taps
from kemari_suite.lab.netclient import tcp_request
from kemari_suite.protocol.files import mkdir_owner_only, open_owner_only, write_owner_only
from kemari_suite.protocol.keys import generate_key
from kemari_suite.service import control

__all__ = [
    "COUNTER_PORT",
    "REPL_PORT",
    "SEVERAL_HEARTBEAT_TIMEOUT_MS",
    "SEVERAL_MEMORY_MIB",
    "WITNESS_PORT",
    "HostLoss",
    "LabPair",
    "PairOptions",
    "after_host_loss",
    "kill_host",
    "several_pairs",
]


class LabPair:
    """Agents of one protected VM in a lab that is already up."""

    def __init__(self, lab: LabLayout, base: KemariConfig, opts: PairOptions) -> None:
        self.lab = lab
        self.base = base
        self.opts = opts
        #: The replication key, also in :attr:`key_file` (the configs name the file).
        self.key = generate_key()
        self.root = base.paths.run_dir / f"kemari-{lab.lab_id}-pair"
        if opts.slotted:
            self.root = self.root / opts.vm_name
        #: The VM's guest address, MAC, TAPs and ports on the lab.
        self.addresses = opts.addresses(lab)
        mkdir_owner_only(self.root)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        written = labconfigs.write(lab, base, opts, self.root, key=self.key)
        self.configs: dict[str, Path] = written.configs
        self.key_file = written.key_file
        self.witness_key_file = written.witness_key_file

    # ---- configuration -----------------------------------------------------------------

    def run_dir(self, role: str) -> Path:
        return agent_run_dir(self.base.paths, self.lab.lab_id, self.opts, role)

    def shm_dir(self, role: str) -> Path:
        if role == "witness":
            return role_shm_dir(self.base.paths, self.lab.lab_id, role)
        return agent_shm_dir(self.base.paths, self.lab.lab_id, self.opts, role)

    def namespace(self, role: str) -> str:
        """The namespace (lab host) the agent of ``role`` runs in."""
        return self.lab.ns_for(self.opts.host_of(role))

    @property
    def guest_ip(self) -> str:
        return self.addresses.guest_ip

    # ---- processes ---------------------------------------------------------------------

    def _spawn(self, role: str, args: list[str], ns: str, env: dict[str, str]) -> None:
        log = open_owner_only(self.root / f"{role}.out", "ab")
        argv = ["ip", "netns", "exec", ns, sys.executable, "-m", "kemari_suite.cli.main", *args]
        self.procs[role] = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "KEMARI_FAULTS": "1", **env},
            start_new_session=True,
        )
        log.close()

    def start_witness(self) -> None:
        launch = labconfigs.launches(self.lab, self.configs, self.opts)[0]
        self._spawn("witness", list(launch.args), launch.namespace, {})

    #: Host names in a lab VM definition, by role.
    HOSTS = {"primary": "a", "secondary": "b"}

    def _agent_args(self, command: str, role: str) -> list[str]:
        if self.opts.vm_definition:
            return [command, "--vm", self.opts.vm_definition, "--host", self.HOSTS[role]]
        return [command, "-c", str(self.configs[role])]

    def start_secondary(self) -> None:
        self.start_standby_on("secondary")

    def start_standby_on(self, role: str) -> None:
        """Start (or restart, after a kill) the host ``role`` as a standby."""
        self._spawn(
            role,
            self._agent_args("standby", role),
            self.namespace(role),
            self.opts.env_secondary if role == "secondary" else self.opts.env_primary,
        )

    def start_primary(self) -> None:
        self._spawn(
            "primary",
            self._agent_args("protect", "primary"),
            self.namespace("primary"),
            self.opts.env_primary,
        )
        # For KEMARI_FAULT_TARGET on the secondary: who to kill at its fault point.
        write_owner_only(self.primary_pidfile, f"{self.procs['primary'].pid}\n")

    @property
    def primary_pidfile(self) -> Path:
        return self.root / "primary.pid"

    def start(self, *, witness: bool = True) -> None:
        """Start the agents: the witness (unless ``witness`` is False: one witness
        already serves the lab), the standby, and once it answers, the primary."""
        if self.opts.tiebreaker == "witness" and witness:
            self.start_witness()
        self.start_secondary()
        self.wait_control("secondary", 60)
        self.start_primary()

    def control_path(self, role: str) -> Path:
        return self.run_dir(role) / f"kemari-{self.opts.vm_name}" / "control.sock"

    def console_path(self, role: str) -> Path:
        return self.run_dir(role) / f"kemari-{self.opts.vm_name}" / "console.log"

    def artifact_records(self, role: str, name: str) -> list[dict[str, Any]]:
        """Every record of ``role``'s ``name`` (``events.jsonl``, ``checkpoints.jsonl``)
        over all its runs, oldest run first; unreadable lines are skipped."""
        records: list[dict[str, Any]] = []
        for path in sorted((self.run_dir(role) / "artifacts").glob(f"*/{name}")):
            with contextlib.suppress(OSError):
                for line in path.read_text().splitlines():
                    with contextlib.suppress(ValueError):
                        rec = json.loads(line)
                        if isinstance(rec, dict):
                            records.append(rec)
        return records

    def output(self, role: str) -> str:
        try:
            return (self.root / f"{role}.out").read_text(errors="replace")
        except OSError:
            return ""

    def alive(self, role: str) -> bool:
        p = self.procs.get(role)
        return p is not None and p.poll() is None

    def status(self, role: str, timeout: float = 10.0) -> dict[str, Any]:
        result = control.request(self.control_path(role), "status", timeout=timeout)
        assert isinstance(result, dict)
        return result

    def wait_control(self, role: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive(role):
                raise LabError(self.lab.lab_id, f"{role} exited:\n{self.output(role)[-3000:]}")
            try:
                self.status(role, timeout=2)
                return
            except (ConnectError, KemariError):
                time.sleep(0.1)
        raise LabError(self.lab.lab_id, f"{role} control socket did not answer in {timeout} s")

    def wait_state(self, role: str, states: set[str], timeout: float) -> dict[str, Any]:
        """Poll ``role``'s status until its state is one of ``states``."""
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            if not self.alive(role):
                raise LabError(
                    self.lab.lab_id,
                    f"{role} exited while waiting for {sorted(states)}:\n"
                    + self.output(role)[-3000:],
                )
            with contextlib.suppress(ConnectError, KemariError):
                last = self.status(role, timeout=2)
                if last.get("state") in states:
                    return last
            time.sleep(0.1)
        raise LabError(
            self.lab.lab_id,
            f"{role} not in {sorted(states)} after {timeout} s (last: {last.get('state')}, "
            f"{last.get('reason', '')})\n{self.output(role)[-2000:]}",
        )

    def read_counter(self, timeout: float = 3.0) -> int:
        """The guest's counter, over the LAN from the client namespace."""
        data = tcp_request(self.lab.ns_client, self.guest_ip, COUNTER_PORT, timeout=timeout)
        text = data.decode(errors="replace").strip()
        if not text.isdigit():
            raise ConnectError(f"{self.guest_ip}:{COUNTER_PORT}", f"unexpected reply {text!r}")
        return int(text)

    def request(self, line: str, port: int = COUNTER_PORT, timeout: float = 5.0) -> str:
        """One line to a guest service from the client namespace; its one-line answer."""
        data = tcp_request(
            self.lab.ns_client, self.guest_ip, port, (line + "\n").encode(), timeout=timeout
        )
        return data.decode(errors="replace").strip()

    def wait_counter(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        err: Exception | None = None
        while time.monotonic() < deadline:
            try:
                return self.read_counter()
            except ConnectError as e:
                err = e
                time.sleep(0.2)
        raise ConnectError(f"{self.guest_ip}:{COUNTER_PORT}", f"no counter: {err}")

    def settle(self, epochs: int = 3, timeout: float = 60) -> int:
        """Wait until the primary committed ``epochs`` more checkpoints; returns the last.

        After the guest's workload first answers, its state is in a *committed*
        checkpoint only once the next epochs are acknowledged.
        """
        start = int(self.status("primary")["last_committed_epoch"])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            now = int(self.status("primary")["last_committed_epoch"])
            if now >= start + epochs:
                return now
            time.sleep(0.05)
        raise LabError(self.lab.lab_id, f"no {epochs} checkpoints committed in {timeout} s")

    def write_vm_definition(
        self,
        *,
        kernel: Path,
        initrd: Path,
        cmdline: str,
        disk_a: Path,
        disk_b: Path,
        reprotect: bool = True,
        accel: str = "tcg",
    ) -> Path:
        """A VM definition for this lab's two hosts (a = primary, b = secondary); sets
        ``opts.vm_definition`` to it. Each host has its own disk image and TAP."""
        lab, o = self.lab, self.opts
        rep: dict[str, Any] = {
            "key_file": str(self.key_file),
            "mode": o.mode,
            "max_interval_ms": o.max_interval_ms,
            "heartbeat_interval_ms": o.heartbeat_interval_ms,
            "heartbeat_timeout_ms": o.heartbeat_timeout_ms,
            "tiebreaker": o.tiebreaker,
            "reprotect": reprotect,
        }
        if o.tiebreaker == "witness":
            rep["witness"] = f"{lab.lan_client_ip}:{WITNESS_PORT}"
            rep["witness_key_file"] = str(self.witness_key_file)
        hosts: dict[str, Any] = {}
        for role, host in self.HOSTS.items():
            hrole: HostRole = "primary" if role == "primary" else "secondary"
            hosts[host] = {
                "address": lab.repl_primary_ip if role == "primary" else lab.repl_secondary_ip,
                "port": REPL_PORT,
                "netns": lab.ns_for(hrole),
                "paths": {
                    "cache_dir": str(self.base.paths.cache_dir),
                    "run_dir": str(self.run_dir(role)),
                    "shm_dir": str(self.shm_dir(role)),
                },
                "disk": {"root": {"path": str(disk_a if role == "primary" else disk_b)}},
                "nic": {"0": {"tap": lab.tap_for(hrole)}},
            }
        definition: dict[str, Any] = {
            "name": o.vm_name,
            "machine": "pc-i440fx-7.2",
            "vcpus": o.vcpus,
            "memory_mib": o.memory_mib,
            "accel": accel,
            "display": "none",
            "boot": {"kernel": str(kernel), "initrd": str(initrd), "cmdline": cmdline},
            "disk": [{"name": "root", "path": str(disk_a), "backend": "builtin"}],
            "nic": [
                {
                    "mac": "52:54:00:12:34:56",
                    "model": "virtio-net-pci",
                    "tap": lab.tap_for("primary"),
                    "ip": f"{lab.guest_ip}/{lab.lan_prefix}",
                }
            ],
            "replication": rep,
            "tap": {
                "policy": o.policy,
                "remus_interval_ms": o.remus_interval_ms,
                "adaptive_min_spacing_ms": o.adaptive_min_spacing_ms,
            },
            **({"alerts": {"hook": o.alert_hook}} if o.alert_hook else {}),
            "hosts": hosts,
        }
        text = dump_toml(definition)
        path = write_owner_only(self.root / "vm.toml", text)
        self.opts.vm_definition = str(path)
        return path

    def switchover(self, role: str = "primary", timeout: float = 120.0) -> dict[str, Any]:
        """Planned switchover asked of the host ``role`` (the one running the VM)."""
        result = control.request(self.control_path(role), "switchover", timeout=timeout)
        assert isinstance(result, dict)
        return result

    def qemu_pid(self, role: str) -> int | None:
        pidfile = self.run_dir(role) / f"kemari-{self.opts.vm_name}" / "qemu.pid"
        try:
            return int(pidfile.read_text().strip())
        except (OSError, ValueError):
            return None

    def arm_fault(
        self, role: str, point: str, count: int = 1, *, target: str = "", action: str = "kill"
    ) -> None:
        """Arm a fault-injection point in a running agent (``action``: see
        :mod:`kemari_suite.testing.faults`)."""
        control.request(
            self.control_path(role),
            "fault",
            point=point,
            count=count,
            target=target,
            action=action,
        )

    def kill(self, role: str) -> None:
        """SIGKILL the agent of ``role`` and its QEMU, by PID."""
        qpid = self.qemu_pid(role)
        p = self.procs.get(role)
        if p is not None and p.poll() is None:
            # The agent runs under `ip netns exec`, which execs: the PID is the agent's.
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
            p.wait(10)
        if qpid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(qpid, signal.SIGKILL)

    def wait_exit(self, role: str, timeout: float) -> int | None:
        p = self.procs.get(role)
        if p is None:
            return None
        try:
            return p.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        """Stop every agent (SIGTERM, then SIGKILL) and remove the pair's files."""
        for p in self.procs.values():
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(max(0.1, deadline - time.monotonic()))
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                p.wait(5)
        for role in ("primary", "secondary"):
            qpid = self.qemu_pid(role)
            if qpid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(qpid, signal.SIGKILL)
        for role in ("primary", "secondary", "witness"):
            shutil.rmtree(self.shm_dir(role), ignore_errors=True)
        self.procs.clear()


# --------------------------------------------------------------------------- several VMs

#: A guest's RAM when several share the lab: N of them boot at once under TCG on a
#: shared machine (the multi-VM demo and benchmark).
SEVERAL_MEMORY_MIB = 96
#: The heartbeat timeout floor with several guests: several TCG guests on two loaded
#: cores must not take a slow heartbeat for a lost host.
SEVERAL_HEARTBEAT_TIMEOUT_MS = 3000


def several_pairs(
    lab: LabLayout, base: KemariConfig, template: PairOptions, names: list[str], on_b: int
) -> list[LabPair]:
    """One :class:`LabPair` per VM of ``names`` on ``lab``, from ``template`` (with
    ``slotted`` options: addresses, ports and folders from each name), the last
    ``on_b`` with their primary on host B (``reverse``), all with one witness folder of
    pair keys; gives each VM its TAPs. Start the witness once (``start_witness`` of the
    first), then each pair's agents.

    Raises:
        LabError: two names clash (:func:`~kemari_suite.lab.addressing.vm_slots`), or a
            TAP cannot be made.
    """
    keys_dir = base.paths.run_dir / f"kemari-{lab.lab_id}-pair" / "witness.d"
    options = several_options(template, names, on_b=on_b, witness_keys_dir=keys_dir)
    pairs = [LabPair(lab, base, opts) for opts in options]
    add_vm_taps(lab, [p.addresses for p in pairs])
    return pairs


# --------------------------------------------------------------------------- host loss


@dataclasses.dataclass
class HostLoss:
    """What became of one VM of a lab pair after the loss of a host (:func:`kill_host`).

    ``records_lost``: counter values the client read before the loss (acknowledged:
    output commit released them) that the VM no longer has, i.e. the highest value
    read before minus the first read after, when that is lower; 0 otherwise, None when
    the VM never answered after the loss.
    """

    name: str
    #: The lab host its primary ran on before the kill ("primary" = A, "secondary" = B).
    primary_host: str
    #: "failed_over": its primary was on the killed host and its standby resumed it;
    #: "unprotected": its standby was on the killed host, its primary went on alone.
    outcome: str
    #: Served its counter over the LAN after the kill, with no record lost, by an agent
    #: still alive.
    resumed: bool = False
    #: The agent serving it after the kill, and that agent's state.
    role: str = ""
    state: str = ""
    #: Median sync-point pause of its primary before the kill, and how many there were.
    pause_ms_p50: float | None = None
    checkpoints: int = 0
    records_lost: int | None = None
    counter_before_kill: int | None = None
    counter_after: int | None = None
    failover_ms: float | None = None
    guest_ip: str = ""


def kill_host(pairs: list[LabPair], victim: HostRole) -> None:
    """The loss of lab host ``victim``: SIGKILL, by PID, of every agent of ``pairs`` in
    its namespace and their QEMUs (primaries running there, standbys of the others)."""
    for p in pairs:
        p.kill("primary" if p.opts.host_of("primary") == victim else "secondary")


def after_host_loss(pair: LabPair, before: int | None, victim: HostRole) -> HostLoss:
    """Wait (bounded) until ``pair``'s VM is served again after :func:`kill_host` of
    ``victim``: by its standby, resumed (``active``), when its primary was there; else by
    its primary, alone (``unprotected``). ``before``: the highest counter the client
    read before the kill. Never raises for the VM: what did not happen stays None."""
    failed_over = pair.opts.host_of("primary") == victim
    role = "secondary" if failed_over else "primary"
    v = HostLoss(
        name=pair.opts.vm_name,
        primary_host=pair.opts.host_of("primary"),
        outcome="failed_over" if failed_over else "unprotected",
        role=role,
        counter_before_kill=before,
        guest_ip=pair.guest_ip,
    )
    pauses: list[float] = []
    for rec in pair.artifact_records("primary", "checkpoints.jsonl"):
        with contextlib.suppress(TypeError, ValueError, KeyError):
            pauses.append(float(rec["pause_ms"]))
    v.pause_ms_p50 = statistics.median(pauses) if pauses else None
    v.checkpoints = len(pauses)
    timeout = pair.opts.heartbeat_timeout_ms / 1000 + 120
    with contextlib.suppress(KemariError):
        if failed_over:
            st = pair.wait_state("secondary", {"active"}, timeout)
            v.failover_ms = (st.get("failover") or {}).get("failover_ms")
        else:
            # Alone: once the standby's heartbeat is gone, it runs on unprotected.
            st = pair.wait_state("primary", {"unprotected"}, timeout)
        v.state = str(st.get("state", ""))
    with contextlib.suppress(KemariError):
        v.counter_after = pair.wait_counter(60)
    if v.counter_after is not None:
        v.records_lost = max(0, before - v.counter_after) if before is not None else 0
        v.resumed = pair.alive(role) and v.records_lost == 0
    return v
