"""The report of a libvirt import: what happened to each part of the domain.

Every mapper in :mod:`kemari_suite.vm.libvirtdomain` and
:mod:`kemari_suite.vm.libvirtdevices` adds an :class:`ImportNote` to a :class:`Notes`
for what it left out (``dropped``), carried over in another form (``changed``) or
cannot carry over (``cannot``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Severity = Literal["dropped", "changed", "cannot"]

MiB = 1 << 20


@dataclass(frozen=True)
class ImportNote:
    """What happened to one part of the domain."""

    severity: Severity
    #: Where in the domain XML (e.g. "disk[1] vdb", "interface[0].model", "video[0]").
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.severity}: {self.field}: {self.message}"


class Notes:
    """The notes of one import, in the order they were made."""

    def __init__(self) -> None:
        self.items: list[ImportNote] = []

    def add(self, severity: Severity, where: str, message: str) -> None:
        self.items.append(ImportNote(severity, where, message))


def safe_name(text: str, fallback: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_-]", "-", text.strip())[:64]
    return name or fallback


__all__ = ["ImportNote", "MiB", "Notes", "Severity", "safe_name"]
