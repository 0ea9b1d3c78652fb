"""Which guest outputs escape output commit: the one audit that ``kemari protect`` (before
QEMU starts), ``kemari check`` and the taps' own check share.

Output commit holds only while every path from the guest to the outside is tapped: the
NIC behind the frame proxy (``tap.host_tap``), the disk behind the block tap
(``disk.path``), and no extra argument or device that reaches other programs (a serial
port or virtio-serial on a socket, pty or a file other users read, USB redirection, a
shared folder, a remote display). :func:`audit_outputs` finds every such output in a
configuration and, when given, the VM's :class:`~kemari_suite.vm.spec.VMSpec`; it is
pure apart from the mode of the files a serial console would write.

An operator may accept an output knowingly: ``vm.unprotected_output = true`` for the NIC
of ``vm.netdev``, ``unprotected_output = true`` on a VM definition's ``[[nic]]``,
``[[disk]]`` or ``[[device]]`` (carried in the spec's ``unprotected_outputs``). Such an
output is allowed and reported (:func:`unprotected_outputs`: ``kemari status`` and an
alert at protect start); any other is refused, naming the device and the fix.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

from kemari_suite.config import KemariConfig
from kemari_suite.errors import ConfigError
from kemari_suite.tap.guard import OutputKind, check_tapped, extra_outputs, parse_keyval
from kemari_suite.vm.spec import VMSpec

#: Names of accepted outputs in a spec's ``unprotected_outputs`` (besides ``-device``
#: strings).
NIC = "nic"
DISK = "disk"


@dataclass(frozen=True)
class OutputFinding:
    """One guest output that is not behind the taps."""

    kind: OutputKind
    #: The device as the operator wrote it, e.g. "NIC vm.netdev = tap,ifname=tap0".
    device: str
    #: Where it leads, e.g. "reaches the network without output commit".
    reason: str
    #: How to make it sound (tap it), or how to accept it.
    fix: str
    #: The configuration key that declares it ("" for code-supplied arguments).
    key: str = ""
    #: The operator accepted it (``unprotected_output = true``).
    accepted: bool = False

    def describe(self) -> str:
        """One line: the device, why it escapes, and (when refused) the fix."""
        text = f"{self.device}: {self.reason}"
        if self.accepted:
            return f"{text} (accepted: unprotected_output = true)"
        return f"{text}; {self.fix}" if self.fix else text


@dataclass(frozen=True)
class OutputAudit:
    """Every untapped output of one VM, refused or accepted."""

    findings: tuple[OutputFinding, ...] = ()

    @property
    def refused(self) -> tuple[OutputFinding, ...]:
        return tuple(f for f in self.findings if not f.accepted)

    @property
    def accepted(self) -> tuple[OutputFinding, ...]:
        return tuple(f for f in self.findings if f.accepted)

    @property
    def ok(self) -> bool:
        return not self.refused

    def raise_if_refused(self, *, path: str | None = None) -> None:
        """Raises:
        ConfigError: naming every refused output and its fix (key: the first one's).
        """
        refused = self.refused
        if refused:
            lines = "; ".join(f.describe() for f in refused)
            raise ConfigError(
                f"untapped guest output, refused before the VM starts: {lines}",
                path=path,
                key=refused[0].key or None,
            )


def accepted_names(cfg: KemariConfig, spec: VMSpec | None) -> frozenset[str]:
    """The outputs the operator accepted: ``"nic"`` (``vm.unprotected_output``), and what
    the spec carries from a VM definition (``"nic"``, ``"disk"``, ``-device`` strings)."""
    names = set(spec.unprotected_outputs if spec is not None else ())
    if cfg.vm.unprotected_output:
        names.add(NIC)
    return frozenset(names)


def _nic(cfg: KemariConfig, spec: VMSpec | None, accepted: Collection[str]) -> OutputFinding | None:
    netdev = spec.netdev if spec is not None else (cfg.vm.netdev or None)
    if netdev is None or cfg.tap.host_tap:
        # With tap.host_tap the agent puts the NIC on the frame proxy (whatever netdev says).
        return None
    ifname = _ifname(netdev)
    from_config = spec is None or netdev == cfg.vm.netdev
    where = f"vm.netdev = {netdev!r}" if from_config else f"-netdev {netdev}"
    fix = (
        f'set tap.host_tap = "{ifname or "TAP"}" instead of vm.netdev (the frame proxy '
        "opens the TAP and holds output until its checkpoint commits), or "
        "vm.unprotected_output = true to accept it"
    )
    return OutputFinding(
        OutputKind.NIC,
        f"NIC {where}",
        "reaches the network without output commit (no frame proxy)",
        fix,
        key="vm.netdev" if from_config else "",
        accepted=NIC in accepted,
    )


def _ifname(netdev: str) -> str:
    _kind, keys = parse_keyval(netdev)
    return keys.get("ifname", "")


def _disk(
    cfg: KemariConfig, spec: VMSpec | None, accepted: Collection[str]
) -> OutputFinding | None:
    if spec is None or spec.blockdev is None or cfg.disk.path:
        # With disk.path the agent serves the disk through the block tap.
        return None
    return OutputFinding(
        OutputKind.DISK,
        f"disk -blockdev {spec.blockdev}",
        "QEMU writes it directly, ahead of the checkpoint (no block tap)",
        "give the disk as disk.path (or a VM definition's [[disk]]) so that the block tap "
        "serves it, or unprotected_output = true on its [[disk]] to accept it",
        key="disk.path",
        accepted=DISK in accepted,
    )


def audit_outputs(
    cfg: KemariConfig,
    spec: VMSpec | None = None,
    *,
    allow_devices: Iterable[str] = (),
    accepted: Collection[str] | None = None,
) -> OutputAudit:
    """Every output of the VM of ``cfg`` (and ``spec``, the spec the agent would start
    before the taps rewire it) that escapes output commit.

    ``accepted`` overrides :func:`accepted_names` (a VM definition checked without its
    spec carrying the opt-outs). ``allow_devices`` extends the list of output-free
    ``-device`` drivers.
    """
    names = accepted_names(cfg, spec) if accepted is None else frozenset(accepted)
    found: list[OutputFinding] = []
    for f in (_nic(cfg, spec, names), _disk(cfg, spec, names)):
        if f is not None:
            found.append(f)
    if spec is not None:
        for u in extra_outputs(spec, allow_devices=allow_devices):
            fix = u.fix or "remove it"
            is_device = u.device.startswith("-device ")
            if is_device:
                fix += ", or unprotected_output = true on its [[device]] to accept it"
            found.append(
                OutputFinding(
                    u.kind,
                    u.device,
                    u.reason or "an output path of its own",
                    fix,
                    accepted=is_device and u.device.removeprefix("-device ") in names,
                )
            )
    return OutputAudit(tuple(found))


def check_outputs(
    cfg: KemariConfig,
    spec: VMSpec | None = None,
    *,
    path: str | None = None,
    allow_devices: Iterable[str] = (),
) -> OutputAudit:
    """:func:`audit_outputs`, refusing: what protect calls before anything starts.

    Raises:
        ConfigError: an output escapes output commit and was not accepted; the message
            names every such device and its fix.
    """
    audit = audit_outputs(cfg, spec, allow_devices=allow_devices)
    audit.raise_if_refused(path=path)
    return audit


def check_wired(
    cfg: KemariConfig,
    spec: VMSpec,
    *,
    net_socket: Path | str | None,
    nbd_socket: Path | str | None,
) -> None:
    """The taps' check of the spec as wired to them (``GuestIO.start``), honouring the
    accepted outputs.

    Raises:
        TapError: an output is not on the taps' sockets and was not accepted.
    """
    check_tapped(
        spec,
        net_socket=net_socket,
        nbd_socket=nbd_socket,
        accepted=accepted_names(cfg, spec),
    )


def unprotected_outputs(cfg: KemariConfig, spec: VMSpec | None = None) -> list[str]:
    """The outputs the operator accepted without output commit, one human line each
    (empty when every output is tapped): for ``kemari status`` and the alert raised at
    protect start."""
    return [f.describe() for f in audit_outputs(cfg, spec).accepted]


__all__ = [
    "DISK",
    "NIC",
    "OutputAudit",
    "OutputFinding",
    "accepted_names",
    "audit_outputs",
    "check_outputs",
    "check_wired",
    "unprotected_outputs",
]
