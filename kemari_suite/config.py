"""Configuration: a tree of frozen dataclasses, loaded from TOML, every default here.

A config file mirrors the tree::

    [vm]
    name = "web1"
    memory_mib = 128

    [replication]
    max_interval_ms = 1000

Unknown keys and values of the wrong type are rejected with a ``ConfigError`` naming the
file and the key: a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

from kemari_suite.errors import ConfigError

Accel = Literal["auto", "tcg", "kvm"]
LinkProfileName = Literal["1g", "10g", "unlimited"]
SyncMode = Literal["speculative", "classic"]
TrackerKind = Literal["auto", "uffd-wp", "soft-dirty", "compare"]
Compression = Literal["zstd", "lz4", "none"]
SyncPolicy = Literal["output", "kemari", "remus", "adaptive"]
Tiebreaker = Literal["none", "witness", "lease", "pacemaker"]
DiskBackendKind = Literal["builtin", "drbd", "shared"]
DiskFencing = Literal["", "scsi-pr"]
CommitProbe = Literal["", "stream"]
DisplayKind = Literal["none", "std", "virtio", "qxl"]
TlsMode = Literal["on", "off"]


def _env_path(var: str, default: str) -> Path:
    return Path(os.environ.get(var, default))


@dataclass(frozen=True)
class PathsConfig:
    """Where the suite keeps its files."""

    #: Cached downloads and built guest images (kernel packages, initramfs).
    cache_dir: Path = field(default_factory=lambda: _env_path("KEMARI_CACHE", "/var/cache/kemari"))
    #: Per-run state: QMP sockets, pid files, console logs, artifact folders.
    run_dir: Path = field(default_factory=lambda: _env_path("KEMARI_RUN", "/run/kemari"))
    #: Where guest RAM files live (must be a tmpfs so the agent can map them cheaply).
    shm_dir: Path = field(default_factory=lambda: _env_path("KEMARI_SHM", "/dev/shm"))


@dataclass(frozen=True)
class ImageConfig:
    """The guest image to boot (built by ``kemari image build``)."""

    #: Debian kernel package (meta-package names are resolved to a versioned package).
    kernel_package: str = "linux-image-cloud-amd64"
    #: Extra files for the initramfs, as "SRC:DEST" strings.
    add: tuple[str, ...] = ()
    #: Command run by init after the modules are loaded and the network is up.
    init: str = ""
    #: Prebuilt kernel and initramfs; when empty, ``kemari image build`` output is used.
    kernel: str = ""
    initrd: str = ""


@dataclass(frozen=True)
class VMConfig:
    """One protected VM. The QEMU command line is derived from this, identically on both hosts."""

    name: str = "kemari0"
    memory_mib: int = 128
    vcpus: int = 1
    #: Pinned machine type: the secondary must start exactly the same machine.
    machine: str = "pc-i440fx-7.2"
    #: "auto" picks KVM only when it can run a stock guest, TCG otherwise.
    accel: Accel = "auto"
    #: Extra kernel command line for the guest.
    append: str = ""
    #: Guest MAC address (locally administered).
    mac: str = "52:54:00:12:34:56"
    #: The guest NIC's QEMU ``-netdev`` backend, without id (e.g.
    #: "tap,ifname=ktap0,script=no,downscript=no"); empty for no NIC.
    netdev: str = ""
    #: Network namespace QEMU runs in (the lab's host namespaces); empty for the current.
    netns: str = ""
    #: Guest eth0 address "A.B.C.D/NN" (passed on the kernel command line).
    ip: str = ""
    #: Command the guest's init runs (kernel command line; overrides the image's).
    run: str = ""
    #: Emulated display: "none" (recommended), or "std", "virtio", "qxl", whose video
    #: memory lies outside the shared RAM file and so travels in full in every
    #: device-state capture (see docs/sizing.md).
    display: DisplayKind = "none"
    #: The NIC given by ``netdev`` reaches the outside without output commit, and the
    #: operator accepts that: protect starts anyway, ``kemari status`` shows it and an
    #: alert is raised. Off: an untapped NIC is refused (use ``tap.host_tap``).
    unprotected_output: bool = False
    #: Run QEMU with ``-sandbox on`` (seccomp: no new processes, no privilege changes).
    sandbox: bool = True
    #: Run QEMU as this user (``-runas``) once it has opened its files; empty: as the agent.
    runas: str = ""
    #: Timeout for the QMP commands of the stopped window (stop, cont, capture). A QEMU
    #: that does not answer in time is killed and counted as a host failure.
    qmp_timeout_ms: int = 5000


@dataclass(frozen=True)
class LabConfig:
    """The local host pair built from network namespaces."""

    lab_id: str = "0"
    profile: LinkProfileName = "1g"


@dataclass(frozen=True)
class ReplicationConfig:
    """The memory and device-state replication engine."""

    #: Pre-shared key for HMAC-SHA256 on every frame (at least 32 bytes). Prefer
    #: ``key_file``; empty with no key file means: refuse to start.
    key: str = ""
    #: File holding the pre-shared key (``kemari key generate`` writes one). It must be
    #: readable by its owner alone; a group- or world-readable key file is refused.
    key_file: str = ""
    #: TLS 1.3 on the replication link (encryption; peers still authenticate with the
    #: pre-shared key). "off" leaves frames MAC-protected but readable on the wire.
    tls: TlsMode = "on"
    #: Address of the secondary's replication listener (host:port) as seen from the primary.
    peer: str = ""
    #: This host's own replication address (host:port); must be set: never every
    #: address by default (an explicit 0.0.0.0:7410 is taken, with a warning).
    listen: str = ""
    #: speculative resumes the VM right after staging; classic waits for the acknowledgement.
    mode: SyncMode = "speculative"
    #: Dirty-page tracker: "auto" probes uffd-wp (Linux 6.7+, a helper loaded into
    #: QEMU), then soft-dirty, then compare (works everywhere; 3x guest RAM beside it).
    tracker: TrackerKind = "auto"
    #: Check the tracker against the compare tracker at every scan and fail on any page
    #: it missed (costs what compare costs). For tests and diagnosis.
    tracker_verify: bool = False
    compression: Compression = "zstd"
    #: A sync point is forced after this long without one. It bounds how much guest
    #: work a failover redoes and how big an epoch grows, not safety (output waits for
    #: its checkpoint whatever the interval). 1000 ms: the shortest interval at which
    #: a CPU-bound guest kept every lmbench ratio within 1.05 and below the seed's
    #: (``kemari bench interval``, benchmarks/results/interval/sweep.md).
    max_interval_ms: int = 1000
    #: Background pre-copy of dirty pages between sync points: true, false, or "auto"
    #: (the default): on with a tracker whose scan follows the dirty set (uffd-wp; it
    #: shortened the pause and kept more throughput in benchmarks/results/memsync.md),
    #: off with a tracker that compares a shadow (compare, soft-dirty), where the second
    #: scan per epoch took more guest throughput than it saved on two cores.
    pipelining: bool | Literal["auto"] = "auto"
    #: With pre-copy on, a pass every this many ms (at least 10) until the sync point,
    #: so the stop stages only what changed since the last; 0: one pass, half-way.
    #: Chosen by ``kemari bench sizing`` and ``kemari bench memsync`` (docs/sizing.md).
    precopy_period_ms: int = 25
    #: Run the compare tracker's stop-time scan beside QEMU's device-state capture (the
    #: pause came out about 7% shorter for 128 MiB on two cores). Off only for A/B
    #: measurements; trackers that must scan after the capture ignore it.
    overlap_scan: bool = True
    #: With a tracker that can (uffd-wp), also stage beside the capture and rescan after
    #: it; "auto": for guests up to 1 GiB (``kemari bench sizing``; docs/sizing.md).
    stage_during_capture: bool | Literal["auto"] = "auto"
    #: How often each side tells the other it lives, and the primary renews its lease.
    heartbeat_interval_ms: int = 100
    #: How long the standby waits without a frame before it asks the tiebreaker for the
    #: takeover; also the lease period. A client waits about this plus 0.6 s after a
    #: host dies (the resume, then the guest's own TCP retransmission): 800 ms keeps
    #: that under 1.5 s p50 in the lab, and a 30-minute soak under load showed no false
    #: failover (benchmarks/results/service.md, docs/arbitration.md). A stalled standby
    #: cannot fail over alone: the tiebreaker refuses while the primary renews. With
    #: ``tiebreaker = "none"`` a timeout only makes the standby ask for an operator.
    heartbeat_timeout_ms: int = 800
    #: Who decides a takeover: "witness", "lease", "pacemaker" (the cluster promotes
    #: the ``ocf:kemari:vm`` clone; docs/pacemaker.md) or "none" (an operator).
    tiebreaker: Tiebreaker = "none"
    #: After a failover, protect the VM again from this host as soon as a standby
    #: answers at ``peer`` (the failed host, repaired and restarted as a standby). Off:
    #: the survivor runs the VM unprotected until an operator moves it.
    reprotect: bool = False
    #: This host's name at the tiebreaker, the same whatever role it runs. Empty: the
    #: address of ``listen``, else the host name (``ha/tiebreak.node_identity``).
    node_id: str = ""
    #: host:port of the witness when ``tiebreaker = "witness"``.
    witness: str = ""
    #: This pair's key at the witness (its own, never the replication key).
    witness_key_file: str = ""
    #: While output is held with no peer (HELD), buffered guest writes beyond this pause
    #: the guest and raise an alert instead of growing until the agent is killed.
    held_limit_mib: int = 256


@dataclass(frozen=True)
class WitnessConfig:
    """The witness (``kemari witness``): a tiebreaker both hosts of each pair reach."""

    #: host:port to listen on; must be set (never all addresses by default).
    listen: str = ""
    #: The lease table (pairs, paired or solo, holder, generation), fsynced before any
    #: reply so that a restart never forgets a grant.
    state_file: Path = Path("/var/lib/kemari/witness.json")
    #: Folder of per-pair key files, ``<pair>.key``, each readable by its owner alone.
    keys_dir: Path = Path("/etc/kemari/witness.d")


@dataclass(frozen=True)
class TapConfig:
    """Event taps and the sync policy they drive."""

    #: "output" (the default) syncs where output becomes visible: at each frame the
    #: guest sends, never for a disk write or flush (they ride the open epoch; see
    #: docs/sync-policy.md, "Why disk writes need no sync point of their own").
    #: "kemari" is the seed's rule, a sync at every outbound I/O, disk included. "remus":
    #: fixed epochs of ``remus_interval_ms``. "adaptive": event-driven, minimum spacing.
    policy: SyncPolicy = "output"
    #: A sync point is due once the open epoch has logged this many MiB of disk writes
    #: (it bounds the primary's memory and the standby's replay, whatever the policy).
    epoch_log_limit_mib: int = 8
    #: Epoch length for the remus policy.
    remus_interval_ms: int = 25
    #: Minimum spacing between event-triggered sync points for the adaptive policy.
    adaptive_min_spacing_ms: int = 5
    #: Host TAP device (or bridge port) the network frame proxy puts the guest's frames
    #: on. When set, the guest NIC goes through the proxy and its output is committed.
    host_tap: str = ""
    #: Held output beyond this is dropped and counted (never a reason to stop reading).
    hold_limit_mib: int = 16


@dataclass(frozen=True)
class DiskConfig:
    """The disk consistency backend."""

    backend: DiskBackendKind = "builtin"
    #: Guest disk image (raw). Empty means the VM has no disk.
    path: str = ""
    size_mib: int = 64
    #: Device or file holding the shared-storage lease (``replication.tiebreaker =
    #: "lease"``): an FC LUN or iSCSI disk both hosts see, or a file on shared storage.
    lease_device: str = ""
    #: Byte offset of the 4 KiB lease block on that device.
    lease_offset: int = 0
    #: How a shared disk fences the old writer: "" (the lease when
    #: ``replication.tiebreaker = "lease"``, else the tiebreaker alone) or "scsi-pr":
    #: SCSI-3 persistent reservations on the LUN at ``path`` (sg3-utils' sg_persist), as
    #: fence_scsi does; the standby preempts-and-aborts the old writer's key at failover.
    fencing: DiskFencing = ""


@dataclass(frozen=True)
class AlertConfig:
    """Where the events an operator must hear about go (besides ``kemari status``).

    Alerts are: the VM became unprotected, a failover ran (or failed), a failover was
    refused (split brain, diverged disks, no tiebreaker), protection was (re)gained, and a
    switchover. Each goes to the system log and, when ``hook`` is set, to that command.
    """

    #: Command run for every alert (split like a shell would, never through a shell). It
    #: gets the alert as one JSON object on stdin and as KEMARI_ALERT_* environment
    #: variables. A failing or hanging hook is logged and never affects the VM.
    hook: str = ""
    #: The hook is killed after this long.
    hook_timeout_ms: int = 10000
    #: Also send every alert to the system log (/dev/log), facility daemon.
    syslog: bool = True


@dataclass(frozen=True)
class MetricsConfig:
    """The agent's Prometheus exporter (``/metrics``; see docs/prometheus.md)."""

    #: host:port to serve ``/metrics`` on, e.g. "10.0.0.1:9410"; empty (the default):
    #: no exporter. An explicit 0.0.0.0 or [::] serves every address, with a warning.
    listen: str = ""


