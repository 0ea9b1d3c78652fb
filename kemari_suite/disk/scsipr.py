"""SCSI-3 persistent reservations on a shared LUN, as ``fence_scsi`` uses them.

Each host registers its own key with the LUN; the writer holds the reservation with
type 5, "write exclusive, registrants only": every registered host may write, an
unregistered one may only read. At failover the standby (once the tiebreaker granted the
takeover) runs PREEMPT AND ABORT with the old writer's key: the target removes that
key, aborts the old writer's queued commands, and from then on refuses its writes with
the status RESERVATION CONFLICT. The fence is the storage itself, not the old host's
good behaviour: a host that was paused and wakes up believing it is still the writer
cannot write any more.

::

    host A                         target (LUN)                     host B
    register-ignore  key A  ---->  keys {A}
    reserve type 5   key A  ---->  holder A, type 5
                                   keys {A, B}            <----  register-ignore  key B
    writes           ---->  ok
                     ... host A stops answering; the tiebreaker grants B ...
                                   keys {B}, holder B     <----  preempt-and-abort key B,
                                   A's tasks aborted                victim A, type 5
    writes           ---->  RESERVATION CONFLICT                 writes  ---->  ok

Commands are ``sg_persist`` (sg3-utils) run through ``sh`` by :class:`SgPersist`, with
``--no-inquiry`` so their output is only the answer :func:`parse_read_keys` and
:func:`parse_read_reservation` read. Every failure is a :class:`ScsiPrError` (a
:class:`~kemari_suite.errors.DiskError`) naming the command, its exit code (sg_persist
exits 24 for a reservation conflict) and its stderr. The kernel lab runs the same
commands inside an L1 through a subclass of :class:`SgPersist` (``klab/iscsi.py``).

Keys: :func:`host_key` derives a host's key from its name, as fence_scsi derives it from
the node: the high 32 bits spell ``KMRI`` (so ``sg_persist`` output shows whose keys they
are), the low 32 bits are the start of the SHA-256 of the host name.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass

import sh

from kemari_suite.disk.drbdadm import CommandResult
from kemari_suite.errors import DiskError

#: "Write exclusive, registrants only": what fence_scsi reserves.
PR_TYPE_WE_RO = 5
#: sg_persist's exit code for the SCSI status RESERVATION CONFLICT.
SG_RESERVATION_CONFLICT = 24
#: The high 32 bits of every key :func:`host_key` makes: "KMRI" in ASCII.
KEY_PREFIX = 0x4B4D5249

#: SPC-4's persistent reservation types, as sg_persist names them.
PR_TYPES: dict[str, int] = {
    "Write Exclusive": 1,
    "Exclusive Access": 3,
    "Write Exclusive, registrants only": 5,
    "Exclusive Access, registrants only": 6,
    "Write Exclusive, all registrants": 7,
    "Exclusive Access, all registrants": 8,
}

_SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin")


class ScsiPrError(DiskError):
    """An ``sg_persist`` command failed (or its answer could not be read)."""

    def __init__(self, device: str, command: str, rc: int, stderr: str) -> None:
        super().__init__("scsi-pr", f"{device}: `{command}` exited {rc}: {stderr.strip() or '-'}")
        self.device = device
        self.command = command
        self.rc = rc
        self.stderr = stderr

    @property
    def conflict(self) -> bool:
        """The target answered RESERVATION CONFLICT (this host is fenced)."""
        return self.rc == SG_RESERVATION_CONFLICT


def host_key(host: str) -> int:
    """The reservation key of ``host`` (pure): ``KMRI`` then 32 bits of its name's hash.

    Raises:
        ValueError: an empty host name.
    """
    if not host:
        raise ValueError("a reservation key needs a host name")
    low = int.from_bytes(hashlib.sha256(host.encode()).digest()[:4], "big")
    return (KEY_PREFIX << 32) | low


def format_key(key: int) -> str:
    """A key as sg_persist takes and prints it: ``0x`` and lower-case hex."""
    return f"0x{key:x}"


@dataclass(frozen=True)
class PrKeys:
    """READ KEYS: the PR generation and every registered key, in the target's order."""

    generation: int
    keys: tuple[int, ...]


