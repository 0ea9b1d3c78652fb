"""The one exception tree of Kemari Suite.

::

    KemariError
     +-- ConfigError(path, key, reason)         bad or missing configuration
     +-- SetupError(step, reason)               a required tool or package is missing
     +-- ImageError(step, reason)               building a guest image failed
     +-- VMError(vm, reason)                    QEMU could not be started or driven
     |    +-- QEMUStartError(vm, reason, stderr, returncode)
     |    +-- QMPCommandError(vm, command, reason)
     +-- LabError(lab_id, reason)               namespaces, veth, tc
     |    +-- LabInUseError(lab_id)
     +-- ConnectError(peer, reason)             a peer could not be reached
     +-- ProtocolError(reason, frame_type)      a malformed or forged frame on the link
     |    +-- AuthError(reason, frame_type)     HMAC or handshake failure
     +-- ReplicationError(epoch, reason)        a checkpoint could not be replicated
     +-- FailoverError(reason)                  a failover could not be completed or was refused
     +-- DiskError(backend, reason)
     |    +-- DrbdError(resource, command, rc, stderr)
     |    +-- LeaseError(device, reason)
     +-- TapError(tap, reason)                  NBD or network tap misuse
     +-- DeployError(host, task, reason)        Ansible or SSH operations
     +-- BenchmarkError(scenario, reason)
 +-- StateError(machine, old, new, reason)  a transition its lifecycle table forbids (a bug)

Every exception carries typed fields so that callers (and the CLI, the only place that
prints) can say exactly what went wrong. Causes are chained with ``raise ... from err``.
"""

from __future__ import annotations


class KemariError(Exception):
    """Root of every error this package raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(KemariError):
    """A configuration file or value is wrong."""

    def __init__(self, reason: str, *, path: str | None = None, key: str | None = None) -> None:
        where = ""
        if path:
            where += f"{path}: "
        if key:
            where += f"{key}: "
        super().__init__(f"{where}{reason}")
        self.path = path
        self.key = key
        self.reason = reason


class SetupError(KemariError):
    """A required tool, package or privilege is missing."""

    def __init__(self, step: str, reason: str) -> None:
        super().__init__(f"setup ({step}): {reason}")
        self.step = step
        self.reason = reason


class ImageError(KemariError):
    """A guest image could not be built."""

    def __init__(self, step: str, reason: str) -> None:
        super().__init__(f"image build ({step}): {reason}")
        self.step = step
        self.reason = reason


class VMError(KemariError):
    """A VM could not be started, driven or stopped."""

    def __init__(self, vm: str, reason: str) -> None:
        super().__init__(f"vm {vm}: {reason}")
        self.vm = vm
        self.reason = reason


class QEMUStartError(VMError):
    """QEMU exited or failed before its QMP socket answered."""

    def __init__(self, vm: str, reason: str, stderr: str = "", returncode: int | None = None):
        detail = reason
        if returncode is not None:
            detail += f" (exit code {returncode})"
        if stderr.strip():
            detail += f"\nQEMU said:\n{stderr.strip()}"
        super().__init__(vm, detail)
        self.stderr = stderr
        self.returncode = returncode


class QMPCommandError(VMError):
    """A QMP command returned an error or timed out."""

    def __init__(self, vm: str, command: str, reason: str) -> None:
        super().__init__(vm, f"QMP {command}: {reason}")
        self.command = command


class LabError(KemariError):
    """The local host-pair lab could not be built, inspected or torn down."""

    def __init__(self, lab_id: str, reason: str) -> None:
        super().__init__(f"lab {lab_id}: {reason}")
        self.lab_id = lab_id
        self.reason = reason


class LabInUseError(LabError):
    """A lab with this id already exists."""

    def __init__(self, lab_id: str) -> None:
        super().__init__(lab_id, "already in use (run `kemari lab down` first)")


class ConnectError(KemariError):
    """A peer (secondary, witness, SSH host) could not be reached."""

    def __init__(self, peer: str, reason: str) -> None:
        super().__init__(f"cannot reach {peer}: {reason}")
        self.peer = peer
        self.reason = reason


class ProtocolError(KemariError):
    """A malformed, truncated, out-of-order or unexpected frame on the replication link."""

    def __init__(self, reason: str, frame_type: int | None = None) -> None:
        where = f" (frame type {frame_type:#x})" if frame_type is not None else ""
        super().__init__(f"replication protocol: {reason}{where}")
        self.reason = reason
        self.frame_type = frame_type


class AuthError(ProtocolError):
    """A frame failed authentication (wrong key, forged or replayed)."""


class ReplicationError(KemariError):
    """A checkpoint could not be replicated or committed."""

    def __init__(self, reason: str, epoch: int | None = None) -> None:
        where = f"epoch {epoch}: " if epoch is not None else ""
        super().__init__(f"replication: {where}{reason}")
        self.epoch = epoch
        self.reason = reason


class FailoverError(KemariError):
    """A failover was refused (lost tiebreaker) or could not complete."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"failover: {reason}")
        self.reason = reason


class DiskError(KemariError):
    """A disk backend failed."""

    def __init__(self, backend: str, reason: str) -> None:
        super().__init__(f"disk ({backend}): {reason}")
        self.backend = backend
        self.reason = reason


class DrbdError(DiskError):
    """A drbd-utils command failed."""

    def __init__(self, resource: str, command: str, rc: int, stderr: str) -> None:
        super().__init__(
            "drbd", f"resource {resource}: `{command}` exited {rc}: {stderr.strip() or '-'}"
        )
        self.resource = resource
        self.command = command
        self.rc = rc
        self.stderr = stderr


class LeaseError(DiskError):
    """The shared-storage lease is held by another host or unreadable."""

    def __init__(self, device: str, reason: str) -> None:
        super().__init__("lease", f"{device}: {reason}")
        self.device = device


class TapError(KemariError):
    """An I/O tap (NBD block tap, network frame proxy) failed."""

    def __init__(self, tap: str, reason: str) -> None:
        super().__init__(f"tap {tap}: {reason}")
        self.tap = tap
        self.reason = reason


class DeployError(KemariError):
    """Provisioning or remote operation failed on a host."""

    def __init__(self, host: str, reason: str, task: str | None = None) -> None:
        where = f" task {task!r}" if task else ""
        super().__init__(f"host {host}{where}: {reason}")
        self.host = host
        self.task = task
        self.reason = reason


class BenchmarkError(KemariError):
    """A benchmark scenario failed or produced unusable output."""

    def __init__(self, scenario: str, reason: str) -> None:
        super().__init__(f"benchmark {scenario}: {reason}")
        self.scenario = scenario
        self.reason = reason


class StateError(KemariError):
    """An agent tried a state transition its lifecycle table does not allow."""

    def __init__(self, machine: str, old: str, new: str, reason: str = "") -> None:
        why = f" ({reason})" if reason else ""
        super().__init__(f"{machine}: {old} -> {new} is not an allowed transition{why}")
        self.machine = machine
        self.old = old
        self.new = new
        self.reason = reason
