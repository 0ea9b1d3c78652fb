"""Where labs are recorded, whatever ``KEMARI_RUN`` and ``KEMARI_SHM`` said when they
were made.

A lab's files live in the run and shm directories of whoever built it, and those follow
the environment. Its namespaces do not: they are machine-wide. So is this registry, one
JSON file per lab in a fixed place (:data:`REGISTRY_DIR`), written by ``up`` and removed
by ``down``, saying which directories hold the lab's files::

    /run/kemari/labs/<id>.json   {"lab_id", "profile", "run_dir", "shm_dir",
                                  "created_unix", "configs_dir"}

``/run`` is a tmpfs: after a reboot, which also removes every namespace, it is empty.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from kemari_suite.errors import LabError
from kemari_suite.protocol.files import mkdir_owner_only, write_owner_only

#: Fixed, machine-wide: never derived from the environment.
REGISTRY_DIR = Path("/run/kemari/labs")


@dataclass(frozen=True)
class LabRecord:
    """Where one lab keeps its files."""

    lab_id: str
    profile: str
    run_dir: Path
    shm_dir: Path
    created_unix: float = 0.0
    #: Where ``kemari lab up``/``configs`` last wrote the agents' configs, if anywhere.
    configs_dir: Path | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "lab_id": self.lab_id,
            "profile": self.profile,
            "run_dir": str(self.run_dir),
            "shm_dir": str(self.shm_dir),
            "created_unix": self.created_unix,
            "configs_dir": str(self.configs_dir) if self.configs_dir is not None else None,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LabRecord:
        """Raises: KeyError, TypeError or ValueError on a malformed record."""
        configs = data.get("configs_dir")
        return cls(
            lab_id=str(data["lab_id"]),
            profile=str(data["profile"]),
            run_dir=Path(str(data["run_dir"])),
            shm_dir=Path(str(data["shm_dir"])),
            created_unix=float(data.get("created_unix") or 0.0),
            configs_dir=Path(str(configs)) if configs else None,
        )


def registry_file(lab_id: str) -> Path:
    """The registry entry of lab ``lab_id``."""
    return REGISTRY_DIR / f"{lab_id}.json"


def record(rec: LabRecord) -> Path:
    """Record (or replace) the entry of ``rec.lab_id``; returns its path.

    Raises:
        LabError: the entry cannot be written.
    """
    path = registry_file(rec.lab_id)
    rec = rec if rec.created_unix else replace(rec, created_unix=time.time())
    try:
        mkdir_owner_only(path.parent)
        write_owner_only(path, json.dumps(rec.to_json(), indent=2) + "\n")
    except OSError as err:
        raise LabError(rec.lab_id, f"cannot write the lab registry entry {path}: {err}") from err
    return path


def lookup(lab_id: str) -> LabRecord | None:
    """The entry of lab ``lab_id``; None when there is none or it cannot be read."""
    try:
        data = json.loads(registry_file(lab_id).read_text())
        return LabRecord.from_json(data) if isinstance(data, dict) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def forget(lab_id: str) -> None:
    """Remove the entry of lab ``lab_id`` (no error when there is none).

    Raises:
        LabError: it exists and cannot be removed.
    """
    path = registry_file(lab_id)
    try:
        path.unlink(missing_ok=True)
    except OSError as err:
        raise LabError(lab_id, f"cannot remove the registry entry {path}: {err}") from err


def registered() -> list[str]:
    """Ids of the labs with an entry, sorted."""
    with contextlib.suppress(OSError):
        return sorted(p.stem for p in REGISTRY_DIR.glob("*.json"))
    return []


def note_configs(lab_id: str, directory: Path) -> None:
    """Remember where the agents' configs of lab ``lab_id`` went (if it is registered).

    Raises:
        LabError: the entry cannot be rewritten.
    """
    rec = lookup(lab_id)
    if rec is not None and rec.configs_dir != directory:
        record(replace(rec, configs_dir=directory))
