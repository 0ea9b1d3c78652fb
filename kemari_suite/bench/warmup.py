"""Warm baselines: every unprotected baseline gets the device-state captures a
protected guest gets, and the benchmark checks that this took hold.

The cold-guest trap (docs/benchmarks.md): under TCG, a guest whose device state has
never been captured can run a loop that writes across a working set many times slower
than after a few captures (``migrate`` with ``x-ignore-shared``); ``stop`` and ``cont``
alone change nothing. A protected guest is captured at every sync point, so an
unprotected baseline that is not captured compares a cold guest with warm ones.

:func:`warm_up` runs on the unprotected guest, whose init command starts with
:meth:`WarmupParams.guest_command` (``ktouch``, :mod:`kemari_suite.bench.touchprobe`)::

    ktouch appears in RAM -> settle_s -> cold window (cold_s) -> captures every interval_s
    for capture_s -> gap_s -> warm window (warm_s) -> ktouch exits, the benchmark runs

and returns a :class:`WarmupCheck`: both rates, the captures, and whether the warm rate
is at least ``min_ratio`` times the cold one (:class:`WarmupStatus`). Rates are read
from the probe in guest RAM on the host's clock. The check objects and their arithmetic
are pure; only :func:`warm_up` and :class:`RamProbe` touch a VM.
"""

from __future__ import annotations

import asyncio
import enum
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kemari_suite.errors import BenchmarkError, KemariError
from kemari_suite.vm import guestmem
from kemari_suite.vm.devstate import DeviceStateCapturer, enable_ignore_shared
from kemari_suite.vm.guestram import GuestRAM
from kemari_suite.vm.qemu import AsyncVM

Say = Callable[[str], None]


@dataclass(frozen=True)
class WarmupParams:
    """The warm-up's timing (host seconds) and its check's threshold."""

    #: ktouch's working set; larger than TCG's initial software TLB reaches, smaller
    #: than any guest here (128 MiB and up).
    working_set_mib: int = 16
    #: After ktouch appears in RAM, before the cold window.
    settle_s: float = 1.0
    cold_s: float = 2.0
    #: Device-state captures, one every ``interval_s`` (a sync point's rhythm), for this long.
    capture_s: float = 6.0
    interval_s: float = 0.1
    #: After the last capture, before the warm window: the guest stays warm on its own.
    gap_s: float = 0.5
    warm_s: float = 2.0
    #: ktouch outlives the host's windows by this much (guest seconds), so a slow host
    #: does not find it gone.
    margin_s: float = 5.0
    #: The warm-up took hold when the warm rate is at least this many times the cold one.
    min_ratio: float = 2.0
    #: How long ktouch may take to appear (the guest boots first).
    appear_timeout_s: float = 120.0

    @property
    def probe_s(self) -> float:
        """How long ktouch runs (guest seconds)."""
        return (
            self.settle_s + self.cold_s + self.capture_s + self.gap_s + self.warm_s + self.margin_s
        )

    def guest_command(self) -> str:
        """The init command's first part: ktouch, for :attr:`probe_s` guest seconds."""
        return f"ktouch -m {self.working_set_mib} -t {self.probe_s:g}"

    def then(self, command: str) -> str:
        """ktouch, then ``command`` (a shell command line) once ktouch has exited."""
        return f"{self.guest_command()}; {command}"


#: The default warm-up of every benchmark.
DEFAULT = WarmupParams()


class WarmupStatus(enum.Enum):
    #: warm / cold >= min_ratio: the guest was cold and the captures warmed it.
    HELD = "held"
    #: warm / cold < min_ratio: still cold, or never cold; the baseline is suspect.
    NOT_HELD = "not-held"
    #: A rate is missing (see ``error``): nothing confirms the baseline was warm.
    NOT_MEASURED = "not-measured"
    #: Not TCG: the trap is TCG's; the figures are recorded, the threshold not applied.
    NOT_APPLICABLE = "not-applicable"


