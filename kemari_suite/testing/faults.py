"""Named fault-injection points, for the kill campaigns of the end-to-end tests.

``KEMARI_FAULT=<point>[:<n>]`` in an agent's environment makes it die by SIGKILL (its
QEMU with it, through the parent-death signal) the n-th time (default 1st) it passes
``<point>``. ``KEMARI_FAULT=random:<seconds>`` kills it at a uniformly random moment in
that many seconds after protection starts. Without the variable, :func:`hit` costs one
string comparison.

``KEMARI_FAULT_TARGET=<pidfile>`` turns the kill outward: instead of dying, the agent
SIGKILLs the process whose PID is in that file and carries on. The kill campaigns use it
on the secondary to kill the *primary* at the moment the secondary is applying pages.

``KEMARI_FAULT=<point>:<n>:raise`` (or ``arm(point, action="raise")``) makes the step
*fail* instead: :func:`hit` raises :class:`InjectedFault` once, as a QMP command, a
capture or the link would, and the agent goes on. The stopped-window tests use it to
check that no failure leaves the guest stopped.

``arm(point, target=<file>, action="pause")`` makes the agent *wait* there instead, once:
it writes ``<file>`` (its PID and the point) and blocks, event loop included, until
that file is removed or :data:`PAUSE_MAX_S` have passed, then goes on. A test holds an
agent at an exact phase of a checkpoint that way, changes the world (cuts the
replication link, say) and lets it continue into the change.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path
from typing import Literal

from kemari_suite.errors import ReplicationError

Action = Literal["kill", "raise", "pause"]
ACTIONS: tuple[Action, ...] = ("kill", "raise", "pause")
#: The longest a ``pause`` holds an agent, seconds: a test that never lets go must not
#: leave the agent frozen (its lease renewals stop with it).
PAUSE_MAX_S = 10.0

#: Every point an agent passes, in the order of a checkpoint's life.
POINTS: dict[str, str] = {
    "precopy": "primary, during the initial pre-copy of all guest RAM",
    "window-stop": "primary, right after QMP stop answered (the guest is stopped)",
    "window-capture": "primary, guest stopped, before the device-state capture",
    "window-scan": "primary, guest stopped, before the dirty-page scan",
    "window-stage": "primary, guest stopped, before the dirty pages are staged",
    "stopped": "primary, inside the stopped window (device state captured, pages staged)",
    "window-cont": "primary, guest stopped, before the cont that ends the window "
    "(speculative: in the window; classic: after the acknowledgement)",
    "window-send": "primary, window closed, before the epoch's pages are sent "
    "(classic: the guest is still stopped)",
    "mid-transfer": "primary, after part of an epoch's pages were sent, before its end",
    "before-ack": "primary, epoch end sent, acknowledgement not yet received "
    "(the secondary is verifying and applying)",
    "ack-wait": "primary, about to wait for the acknowledgement (classic: guest stopped)",
    "after-ack": "primary, right after an acknowledgement arrived",
    "secondary-apply": "secondary, while applying a received batch of pages",
}

_spec = os.environ.get("KEMARI_FAULT", "")
_point, _, _rest = _spec.partition(":")
_arg, _, _how = _rest.partition(":")
_action: Action = "raise" if _how == "raise" else "kill"  # pause: run time only
_count = 0
_target = os.environ.get("KEMARI_FAULT_TARGET", "")


class InjectedFault(ReplicationError):
    """The failure an armed ``raise`` fault point stands for (``point`` names it)."""

    def __init__(self, point: str) -> None:
        super().__init__(f"injected fault at {point}")
        self.point = point


def enabled() -> bool:
    """May faults be armed at run time (control command ``fault``)?

    Only with ``KEMARI_FAULTS=1`` in the agent's environment: a production agent has no
    remote kill switch.
    """
    return os.environ.get("KEMARI_FAULTS") == "1"


def arm(point: str, count: int = 1, target: str = "", action: str = "kill") -> None:
    """Arm ``point`` now: fire the ``count``-th time it is passed from here on; ``action``
    "kill" dies (or kills ``target``), "raise" raises :class:`InjectedFault` once,
    "pause" holds the agent there once while the file ``target`` exists (it is created).

    Raises:
        ValueError: unknown point or action, count below 1, or a pause without a file.
    """
    global _point, _arg, _count, _target, _action
    if point not in POINTS and point != "random":
        raise ValueError(f"unknown fault point {point!r} (known: {', '.join(POINTS)})")
    if count < 1:
        raise ValueError("count must be at least 1")
    if action not in ACTIONS:
        raise ValueError(f"unknown fault action {action!r} (known: {', '.join(ACTIONS)})")
    if action == "pause" and not target:
        raise ValueError("a pause needs a target file (removing it lets the agent go on)")
    _point, _arg, _count, _target = point, str(count), 0, target
    _action = "raise" if action == "raise" else "pause" if action == "pause" else "kill"


def disarm() -> None:
    """Forget the armed point (tests arm one per case)."""
    global _point, _arg, _count, _target, _action
    _point, _arg, _count, _target, _action = "", "", 0, "", "kill"


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
    """Die here if this point is armed and its count is reached.

    Raises:
        InjectedFault: the point is armed with the "raise" action (once).
    """
    global _count, _point
    if point != _point:
        return
    _count += 1
    if _count >= int(_arg or "1"):
        if _action == "raise":
            _point = ""  # once only
            raise InjectedFault(point)
        if _action == "pause":
            pause(point, _target)
            return
        if _target:
            kill_target(point, _target)
        else:
            die(point)


def pause(point: str, flag: str) -> None:
    """Write ``flag`` and wait (blocking) until it is removed, at most
    :data:`PAUSE_MAX_S`; once."""
    global _point
    _point = ""  # once only
    path = Path(flag)
    tmp = path.with_name(path.name + ".tmp")
    try:
        # Whole or not at all: whoever sees the flag may read it at once.
        tmp.write_text(f"{os.getpid()} {point}\n")
        os.replace(tmp, path)
    except OSError as err:
        os.write(2, f"KEMARI-FAULT-MISS {point}: cannot write {flag}: {err}\n".encode())
        return
    os.write(2, f"KEMARI-FAULT-HIT {point} (paused)\n".encode())
    deadline = time.monotonic() + PAUSE_MAX_S
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.002)
    with contextlib.suppress(OSError):
        path.unlink()


def kill_target(point: str, pidfile: str) -> None:
    """SIGKILL the process named in ``pidfile`` (once), and go on."""
    global _point
    _point = ""  # once only
    try:
        pid = int(Path(pidfile).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        os.write(2, f"KEMARI-FAULT-MISS {point}: no pid in {pidfile}\n".encode())
        return
    os.write(2, f"KEMARI-FAULT-HIT {point} (killing pid {pid})\n".encode())
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def die(point: str) -> None:
    """SIGKILL this process (QEMU follows through its parent-death signal)."""
    # Tell the harness where we died before we go: one line on stderr, unbuffered.
    os.write(2, f"KEMARI-FAULT-HIT {point}\n".encode())
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


async def control_handler(req: dict[str, object]) -> object:
    """The agents' ``fault`` control command: arm a point (only with KEMARI_FAULTS=1).

    Raises:
        ValueError: a bad request (unknown point, bad count); the control server
            answers it as an error.
    """
    try:
        arm(
            str(req["point"]),
            int(str(req.get("count", 1))),
            str(req.get("target", "")),
            str(req.get("action", "kill")),
        )
    except KeyError as err:
        raise ValueError(f"bad fault request: missing {err}") from err
    return {"armed": req["point"]}
