"""A protected VM on a lab host pair: agents started in the lab's namespaces.

:class:`LabPair` writes one config file per role, starts the witness (client
namespace), the secondary (``kemari standby``) and the primary (``kemari protect``) as
processes inside their namespaces, and gives the demo and the tests what they need:
status, the guest's counter over the network, fault injection, kills by PID, teardown.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
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
    role_run_dir,
    role_shm_dir,
)
from kemari_suite.lab.netclient import tcp_request
from kemari_suite.protocol.files import mkdir_owner_only, open_owner_only, write_owner_only
from kemari_suite.protocol.keys import generate_key
from kemari_suite.service import control

__all__ = ["COUNTER_PORT", "REPL_PORT", "WITNESS_PORT", "LabPair", "PairOptions"]


class LabPair:
    """Agents of one protected VM in a lab that is already up."""

    def __init__(self, lab: LabLayout, base: KemariConfig, opts: PairOptions) -> None:
        self.lab = lab
        self.base = base
        self.opts = opts
        #: The replication key, also in :attr:`key_file` (the configs name the file).
        self.key = generate_key()
        self.root = base.paths.run_dir / f"kemari-{lab.lab_id}-pair"
        mkdir_owner_only(self.root)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        written = labconfigs.write(lab, base, opts, self.root, key=self.key)
        self.configs: dict[str, Path] = written.configs
        self.key_file = written.key_file
        self.witness_key_file = written.witness_key_file

    # ---- configuration -----------------------------------------------------------------

    def run_dir(self, role: str) -> Path:
        return role_run_dir(self.base.paths, self.lab.lab_id, role)

    def shm_dir(self, role: str) -> Path:
        return role_shm_dir(self.base.paths, self.lab.lab_id, role)

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
        launch = labconfigs.launches(self.lab, self.configs)[0]
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
            self.lab.ns_for("primary" if role == "primary" else "secondary"),
            self.opts.env_secondary if role == "secondary" else self.opts.env_primary,
        )

    def start_primary(self) -> None:
        self._spawn(
            "primary",
            self._agent_args("protect", "primary"),
            self.lab.ns_primary,
            self.opts.env_primary,
        )
        # For KEMARI_FAULT_TARGET on the secondary: who to kill at its fault point.
        write_owner_only(self.primary_pidfile, f"{self.procs['primary'].pid}\n")

    @property
    def primary_pidfile(self) -> Path:
        return self.root / "primary.pid"

    def start(self) -> None:
        if self.opts.tiebreaker == "witness":
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
        data = tcp_request(self.lab.ns_client, self.lab.guest_ip, COUNTER_PORT, timeout=timeout)
        text = data.decode(errors="replace").strip()
        if not text.isdigit():
            raise ConnectError(f"{self.lab.guest_ip}:{COUNTER_PORT}", f"unexpected reply {text!r}")
        return int(text)

    def request(self, line: str, port: int = COUNTER_PORT, timeout: float = 5.0) -> str:
        """One line to a guest service from the client namespace; its one-line answer."""
        data = tcp_request(
            self.lab.ns_client, self.lab.guest_ip, port, (line + "\n").encode(), timeout=timeout
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
        raise ConnectError(f"{self.lab.guest_ip}:{COUNTER_PORT}", f"no counter: {err}")

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