@dataclass(frozen=True)
class WarmupCheck:
    """What one warm-up did and measured (rates in ktouch loops per host second)."""

    accel: str
    min_ratio: float = DEFAULT.min_ratio
    captures: int = 0
    #: Host seconds the captures took, first to last.
    capture_s: float = 0.0
    cold_rate: float | None = None
    warm_rate: float | None = None
    #: Why a rate is missing.
    error: str = ""
    probe: str = "ktouch"

    @property
    def ratio(self) -> float | None:
        if self.cold_rate is None or self.warm_rate is None or self.cold_rate <= 0:
            return None
        return self.warm_rate / self.cold_rate

    @property
    def status(self) -> WarmupStatus:
        if self.accel != "tcg":
            return WarmupStatus.NOT_APPLICABLE
        ratio = self.ratio
        if ratio is None:
            return WarmupStatus.NOT_MEASURED
        return WarmupStatus.HELD if ratio >= self.min_ratio else WarmupStatus.NOT_HELD

    @property
    def ok(self) -> bool:
        return self.status in (WarmupStatus.HELD, WarmupStatus.NOT_APPLICABLE)

    def describe(self) -> str:
        """One line: the verdict and its figures."""
        return describe(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        """The results.json form (the fields, ``ratio``, ``status`` and ``ok``)."""
        return {**asdict(self), "ratio": self.ratio, "status": self.status.value, "ok": self.ok}


def _rate(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


def describe(check: Mapping[str, Any]) -> str:
    """One line for a check in its results.json form."""
    status = str(check.get("status", ""))
    figures = (
        f"cold {_rate(check.get('cold_rate'))} -> warm {_rate(check.get('warm_rate'))} "
        f"{check.get('probe', 'ktouch')} loops/s"
    )
    ratio = check.get("ratio")
    if ratio is not None:
        figures += f" ({ratio:.1f}x, threshold {check.get('min_ratio', 0):g}x)"
    figures += f", {check.get('captures', 0)} captures in {check.get('capture_s', 0.0):.1f} s"
    if status == WarmupStatus.HELD.value:
        return f"took hold: {figures}"
    if status == WarmupStatus.NOT_HELD.value:
        return f"DID NOT TAKE HOLD: {figures}"
    if status == WarmupStatus.NOT_APPLICABLE.value:
        return f"not checked ({check.get('accel')}, the trap is TCG's): {figures}"
    return f"NOT MEASURED ({check.get('error') or 'no figure'}): {figures}"


def summarize(checks: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Every check of a run in one entry: ``ok`` (every check ok, and at least one
    made), the medians, and ``problems`` (one line per check that is not ok)."""

    def med(key: str) -> float | None:
        vals = [float(c[key]) for c in checks if c.get(key) is not None]
        return float(statistics.median(vals)) if vals else None

    problems = [describe(c) for c in checks if not c.get("ok")]
    if not checks:
        problems.append("no unprotected baseline was warmed and checked")
    return {
        "ok": not problems,
        "checks": len(checks),
        "min_ratio": checks[0].get("min_ratio") if checks else None,
        "cold_rate_median": med("cold_rate"),
        "warm_rate_median": med("warm_rate"),
        "ratio_median": med("ratio"),
        "problems": problems,
    }


def alarm(summary: Mapping[str, Any], what: str = "Base") -> str | None:
    """The loud line for a run whose warm-up did not take hold; None when it did."""
    if summary.get("ok", False):
        return None
    first = (summary.get("problems") or ["?"])[0]
    return (
        f"WARNING: the {what} warm-up did not take hold ({first}). The unprotected baseline "
        "may have run cold (docs/benchmarks.md, the cold-guest trap): every ratio to it is "
        "suspect."
    )


# --------------------------------------------------------------------------- on a VM


class RamProbe:
    """Reads one workload probe (by magic) from a guest RAM file on the host's clock."""

    def __init__(self, ram_path: Path, magic: bytes, *, name: str = "probe") -> None:
        self.ram = GuestRAM(ram_path, populate=False)
        self.magic = magic
        self.name = name
        self.offset: int | None = None

    def value(self) -> int | None:
        pages = self.ram.pages
        if self.offset is not None:
            v = guestmem.read_value(pages, self.offset, self.magic)
            if v is not None:
                return v
        hits = guestmem.locate_probes(pages, self.magic)
        if not hits:
            return None
        best = max(hits, key=lambda h: h.value)
        self.offset = best.offset
        return best.value

    async def wait(self, timeout: float) -> None:
        """Until the probe is in RAM.

        Raises:
            BenchmarkError: it did not appear within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while self.value() is None:
            if time.monotonic() > deadline:
                raise BenchmarkError("warm-up", f"{self.name} never appeared in guest RAM")
            await asyncio.sleep(0.1)

    async def rate(self, seconds: float) -> float:
        """Increments per host second over ``seconds``.

        Raises:
            BenchmarkError: the probe was gone at either end.
        """
        v0, t0 = self.value(), time.monotonic()
        await asyncio.sleep(seconds)
        v1, t1 = self.value(), time.monotonic()
        if v0 is None or v1 is None:
            raise BenchmarkError("warm-up", f"{self.name} left guest RAM during a window")
        return (v1 - v0) / (t1 - t0)

    def close(self) -> None:
        self.ram.close()


async def capture_for(vm: AsyncVM, seconds: float, interval_s: float) -> tuple[int, float]:
    """Device-state captures of the running ``vm`` (stop, capture, cont), one every
    ``interval_s``, for ``seconds``; returns (captures, seconds taken).

    Raises:
        ReplicationError: a capture failed.
        VMError: QEMU refused stop or cont.
    """
    await enable_ignore_shared(vm)
    cap = DeviceStateCapturer(vm, vm.paths.migration_socket)
    n = 0
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < seconds:
            await vm.execute("stop")
            try:
                await cap.capture()
            finally:
                await vm.execute("cont")
            n += 1
            await asyncio.sleep(interval_s)
    finally:
        cap.close()
    return n, time.monotonic() - t0


async def warm_up(
    vm: AsyncVM, params: WarmupParams = DEFAULT, *, accel: str, say: Say | None = None
) -> WarmupCheck:
    """Warm the unprotected ``vm`` with device-state captures and measure ktouch's rate
    before and after (see the module docstring). A failure is recorded in the check
    (``error``, status NOT_MEASURED), never raised: the caller flags the run.
    """
    note = say or (lambda _m: None)
    cold: float | None = None
    warm: float | None = None
    n, took = 0, 0.0
    error = ""
    try:
        probe = RamProbe(vm.paths.ram, guestmem.TOUCH_MAGIC, name="ktouch")
    except (KemariError, OSError) as err:
        return WarmupCheck(accel, params.min_ratio, error=f"guest RAM: {err}")
    try:
        await probe.wait(params.appear_timeout_s)
        await asyncio.sleep(params.settle_s)
        cold = await probe.rate(params.cold_s)
        note(f"warm-up: cold {cold:,.0f} loops/s; device-state captures for {params.capture_s:g} s")
        n, took = await capture_for(vm, params.capture_s, params.interval_s)
        await asyncio.sleep(params.gap_s)
        warm = await probe.rate(params.warm_s)
        note(f"warm-up: warm {warm:,.0f} loops/s after {n} captures")
    except KemariError as err:
        error = str(err)
    finally:
        probe.close()
    return WarmupCheck(
        accel,
        params.min_ratio,
        captures=n,
        capture_s=took,
        cold_rate=cold,
        warm_rate=warm,
        error=error,
    )


__all__ = [
    "DEFAULT",
    "RamProbe",
    "WarmupCheck",
    "WarmupParams",
    "WarmupStatus",
    "alarm",
    "capture_for",
    "describe",
    "summarize",
    "warm_up",
]