@dataclass(frozen=True)
class TestingConfig:
    """Test instruments that production leaves off."""

    #: Record, at every commit on the secondary, the value of the guest's probe with this
    #: marker as read from the replica (``stream``: the stream workload's probe) into
    #: ``commits.jsonl``: independent evidence of what a committed state may have sent.
    commit_probe: CommitProbe = ""


@dataclass(frozen=True)
class KemariConfig:
    """The whole configuration tree."""

    paths: PathsConfig = field(default_factory=PathsConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    vm: VMConfig = field(default_factory=VMConfig)
    lab: LabConfig = field(default_factory=LabConfig)
    replication: ReplicationConfig = field(default_factory=ReplicationConfig)
    tap: TapConfig = field(default_factory=TapConfig)
    disk: DiskConfig = field(default_factory=DiskConfig)
    witness: WitnessConfig = field(default_factory=WitnessConfig)
    alerts: AlertConfig = field(default_factory=AlertConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    testing: TestingConfig = field(default_factory=TestingConfig)


T = TypeVar("T")


def _coerce(value: Any, tp: Any, *, path: str | None, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert where TOML cannot say it."""
    origin = get_origin(tp)
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(
                f"{value!r} is not one of {', '.join(repr(a) for a in allowed)}", path=path, key=key
            )
        return value
    if origin in (typing.Union, types.UnionType):
        errors: list[str] = []
        for arm in get_args(tp):
            try:
                return _coerce(value, arm, path=path, key=key)
            except ConfigError as err:
                errors.append(err.reason)
        raise ConfigError("; ".join(errors), path=path, key=key)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"expected a list, got {type(value).__name__}", path=path, key=key)
        (item_tp, _ellipsis) = get_args(tp)
        return tuple(_coerce(v, item_tp, path=path, key=key) for v in value)
    if tp is Path:
        if not isinstance(value, str):
            raise ConfigError(f"expected a path string, got {value!r}", path=path, key=key)
        return Path(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"expected true or false, got {value!r}", path=path, key=key)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"expected an integer, got {value!r}", path=path, key=key)
        if value < 0:
            raise ConfigError(f"must not be negative, got {value}", path=path, key=key)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"expected a number, got {value!r}", path=path, key=key)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"expected a string, got {value!r}", path=path, key=key)
        return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, dict):
            raise ConfigError(f"expected a table, got {value!r}", path=path, key=key)
        return build(tp, value, path=path, prefix=key)
    raise ConfigError(f"unsupported config type {tp!r}", path=path, key=key)  # pragma: no cover


def build(cls: type[T], data: dict[str, Any], *, path: str | None = None, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys.

    Raises:
        ConfigError: naming the file and dotted key of the first bad value.
    """
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if key not in names:
            raise ConfigError(
                f"unknown key (known: {', '.join(sorted(names))})", path=path, key=dotted
            )
        kwargs[key] = _coerce(value, hints[key], path=path, key=dotted)
    obj = cls(**kwargs)
    _validate(obj, path=path, prefix=prefix)
    return obj


def _validate(obj: Any, *, path: str | None, prefix: str) -> None:
    """Cross-field checks that types alone cannot express."""
    if isinstance(obj, VMConfig):
        if obj.memory_mib < 16:
            raise ConfigError("must be at least 16", path=path, key=f"{prefix}.memory_mib")
        if not 1 <= obj.vcpus <= 64:
            raise ConfigError("must be between 1 and 64", path=path, key=f"{prefix}.vcpus")
        if not obj.name or not all(c.isalnum() or c in "-_" for c in obj.name):
            raise ConfigError(
                "must be non-empty letters, digits, '-' or '_'", path=path, key=f"{prefix}.name"
            )
        if obj.qmp_timeout_ms < 100:
            raise ConfigError(
                "must be at least 100 (a shorter QMP timeout kills healthy guests)",
                path=path,
                key=f"{prefix}.qmp_timeout_ms",
            )
    if isinstance(obj, ReplicationConfig):
        if obj.heartbeat_timeout_ms <= obj.heartbeat_interval_ms:
            raise ConfigError(
                "must be larger than heartbeat_interval_ms",
                path=path,
                key=f"{prefix}.heartbeat_timeout_ms",
            )
        if obj.tiebreaker == "witness" and not obj.witness:
            raise ConfigError(
                'tiebreaker = "witness" needs a witness address', path=path, key=f"{prefix}.witness"
            )
        if obj.precopy_period_ms and obj.precopy_period_ms < 10:
            raise ConfigError(
                "must be 0 (once, half-way) or at least 10 (ms between pre-copy passes)",
                path=path,
                key=f"{prefix}.precopy_period_ms",
            )
        if not all(c.isalnum() or c in "-_.:" for c in obj.node_id):
            raise ConfigError(
                "letters, digits, '-', '_', '.' or ':' only", path=path, key=f"{prefix}.node_id"
            )
        if obj.held_limit_mib < 1:
            raise ConfigError(
                "must be at least 1 (MiB of output held with no secondary)",
                path=path,
                key=f"{prefix}.held_limit_mib",
            )
    if isinstance(obj, DiskConfig) and obj.fencing == "scsi-pr" and obj.backend != "shared":
        raise ConfigError(
            f'"scsi-pr" fences a shared LUN: it needs backend = "shared", not "{obj.backend}"',
            path=path,
            key=f"{prefix}.fencing",
        )
    if isinstance(obj, TapConfig) and obj.epoch_log_limit_mib < 1:
        raise ConfigError(
            "must be at least 1 (MiB of disk writes one epoch may log)",
            path=path,
            key=f"{prefix}.epoch_log_limit_mib",
        )
    if isinstance(obj, MetricsConfig) and obj.listen:
        problem = _address_problem(obj.listen)
        if problem:
            raise ConfigError(
                f"{problem} (host:port, e.g. 10.0.0.1:9410; empty for no exporter)",
                path=path,
                key=f"{prefix}.listen",
            )
    if isinstance(obj, LabConfig) and (
        not obj.lab_id or len(obj.lab_id) > 4 or not obj.lab_id.isalnum()
    ):
        raise ConfigError(
            "must be 1-4 letters or digits (it is part of interface names)",
            path=path,
            key=f"{prefix}.lab_id",
        )


def _address_problem(value: str) -> str:
    """What is wrong with a listener address "host:port" ("[v6]:port"), or ""."""
    host, sep, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep:
        return f"{value!r} is not host:port"
    if not host:
        return f"{value!r} names no host"
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        return f"{value!r} has no valid port"
    return ""


def load(path: str | os.PathLike[str] | None = None) -> KemariConfig:
    """Load the configuration from a TOML file, or the defaults when ``path`` is None.

    Raises:
        ConfigError: the file is missing, is not valid TOML, or holds a bad value.
    """
    if path is None:
        return KemariConfig()
    return build(KemariConfig, read_toml(path), path=str(path))


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A TOML file as a mapping.

    Raises:
        ConfigError: the file cannot be read or is not valid TOML (naming the file).
    """
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read: {err.strerror}", path=str(p)) from err
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"not valid TOML: {err}", path=str(p)) from err


def _dumps(tree: Mapping[str, Any]) -> str:
    """tomli-w's writer, imported here so that reading a config needs only the
    standard library (a host venv installed without dependencies can still load it)."""
    import tomli_w

    return tomli_w.dumps(tree)


def toml_key(key: str) -> str:
    """A TOML key: bare where it can be, quoted otherwise (as tomli-w writes it)."""
    return _dumps({key: 0}).removesuffix(" = 0\n")


def _plain(value: Any, key: str) -> Any:
    """``value`` as the types tomli-w writes (paths as strings, mappings as dicts),
    checked to have a TOML form that reads back as the same value.

    Raises:
        ConfigError: naming the dotted key of a value with no TOML form (None, a
            non-finite float, another type, a non-string table key).
    """
    if isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(f"{value!r} is not a finite number", key=key or None)
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(f"table key {k!r} is not a string", key=key or None)
            out[k] = _plain(v, f"{key}.{k}" if key else k)
        return out
    if isinstance(value, Sequence) and not isinstance(value, bytes | bytearray):
        return [_plain(v, f"{key}[{i}]") for i, v in enumerate(value)]
    raise ConfigError(f"{value!r} cannot be written to TOML", key=key or None)


def toml_value(value: Any, *, key: str = "") -> str:
    """One TOML value (string, integer, float, boolean, path or a list of them).

    Raises:
        ConfigError: the value has no TOML form here (tables belong in sections,
            None has no TOML spelling, nor has an infinite float).
    """
    plain = _plain(value, key)
    items = plain if isinstance(plain, list) else [plain]
    if any(isinstance(v, dict) for v in items):
        raise ConfigError(f"{value!r}: a table belongs in a section", key=key or None)
    return _dumps({"v": plain}).removeprefix("v = ").rstrip("\n")


#: What a TOML comment may not hold (every control character but tab), shown escaped.
_COMMENT_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def _comment(line: str) -> str:
    return _COMMENT_CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", line)


def dump_toml(tree: Mapping[str, Any], *, header: str = "") -> str:
    """A TOML document for a tree of scalars, lists, tables and arrays of tables (keys in
    the given order, scalars before tables), with ``header`` as leading comments: the
    reverse of :func:`read_toml`.

    Raises:
        ConfigError: a value has no TOML form (naming its dotted key).
    """
    comments = "".join(f"# {_comment(line)}".rstrip() + "\n" for line in header.splitlines())
    body = _dumps(_plain(tree, ""))
    return "\n".join(part for part in (comments, body) if part)


def with_overrides(cfg: KemariConfig, **sections: dict[str, Any]) -> KemariConfig:
    """Return a copy of ``cfg`` with some keys of some sections replaced (and checked)."""
    changes: dict[str, Any] = {}
    for section, values in sections.items():
        current = getattr(cfg, section)
        merged = {f.name: getattr(current, f.name) for f in dataclasses.fields(current)}
        merged.update(values)
        cls = type(current)
        hints = typing.get_type_hints(cls)
        checked = {
            k: (v if isinstance(v, Path | tuple) else _coerce(v, hints[k], path=None, key=k))
            for k, v in merged.items()
        }
        obj = cls(**checked)
        _validate(obj, path=None, prefix=section)
        changes[section] = obj
    return dataclasses.replace(cfg, **changes)
