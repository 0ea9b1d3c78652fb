"""Pure helpers the sizing benchmarks share: least-squares lines and the process's own
memory figures from ``/proc/self/status``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: /proc/self/status fields read for the memory figures (kB).
STATUS_FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem")


def read_status(text: str | None = None) -> dict[str, int]:
    """The :data:`STATUS_FIELDS` of ``/proc/self/status`` (or of ``text``), in KiB."""
    if text is None:
        text = Path("/proc/self/status").read_text()
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in STATUS_FIELDS:
            out[key] = int(rest.split()[0])
    return out


def status_delta_mib(before: dict[str, int], after: dict[str, int]) -> dict[str, float]:
    """``after - before`` per field, in MiB."""
    return {k: (after.get(k, 0) - before.get(k, 0)) / 1024 for k in STATUS_FIELDS}


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> dict[str, Any] | None:
    """Least-squares line ``y = slope * x + intercept`` with its R²; None below 2 x values.

    Raises:
        ValueError: ``xs`` and ``ys`` differ in length.
    """
    if len(xs) != len(ys):
        raise ValueError(f"{len(xs)} x values but {len(ys)} y values")
    if len(set(xs)) < 2:
        return None
    x = np.asarray(xs, dtype=float)
    y = np.asarray(ys, dtype=float)
    slope, intercept = np.polyfit(x, y, 1)
    resid = y - (slope * x + intercept)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((resid**2).sum()) / ss_tot if ss_tot > 0 else 1.0
    return {"slope": float(slope), "intercept": float(intercept), "r2": r2, "n": len(xs)}


__all__ = ["STATUS_FIELDS", "linear_fit", "read_status", "status_delta_mib"]
