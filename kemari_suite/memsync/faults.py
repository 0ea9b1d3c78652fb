"""Named fault-injection points, for the kill campaigns of the end-to-end tests.

``KEMARI_FAULT=<point>[:<n>]`` in an agent's environment makes it die by SIGKILL (its
QEMU with it, through the parent-death signal) the n-th time (default 1st) it passes
``<point>``. ``KEMARI_FAULT=random:<seconds>`` kills it at a uniformly random moment in
that many seconds after protection starts. Without the variable, :func:`hit` costs one
dictionary lookup.
"""

from __future__ import annotations

import os
import signal
import sys

#: Every point an agent passes, in the order of a checkpoint's life.
POINTS: dict[str, str] = {
    "precopy": "primary, during the initial pre-copy of all guest RAM",
    "stopped": "primary, inside the stopped window (device state captured, pages staged)",
    "mid-transfer": "primary, after part of an epoch's pages were sent, before its end",
    "before-ack": "primary, epoch end sent, acknowledgement not yet received "
    "(the secondary is verifying and applying)",
    "after-ack": "primary, right after an acknowledgement arrived",
    "secondary-apply": "secondary, while applying a received batch of pages",
}

_spec = os.environ.get("KEMARI_FAULT", "")
_point, _, _arg = _spec.partition(":")
_count = 0


def armed_point() -> str | None:
    """The point this process will die at, if any."""
    return _point or None


def random_delay() -> float | None:
    """Seconds after protection starts at which to die, for ``random:<seconds>``."""
    if _point != "random":
        return None
    try:
        import random

        return random.uniform(0.0, float(_arg or "5"))
    except ValueError:
        return 2.0


def hit(point: str) -> None:
    """Die here if this point is armed and its count is reached."""
    global _count
    if point != _point:
        return
    _count += 1
    if _count >= int(_arg or "1"):
        die(point)


def die(point: str) -> None:
    """SIGKILL this process (QEMU follows through its parent-death signal)."""
    # Tell the harness where we died before we go: one line on stderr, unbuffered.
    os.write(2, f"KEMARI-FAULT-HIT {point}\n".encode())
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)
