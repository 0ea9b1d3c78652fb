"""Console markers of the guest's ``kbench``, timestamped on the host's clock.

QEMU stops the guest's clock while the VM is stopped, so a loop timed inside the guest
cannot see Kemari's sync-point pauses. ``kbench`` (``guest/workloads/kbench.c``) prints a
line before and after each timed loop; :class:`ConsoleTail` stamps each line with
``time.monotonic()`` (and ``time.time()``, to match the agents' checkpoint records) the
moment it appears in the console file. The serial console is not output-committed, so a
line appears as soon as the guest writes it.

Parsing (:func:`parse_line`) and assembling the timed loops (:func:`assemble`) are pure
functions; only :class:`ConsoleTail` does I/O.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import enum
import errno
import os
import re
import select
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

#: The lmbench-style benchmarks, in the order of the published table.
LMBENCH = ("fork", "exec", "sh", "pagefault", "ctxsw")
#: The IOzone-style writers.
IOZONE = ("iozone_wbuf", "iozone_osync")
ALL_BENCHMARKS = LMBENCH + IOZONE


class Kind(enum.Enum):
    READY = "READY"
    CAL = "CAL"
    ROUND = "ROUND"
    START = "START"
    END = "END"
    GUEST = "GUEST"
    SKIP = "SKIP"
    FAIL = "FAIL"
    DONE = "DONE"


# printk or a shell prompt may share the line: the marker is found anywhere in it.
_MARKER = re.compile(r"KB-(READY|CAL|ROUND|START|END|GUEST|SKIP|FAIL|DONE)\b(.*)")
_ARITY = {
    Kind.CAL: 2,
    Kind.ROUND: 1,
    Kind.START: 3,
    Kind.END: 2,
    Kind.GUEST: 5,
    Kind.SKIP: 1,
    Kind.FAIL: 1,
}
_INT_FIELDS = {Kind.CAL: (1,), Kind.ROUND: (0,), Kind.START: (1, 2), Kind.END: (1,)}


@dataclass(frozen=True)
class Marker:
    """One marker line; ``t_mono``/``t_wall`` are None for lines already in the file
    when tailing began (their timing is unknown)."""

    kind: Kind
    fields: tuple[str, ...]
    t_mono: float | None = None
    t_wall: float | None = None


def parse_line(
    line: str, t_mono: float | None = None, t_wall: float | None = None
) -> Marker | None:
    """The marker in ``line``, or None if there is none or it is malformed (a marker
    garbled by interleaved kernel output must not be taken for a good one)."""
    m = _MARKER.search(line.replace("\r", ""))
    if m is None:
        return None
    kind = Kind(m.group(1))
    fields = tuple(m.group(2).split())
    if len(fields) < _ARITY.get(kind, 0):
        return None
    for i in _INT_FIELDS.get(kind, ()):
        if not fields[i].lstrip("-").isdigit():
            return None
    if kind is Kind.GUEST and not all(f.lstrip("-").isdigit() for f in fields[1:5]):
        return None
    return Marker(kind, fields, t_mono, t_wall)


@dataclass(frozen=True)
class Loop:
    """One timed loop: host times from its START and END lines, guest figures beside."""

    bench: str
    round: int
    iters: int
    ops: int
    guest_ns: int
    bytes: int
    t_start: float
    t_end: float
    wall_start: float
    wall_end: float
    #: Which pass over the scenarios this loop belongs to (set by the suite).
    pass_no: int = 1

    @property
    def host_s(self) -> float:
        return self.t_end - self.t_start

    @property
    def host_us_per_op(self) -> float:
        return self.host_s * 1e6 / self.ops

    @property
    def guest_us_per_op(self) -> float:
        """Guest-internal (blind to the VM's stops)."""
        return self.guest_ns / 1e3 / self.ops

    @property
    def host_mib_s(self) -> float | None:
        return self.bytes / (1 << 20) / self.host_s if self.bytes and self.host_s > 0 else None

    @property
    def guest_mib_s(self) -> float | None:
        """Guest-internal (blind to the VM's stops)."""
        s = self.guest_ns / 1e9
        return self.bytes / (1 << 20) / s if self.bytes and s > 0 else None


@dataclass
class Assembly:
    """What a console said so far: complete timed loops by round, and the rest."""

    loops: list[Loop] = field(default_factory=list)
    #: Round number -> host time its KB-ROUND line appeared (None: before tailing).
    rounds: dict[int, float | None] = field(default_factory=dict)
    calibration: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    ready: Marker | None = None
    done: bool = False

    def accepted_rounds(self, after: float, benches: Iterable[str]) -> list[int]:
        """Rounds that began at or after host time ``after`` and have a complete loop for
        every benchmark in ``benches`` that was not skipped, in order."""
        want = {b for b in benches if b not in self.skipped}
        have: dict[int, set[str]] = {}
        for lp in self.loops:
            have.setdefault(lp.round, set()).add(lp.bench)
        return [
            r
            for r, t in sorted(self.rounds.items())
            if t is not None and t >= after and want <= have.get(r, set())
        ]

    def loops_of(self, rounds: Sequence[int]) -> list[Loop]:
        keep = set(rounds)
        return [lp for lp in self.loops if lp.round in keep]


def assemble(markers: Iterable[Marker]) -> Assembly:
    """Pair START/END/GUEST lines into :class:`Loop` objects.

    A loop counts only if its START and END were both seen while tailing (host times
    known), they name the same benchmark and round, and the GUEST line that follows
    reports a positive operation count.
    """
    out = Assembly()
    open_start: Marker | None = None
    ended: tuple[Marker, Marker] | None = None
    for m in markers:
        if m.kind is Kind.READY:
            out.ready = m
        elif m.kind is Kind.CAL:
            out.calibration[m.fields[0]] = int(m.fields[1])
        elif m.kind is Kind.SKIP:
            out.skipped[m.fields[0]] = " ".join(m.fields[1:])
        elif m.kind is Kind.FAIL:
            out.failures.append(" ".join(m.fields))
            open_start = ended = None
        elif m.kind is Kind.DONE:
            out.done = True
        elif m.kind is Kind.ROUND:
            out.rounds[int(m.fields[0])] = m.t_mono
            open_start = ended = None
        elif m.kind is Kind.START:
            open_start, ended = m, None
        elif m.kind is Kind.END:
            if open_start is not None and open_start.fields[:2] == m.fields[:2]:
                ended = (open_start, m)
            open_start = None
        elif m.kind is Kind.GUEST:
            if ended is None:
                continue
            start, end = ended
            ended = None
            bench, rnd = m.fields[0], int(m.fields[1])
            if (bench, str(rnd)) != start.fields[:2]:
                continue
            ops, ns, nbytes = int(m.fields[2]), int(m.fields[3]), int(m.fields[4])
            if ops <= 0 or start.t_mono is None or end.t_mono is None:
                continue
            out.loops.append(
                Loop(
                    bench=bench,
                    round=rnd,
                    iters=int(start.fields[2]),
                    ops=ops,
                    guest_ns=ns,
                    bytes=nbytes,
                    t_start=start.t_mono,
                    t_end=end.t_mono,
                    wall_start=start.t_wall if start.t_wall is not None else 0.0,
                    wall_end=end.t_wall if end.t_wall is not None else 0.0,
                )
            )
    return out


# ---- tailing ---------------------------------------------------------------------------

_IN_MODIFY = 0x00000002
_IN_ATTRIB = 0x00000004
_IN_DELETE_SELF = 0x00000400
_IN_MOVE_SELF = 0x00000800
_IN_NONBLOCK = 0o4000
_IN_CLOEXEC = 0o2000000


class _Inotify:
    """The two inotify calls we need, through libc (no third-party package)."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        self._add = libc.inotify_add_watch
        self._add.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.fd: int = fd

    def watch(self, path: Path) -> None:
        mask = _IN_MODIFY | _IN_ATTRIB | _IN_DELETE_SELF | _IN_MOVE_SELF
        if self._add(self.fd, os.fsencode(path), mask) < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self.fd, 65536):
                pass

    def close(self) -> None:
        os.close(self.fd)


class ConsoleTail:
    """Follows a console file in a thread of its own and stamps each new line.

    The thread wakes on inotify events (falling back to polling every ``poll_s`` where
    inotify is missing) and does nothing else, so a line's host time is when it appeared
    plus the thread's wake-up latency. On a busy host that latency reached tens of
    milliseconds, so the thread asks for real-time scheduling (SCHED_FIFO; it sleeps
    nearly all the time) where allowed; ``realtime`` says whether it got it. Lines
    present before :meth:`start` get no time.
    The file may not exist yet; if it is truncated or replaced, reading starts over.
    """

    def __init__(self, path: Path, *, poll_s: float = 0.001) -> None:
        self.path = path
        self.poll_s = poll_s
        self._markers: list[Marker] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = 0.0
        self.uses_inotify = False
        self.realtime = False
        self.error: BaseException | None = None

    def start(self) -> ConsoleTail:
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="console-tail", daemon=True)
        self._thread.start()
        return self

    def markers(self) -> list[Marker]:
        with self._lock:
            return list(self._markers)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> ConsoleTail:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        # pid 0 is this thread on Linux: only the tail thread becomes real-time.
        with contextlib.suppress(OSError, AttributeError):
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
            self.realtime = True
        try:
            self._follow()
        except BaseException as err:  # surfaced by the runner, never lost in a thread
            self.error = err

    def _follow(self) -> None:
        ino: _Inotify | None = None
        with contextlib.suppress(OSError):
            ino = _Inotify()
        fd: int | None = None
        inode: tuple[int, int] | None = None
        offset = 0
        partial = b""
        # Lines already in the file when we began carry no time.
        timed = False
        try:
            while not self._stop.is_set():
                if fd is None:
                    try:
                        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
                    except FileNotFoundError:
                        timed = True  # the file is new: everything in it is news
                        self._stop.wait(0.05)
                        continue
                    st = os.fstat(fd)
                    inode, offset, partial = (st.st_dev, st.st_ino), 0, b""
                    if ino is not None:
                        try:
                            ino.watch(self.path)
                            self.uses_inotify = True
                        except OSError:
                            self.uses_inotify = False
                    # Read what is there (untimed unless the file appeared after start).
                    offset, partial = self._consume(fd, offset, partial, timed)
                    timed = True
                    continue
                if self.uses_inotify and ino is not None:
                    ready, _, _ = select.select([ino.fd], [], [], 0.05)
                    if ready:
                        ino.drain()
                else:
                    self._stop.wait(self.poll_s)
                try:
                    st = os.stat(self.path)
                    replaced = (st.st_dev, st.st_ino) != inode or st.st_size < offset
                except FileNotFoundError:
                    replaced = True
                if replaced:
                    # Catch the old file's last bytes, then start over on the new one.
                    offset, partial = self._consume(fd, offset, partial, True)
                    os.close(fd)
                    fd = None
                    continue
                offset, partial = self._consume(fd, offset, partial, True)
        finally:
            if fd is not None:
                os.close(fd)
            if ino is not None:
                ino.close()

    def _consume(self, fd: int, offset: int, partial: bytes, timed: bool) -> tuple[int, bytes]:
        chunks = []
        while True:
            try:
                data = os.pread(fd, 1 << 16, offset)
            except OSError as err:
                if err.errno == errno.EINTR:
                    continue
                raise
            if not data:
                break
            chunks.append(data)
            offset += len(data)
        if not chunks:
            return offset, partial
        t_mono, t_wall = (time.monotonic(), time.time()) if timed else (None, None)
        buf = partial + b"".join(chunks)
        *lines, rest = buf.split(b"\n")
        found = []
        for raw in lines:
            m = parse_line(raw.decode(errors="replace"), t_mono, t_wall)
            if m is not None:
                found.append(m)
        if found:
            with self._lock:
                self._markers.extend(found)
        return offset, rest


__all__ = [
    "ALL_BENCHMARKS",
    "IOZONE",
    "LMBENCH",
    "Assembly",
    "ConsoleTail",
    "Kind",
    "Loop",
    "Marker",
    "assemble",
    "parse_line",
]
