"""Per-checkpoint metrics and the run's artifact folder.

A run writes ``<artifacts>/checkpoints.jsonl`` (one object per checkpoint),
``events.jsonl`` (state changes, failovers, refusals) and ``status.json`` (the latest
status, rewritten atomically).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass
class CheckpointMetrics:
    """What one sync point cost."""

    epoch: int
    trigger: str
    #: Wall time the VM was stopped, on the host's clock.
    pause_ms: float
    stop_ms: float
    devstate_ms: float
    scan_ms: float
    stage_ms: float
    dirty_pages: int
    devstate_bytes: int
    bytes_sent: int
    encode_ms: float = 0.0
    transfer_ms: float = 0.0
    ack_ms: float = 0.0
    #: Pages (and bytes) of this epoch sent by pipelining before the stop.
    precopied_pages: int = 0
    precopy_bytes: int = 0
    t_wall: float = 0.0


class Artifacts:
    """The artifact folder of one agent run."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._ckpt = (root / "checkpoints.jsonl").open("a", buffering=1)
        self._events = (root / "events.jsonl").open("a", buffering=1)

    def checkpoint(self, m: CheckpointMetrics) -> None:
        self._ckpt.write(json.dumps(asdict(m)) + "\n")

    def event(self, kind: str, **fields: Any) -> None:
        rec = {"t": time.time(), "event": kind, **fields}
        self._events.write(json.dumps(rec, default=str) + "\n")

    def status(self, status: dict[str, Any]) -> None:
        tmp = self.root / "status.json.tmp"
        tmp.write_text(json.dumps(status, indent=2, default=str))
        os.replace(tmp, self.root / "status.json")

    def close(self) -> None:
        self._ckpt.close()
        self._events.close()