@dataclass(frozen=True)
class PrReservation:
    """READ RESERVATION: who holds it (None: nobody) and with which type."""

    generation: int
    key: int | None = None
    #: The type's number (5: write exclusive, registrants only); None without a holder.
    type: int | None = None
    type_name: str = ""
    scope: str = ""

    @property
    def held(self) -> bool:
        return self.key is not None


_GENERATION = re.compile(r"PR generation=0x([0-9a-fA-F]+)")
_KEY_LINE = re.compile(r"^\s+0x([0-9a-fA-F]+)\s*$", re.M)
_HOLDER = re.compile(r"^\s*Key=0x([0-9a-fA-F]+)\s*$", re.M)
_SCOPE = re.compile(r"^\s*scope:\s*(\S+?),\s+type:\s*(.+?)\s*$", re.M)


def _generation(text: str, what: str) -> re.Match[str]:
    m = _GENERATION.search(text)
    if m is None:
        raise ScsiPrError("-", f"sg_persist --in {what}", 0, f"no PR generation in {text!r}")
    return m


def parse_read_keys(text: str) -> PrKeys:
    """Parse ``sg_persist --in --read-keys`` (with or without ``--no-inquiry``).

    Raises:
        ScsiPrError: no ``PR generation`` line (not sg_persist's answer).
    """
    m = _generation(text, "--read-keys")
    gen, tail = int(m.group(1), 16), text[m.end() :]
    if "NO registered reservation keys" in tail.split("\n", 1)[0]:
        return PrKeys(gen, ())
    return PrKeys(gen, tuple(int(k, 16) for k in _KEY_LINE.findall(tail)))


def parse_read_reservation(text: str) -> PrReservation:
    """Parse ``sg_persist --in --read-reservation`` (with or without ``--no-inquiry``).

    Raises:
        ScsiPrError: no ``PR generation`` line, or a holder without its type.
    """
    gen = int(_generation(text, "--read-reservation").group(1), 16)
    holder = _HOLDER.search(text)
    if holder is None:
        return PrReservation(gen)
    scope = _SCOPE.search(text)
    if scope is None:
        raise ScsiPrError(
            "-", "sg_persist --in --read-reservation", 0, f"no scope/type line in {text!r}"
        )
    name = scope.group(2)
    return PrReservation(
        generation=gen,
        key=int(holder.group(1), 16),
        type=PR_TYPES.get(name),
        type_name=name,
        scope=scope.group(1),
    )


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


class SgPersist:
    """Runs ``sg_persist`` through ``sh`` on this host (a subclass runs it elsewhere)."""

    def __init__(self, *, timeout_s: float = 30.0, binary: str = "sg_persist") -> None:
        self.timeout_s = timeout_s
        self.binary = binary

    def _path(self) -> str:
        path = os.pathsep.join([os.environ.get("PATH", ""), *_SBIN])
        return shutil.which(self.binary, path=path) or self.binary

    def run(self, device: str, args: Sequence[str]) -> CommandResult:
        """``sg_persist ARGS DEVICE``; its result.

        Raises:
            ScsiPrError: the tool is missing (rc 127), timed out (rc 124) or exited
                non-zero (24: reservation conflict).
        """
        argv = ("sg_persist", *args, device)
        command = shlex.join(argv)
        t0 = time.monotonic()
        try:
            proc = sh.Command(self._path())(
                *argv[1:],
                _env={**os.environ, "LC_ALL": "C"},
                _in="",
                _timeout=self.timeout_s,
                _return_cmd=True,
            )
        except sh.CommandNotFound as err:
            raise ScsiPrError(
                device, command, 127, "sg_persist not found: install sg3-utils"
            ) from err
        except sh.TimeoutException as err:
            raise ScsiPrError(device, command, 124, f"timed out after {self.timeout_s} s") from err
        except sh.ErrorReturnCode as err:
            raise ScsiPrError(
                device, command, err.exit_code, _text(err.stderr) or _text(err.stdout)
            ) from err
        return CommandResult(argv, 0, _text(proc.stdout), _text(proc.stderr), time.monotonic() - t0)


