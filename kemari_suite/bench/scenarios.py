"""Benchmark scenarios (``benchmarks/scenarios/*.toml``) and the suite's parameters.

A scenario file says how the guest is run::

    name = "kemari-10g-shared"          # also the file's stem
    title = "Kemari(10g) + shared disk"
    kind = "kemari"                     # "base": unprotected, no agents
    profile = "10g"                     # replication link: 1g, 10g or unlimited
    disk = "shared"                     # kemari: "shared" or "builtin"; base: "file"
    tiebreaker = "lease"                # kemari: "witness" or "lease"
    max_interval_ms = 1000              # kemari: the same for every Kemari row (default:
                                        # the product's replication.max_interval_ms)
    policy = "output"                   # kemari: tap.policy (output, kemari, remus)
    remus_interval_ms = 100             # kemari with policy "remus": the fixed epoch
    published = "Kemari(10GbE) + FC"    # the published row it is set beside
    order = 3                           # position in tables

:class:`SuiteParams` holds what the guest runs (loop length, rounds, IOzone sizes);
:data:`QUICK` and :data:`FULL` are the two presets.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kemari_suite.config import ReplicationConfig
from kemari_suite.errors import ConfigError

#: Where the scenario files live in a checkout.
SCENARIO_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "scenarios"

_KINDS = ("base", "kemari")
_PROFILES = ("1g", "10g", "unlimited")
_DISKS = {"base": ("file",), "kemari": ("shared", "builtin")}
_TIEBREAKERS = ("witness", "lease")
#: ``output`` is the product's default; ``kemari`` the seed's rule (a sync point at
#: every outbound I/O, disk included); ``remus`` fixed epochs.
_POLICIES = ("output", "kemari", "remus")


@dataclass(frozen=True)
class Scenario:
    """One row of the report."""

    name: str
    title: str
    kind: str
    profile: str
    disk: str
    tiebreaker: str = "witness"
    max_interval_ms: int = ReplicationConfig().max_interval_ms
    policy: str = "output"
    remus_interval_ms: int = 100
    published: str = ""
    order: int = 0

    @property
    def protected(self) -> bool:
        return self.kind == "kemari"


def parse_scenario(data: dict[str, Any], *, path: str = "<scenario>") -> Scenario:
    """A :class:`Scenario` from a TOML table.

    Raises:
        ConfigError: an unknown key, a missing one, or a value out of range.
    """
    known = {
        "name": str,
        "title": str,
        "kind": str,
        "profile": str,
        "disk": str,
        "tiebreaker": str,
        "max_interval_ms": int,
        "policy": str,
        "remus_interval_ms": int,
        "published": str,
        "order": int,
    }
    for key, value in data.items():
        if key not in known:
            raise ConfigError(
                f"unknown key (known: {', '.join(sorted(known))})", path=path, key=key
            )
        tp = known[key]
        if isinstance(value, bool) or not isinstance(value, tp):
            raise ConfigError(f"expected {tp.__name__}, got {value!r}", path=path, key=key)
    for key in ("name", "kind", "profile", "disk"):
        if key not in data:
            raise ConfigError("missing", path=path, key=key)
    sc = Scenario(
        name=data["name"],
        title=data.get("title", data["name"]),
        kind=data["kind"],
        profile=data["profile"],
        disk=data["disk"],
        tiebreaker=data.get("tiebreaker", "witness"),
        max_interval_ms=data.get("max_interval_ms", ReplicationConfig().max_interval_ms),
        policy=data.get("policy", "output"),
        remus_interval_ms=data.get("remus_interval_ms", 100),
        published=data.get("published", ""),
        order=data.get("order", 0),
    )
    if sc.kind not in _KINDS:
        raise ConfigError(f"{sc.kind!r} is not one of {_KINDS}", path=path, key="kind")
    if sc.profile not in _PROFILES:
        raise ConfigError(f"{sc.profile!r} is not one of {_PROFILES}", path=path, key="profile")
    if sc.disk not in _DISKS[sc.kind]:
        raise ConfigError(
            f"{sc.disk!r} is not one of {_DISKS[sc.kind]} for kind {sc.kind!r}",
            path=path,
            key="disk",
        )
    if sc.tiebreaker not in _TIEBREAKERS:
        raise ConfigError(
            f"{sc.tiebreaker!r} is not one of {_TIEBREAKERS}", path=path, key="tiebreaker"
        )
    if sc.max_interval_ms <= 0:
        raise ConfigError("must be positive", path=path, key="max_interval_ms")
    if sc.policy not in _POLICIES:
        raise ConfigError(f"{sc.policy!r} is not one of {_POLICIES}", path=path, key="policy")
    if sc.remus_interval_ms <= 0:
        raise ConfigError("must be positive", path=path, key="remus_interval_ms")
    if not sc.name or not all(c.isalnum() or c in "-_" for c in sc.name):
        raise ConfigError("letters, digits, '-' or '_'", path=path, key="name")
    return sc


def load_scenarios(folder: Path = SCENARIO_DIR) -> list[Scenario]:
    """Every ``*.toml`` scenario in ``folder``, in report order.

    Raises:
        ConfigError: a file is unreadable or invalid, two share a name, there is not
            exactly one base scenario, or the Kemari rows differ in max_interval_ms.
    """
    out = []
    for path in sorted(folder.glob("*.toml")):
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"cannot load: {err}", path=str(path)) from err
        sc = parse_scenario(data, path=str(path))
        if sc.name != path.stem:
            raise ConfigError(f"name {sc.name!r} differs from the file name", path=str(path))
        out.append(sc)
    check_scenarios(out)
    return sorted(out, key=lambda s: (s.order, s.name))


def check_scenarios(scenarios: list[Scenario]) -> None:
    """Cross-scenario rules; see :func:`load_scenarios`."""
    names = [s.name for s in scenarios]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ConfigError(f"duplicate scenario names {sorted(dup)}")
    bases = [s for s in scenarios if s.kind == "base"]
    if len(bases) != 1:
        raise ConfigError(f"expected exactly one base scenario, found {len(bases)}")
    intervals = {s.max_interval_ms for s in scenarios if s.protected}
    if len(intervals) > 1:
        # No row may look cheap merely because it synchronized less often.
        raise ConfigError(f"Kemari rows must share one max_interval_ms, found {sorted(intervals)}")


def select(scenarios: list[Scenario], names: list[str] | None) -> list[Scenario]:
    """The named scenarios (all when ``names`` is None), always with the base row.

    Raises:
        ConfigError: a name is unknown.
    """
    if not names:
        return list(scenarios)
    by_name = {s.name: s for s in scenarios}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ConfigError(f"unknown scenarios {unknown} (known: {sorted(by_name)})")
    wanted = set(names) | {s.name for s in scenarios if s.kind == "base"}
    return [s for s in scenarios if s.name in wanted]


@dataclass(frozen=True)
class SuiteParams:
    """What the guest runs and how much of it the host keeps."""

    #: Guest seconds one timed loop lasts (iterations calibrated once, in the first Base
    #: boot, then passed to every later boot so that every row does the same work).
    loop_s: float
    #: Rounds kept per scenario and pass (each round runs every benchmark once).
    rounds: int
    #: Passes over all scenarios (Base first in each; later passes reverse the order of
    #: the Kemari rows), so that slow drifts of the host's load hit every row alike.
    passes: int
    #: Guest warm-up once its clocksource left tsc-early.
    warmup_s: float
    #: Rounds are kept only if they began this long after the pair was protected.
    settle_s: float
    #: Round 1 is a warm-up (dropped); its loops run this fraction of the iterations.
    warm_fraction: float = 0.25
    #: IOzone-style passes: bytes written buffered (then fsync), and with O_SYNC.
    io_file_kib: int = 8192
    io_sync_kib: int = 2048
    io_record_kib: int = 4
    #: Page-fault file on the guest's tmpfs.
    pf_kib: int = 8192
    #: Guest disk (both rows with a disk and the base row).
    disk_mib: int = 16
    #: Nice value of the suite and everything it starts (QEMU, agents), when below the
    #: current one: on a shared machine the rows should compete with each other, not with
    #: unrelated work (0 keeps the current priority).
    nice: int = -5
    #: Give up on a scenario pass after this long without its rounds.
    scenario_timeout_s: float = 240.0
    benchmarks: tuple[str, ...] = (
        "fork",
        "exec",
        "sh",
        "pagefault",
        "ctxsw",
        "iozone_wbuf",
        "iozone_osync",
    )

    def guest_command(self, iters: dict[str, int] | None = None) -> str:
        """The guest's init command (kbench runs rounds until the VM is stopped).

        ``iters`` fixes the iteration counts instead of calibrating them in the guest.
        """
        cmd = (
            f"kbench -t {self.loop_s:g} -r 0 -W {self.warm_fraction:g} -w {self.warmup_s:g} "
            f"-d /dev/vda -F {self.io_file_kib} -S {self.io_sync_kib} -R {self.io_record_kib} "
            f"-P {self.pf_kib} -b {','.join(self.benchmarks)}"
        )
        if iters:
            cmd += " -i " + ",".join(f"{b}={n}" for b, n in sorted(iters.items()))
        return cmd


QUICK = SuiteParams(loop_s=0.7, rounds=3, passes=2, warmup_s=1.0, settle_s=1.0, io_sync_kib=512)
FULL = SuiteParams(
    loop_s=1.5, rounds=3, passes=3, warmup_s=2.0, settle_s=2.0, scenario_timeout_s=480.0
)

__all__ = [
    "FULL",
    "QUICK",
    "SCENARIO_DIR",
    "Scenario",
    "SuiteParams",
    "check_scenarios",
    "load_scenarios",
    "parse_scenario",
    "select",
]
