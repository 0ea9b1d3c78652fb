"""The machine types a QEMU binary offers, asked once per process.

A VM definition must name a pinned machine type (``pc-i440fx-7.2``, not the alias
``pc``) that the hosts' QEMU offers; :func:`qemu_machines` is what it is checked against.
"""

from __future__ import annotations

import functools
import re
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from kemari_suite.errors import SetupError
from kemari_suite.vm.spec import QEMU_BINARY


@dataclass(frozen=True)
class MachineCatalog:
    """The machine types a QEMU binary offers (``-machine help``)."""

    names: frozenset[str]
    #: alias -> the pinned machine it stands for ("pc" -> "pc-i440fx-7.2").
    aliases: Mapping[str, str] = field(default_factory=dict)
    default: str | None = None

    @classmethod
    def parse(cls, text: str) -> MachineCatalog:
        """Parse the output of ``qemu-system-x86_64 -machine help``."""
        names: set[str] = set()
        aliases: dict[str, str] = {}
        default: str | None = None
        for line in text.splitlines():
            parts = line.split(None, 1)
            if not parts or line.startswith("Supported machines"):
                continue
            name, desc = parts[0], (parts[1] if len(parts) > 1 else "")
            m = re.search(r"\(alias of ([\w.+-]+)\)", desc)
            if m:
                aliases[name] = m.group(1)
            else:
                names.add(name)
            if "(default)" in desc:
                default = m.group(1) if m else name
        return cls(names=frozenset(names), aliases=aliases, default=default)

    def pin(self, machine: str) -> str | None:
        """The pinned machine for ``machine`` (itself, or what an alias stands for)."""
        if machine in self.names:
            return machine
        return self.aliases.get(machine)


MachineProbe = Callable[[], MachineCatalog]


@functools.cache
def qemu_machines(binary: str = QEMU_BINARY) -> MachineCatalog:
    """The machine types of this host's QEMU, asked once per process.

    Raises:
        SetupError: QEMU is not installed or does not answer.
    """
    try:
        res = subprocess.run(
            [binary, "-machine", "help"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise SetupError("qemu", f"cannot run {binary} -machine help: {err}") from err
    if res.returncode != 0:
        raise SetupError("qemu", f"{binary} -machine help exited {res.returncode}: {res.stderr}")
    return MachineCatalog.parse(res.stdout)


__all__ = ["MachineCatalog", "MachineProbe", "qemu_machines"]