class ScsiPr:
    """One host's persistent-reservation operations on one LUN, with its own key.

    ``device`` is the LUN's block (or sg) device on this host; ``key`` defaults to
    :func:`host_key` of ``host``.
    """

    def __init__(
        self,
        device: str,
        host: str,
        *,
        key: int | None = None,
        tools: SgPersist | None = None,
        pr_type: int = PR_TYPE_WE_RO,
    ) -> None:
        if not device:
            raise DiskError("scsi-pr", "no device")
        self.device = device
        self.host = host
        self.key = key if key is not None else host_key(host)
        if not 0 < self.key < 1 << 64:
            raise DiskError("scsi-pr", f"key {self.key:#x} is not a non-zero 64-bit value")
        self.tools = tools or SgPersist()
        self.pr_type = pr_type

    def _out(self, *args: str) -> CommandResult:
        return self.tools.run(self.device, ("--no-inquiry", "--out", *args))

    def _in(self, *args: str) -> CommandResult:
        return self.tools.run(self.device, ("--no-inquiry", "--in", *args))

    def register(self) -> CommandResult:
        """Register our key (REGISTER AND IGNORE EXISTING KEY: idempotent, as fence_scsi).

        Raises:
            ScsiPrError: the target refused.
        """
        return self._out("--register-ignore", f"--param-sark={format_key(self.key)}")

    def unregister(self) -> CommandResult:
        """Remove our key (a held reservation goes with it). Raises ScsiPrError."""
        return self._out("--register", f"--param-rk={format_key(self.key)}", "--param-sark=0")

    def reserve(self) -> CommandResult:
        """Take the reservation with our key (a no-op if we hold it already).

        Raises:
            ScsiPrError: not registered, or another key holds it (rc 24).
        """
        return self._out(
            "--reserve", f"--param-rk={format_key(self.key)}", f"--prout-type={self.pr_type}"
        )

    def release(self) -> CommandResult:
        """Release the reservation we hold. Raises ScsiPrError."""
        return self._out(
            "--release", f"--param-rk={format_key(self.key)}", f"--prout-type={self.pr_type}"
        )

    def preempt_abort(self, victim: int) -> CommandResult:
        """PREEMPT AND ABORT ``victim``'s key: it loses its registration (and the
        reservation, which we then hold), and its queued commands are aborted.

        Raises:
            ScsiPrError: we are not registered (rc 24), or the target refused.
        """
        return self._out(
            "--preempt-abort",
            f"--param-rk={format_key(self.key)}",
            f"--param-sark={format_key(victim)}",
            f"--prout-type={self.pr_type}",
        )

    def read_keys(self) -> PrKeys:
        """The registered keys. Raises ScsiPrError."""
        return parse_read_keys(self._in("--read-keys").stdout)

    def read_reservation(self) -> PrReservation:
        """The reservation and its holder. Raises ScsiPrError."""
        return parse_read_reservation(self._in("--read-reservation").stdout)

    def acquire(self) -> PrReservation:
        """Make this host the writer: register, then reserve if nobody holds the
        reservation, or preempt-and-abort whoever holds it (call only once the
        tiebreaker granted the takeover). The reservation read back.

        Raises:
            ScsiPrError: a command failed, or the reservation read back is not ours.
        """
        self.register()
        res = self.read_reservation()
        if res.key is None:
            self.reserve()
        elif res.key != self.key:
            self.preempt_abort(res.key)
        res = self.read_reservation()
        if res.key != self.key:
            raise ScsiPrError(
                self.device,
                "sg_persist --in --read-reservation",
                0,
                f"held by {format_key(res.key) if res.key else 'nobody'}, not by us "
                f"({format_key(self.key)})",
            )
        return res


__all__ = [
    "KEY_PREFIX",
    "PR_TYPES",
    "PR_TYPE_WE_RO",
    "SG_RESERVATION_CONFLICT",
    "PrKeys",
    "PrReservation",
    "ScsiPr",
    "ScsiPrError",
    "SgPersist",
    "format_key",
    "host_key",
    "parse_read_keys",
    "parse_read_reservation",
]
