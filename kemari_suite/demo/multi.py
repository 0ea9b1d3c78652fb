"""The failover demo with several VMs on one lab pair (``kemari demo --vms N``; the
one-VM demo is :mod:`kemari_suite.demo`).

1. a lab (two hosts, a client namespace) with a TAP per VM on each host,
2. N small guests, each protected by its own pair of agents (:class:`LabPair` with
   ``slotted`` options: addresses, ports and folders from the VM's name); most
   primaries run on the lab's primary host (A), at least one on the secondary (B),
   so the pair runs VMs in both directions; one witness serves every pair,
3. every agent's ``/metrics`` is scraped over HTTP from the client namespace while the
   guests run, and parsed with prometheus_client's own parser,
4. the client reads every guest's counter over the LAN,
5. host A is lost: ``kill -9`` of every agent and QEMU in its namespace, by PID (the
   primaries there and the standbys of B's primaries),
6. A's VMs fail over to B; B's VMs lost their standby and go on, unprotected. Every VM
   must answer its counter again, never behind what the client read before the kill.

``records_lost`` of a VM: how many counter values the client read (and so were
acknowledged: output commit released them) that the VM no longer has: the highest
value read before the kill minus the first value read after it, when that is lower;
0 otherwise. None when the VM never answered after the kill.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from kemari_suite import lab as labmod
from kemari_suite.config import KemariConfig
from kemari_suite.errors import KemariError
from kemari_suite.lab.addressing import HostRole
from kemari_suite.lab.netclient import tcp_request
from kemari_suite.lab.pair import (
    SEVERAL_HEARTBEAT_TIMEOUT_MS,
    SEVERAL_MEMORY_MIB,
    HostLoss,
    LabPair,
    PairOptions,
    after_host_loss,
    kill_host,
    several_pairs,
)
from kemari_suite.vm.define import ensure_image
from kemari_suite.vm.qemu import choose_accel

MULTI_LAB_ID = "dmm"
MULTI_MEMORY_MIB = SEVERAL_MEMORY_MIB
MULTI_HEARTBEAT_TIMEOUT_MS = SEVERAL_HEARTBEAT_TIMEOUT_MS


_HOST_NAMES: dict[HostRole, str] = {"primary": "A", "secondary": "B"}
#: One VM's entry in the demo's JSON.
VmResult = HostLoss


@dataclass
class MultiDemoResult:
    vms: list[VmResult] = field(default_factory=list)
    #: Samples parsed from every scrape of every agent's ``/metrics``.
    prometheus_samples: int = 0
    prometheus_scrapes: int = 0
    prometheus_errors: int = 0
    killed_host: str = "primary"
    memory_mib: int = MULTI_MEMORY_MIB
    accel: str = ""
    profile: str = ""
    resumed: bool = False
    error: str | None = None
    timeline: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def vm_names(count: int) -> list[str]:
    """``vm1``..``vmN``: names that take slots 2..N+1, never clashing."""
    return [f"vm{i}" for i in range(1, count + 1)]


def reversed_count(count: int) -> int:
    """How many of ``count`` VMs run their primary on host B: at least one (both
    directions), fewer than half when there are three or more (most on host A)."""
    return 0 if count < 2 else max(1, (count - 1) // 2)


class Scraper:
    """Scrapes every agent's ``/metrics`` from the client namespace every ``every_s``
    seconds in a thread, parsing each answer with prometheus_client's parser."""

    def __init__(self, lab_ns: str, targets: list[tuple[str, int]], every_s: float = 1.0):
        self.ns, self.targets, self.every_s = lab_ns, targets, every_s
        self.samples = self.scrapes = self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics-scraper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(30)

    def scrape_once(self) -> None:
        for host, port in self.targets:
            try:
                self.samples += scrape(self.ns, host, port)
                self.scrapes += 1
            except (KemariError, ValueError):
                self.errors += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self.scrape_once()
            self._stop.wait(self.every_s)


def scrape(ns: str, host: str, port: int, timeout: float = 3.0) -> int:
    """GET ``http://host:port/metrics`` from namespace ``ns``; the number of samples
    prometheus_client's parser finds in the answer.

    Raises:
        ConnectError: no answer. ValueError: not a 200 answer, or not the text format.
    """
    from prometheus_client.parser import text_string_to_metric_families

    request = f"GET /metrics HTTP/1.0\r\nHost: {host}:{port}\r\n\r\n".encode()
    raw = tcp_request(ns, host, port, request, timeout=timeout).decode(errors="replace")
    head, _, body = raw.partition("\r\n\r\n")
    if " 200 " not in head.split("\r\n", 1)[0] + " ":
        raise ValueError(f"{host}:{port}: {head.splitlines()[:1]}")
    return sum(len(family.samples) for family in text_string_to_metric_families(body))


def run_multi_demo(
    cfg: KemariConfig,
    *,
    count: int,
    profile: str = "1g",
    lab_id: str = MULTI_LAB_ID,
    run_seconds: float = 4.0,
    memory_mib: int = MULTI_MEMORY_MIB,
    progress: Callable[[str], None] | None = None,
    keep: bool = False,
) -> MultiDemoResult:
    """Run the demo with ``count`` VMs (see the module docstring); never prints.

    Raises:
        KemariError: a step failed (lab, image, agents); the lab is torn down first.
    """
    say = progress or (lambda _m: None)
    res = MultiDemoResult(profile=profile, memory_mib=memory_mib)
    res.accel, why = choose_accel(cfg.vm.accel)
    t_start = time.monotonic()

    def mark(step: str) -> None:
        res.timeline.append({"t": round(time.monotonic() - t_start, 3), "step": step})
        say(step)

    names = vm_names(count)
    mark(f"accelerator: {res.accel} ({why})")
    ensure_image(cfg, progress=lambda m: say(f"image: {m}"))
    mark(f"lab {lab_id}: two hosts, a client namespace, {profile} replication link")
    lay = labmod.fresh(lab_id, profile, say=mark)
    r = cfg.replication
    template = PairOptions(
        memory_mib=memory_mib,
        heartbeat_interval_ms=r.heartbeat_interval_ms,
        heartbeat_timeout_ms=max(r.heartbeat_timeout_ms, MULTI_HEARTBEAT_TIMEOUT_MS),
        max_interval_ms=r.max_interval_ms,
        tapped_net=True,
    )
    on_b = reversed_count(count)
    on_a = count - on_b
    # The host holding most primaries (A on a tie) is the one lost.
    victim: HostRole = "primary" if on_a >= on_b else "secondary"
    pairs: list[LabPair] = []
    scraper: Scraper | None = None
    try:
        pairs = several_pairs(lay, cfg, template, names, on_b)
        mark(f"{count} VMs: {on_a} primaries on host A, {on_b} on host B; one witness")
        pairs[0].start_witness()
        for p in pairs:
            p.start_secondary()
        for p in pairs:
            p.wait_control("secondary", 120)
            p.start_primary()
        mark("booting the guests on their primaries")
        for p in pairs:
            p.wait_state("primary", {"protected"}, 600)
            mark(f"{p.opts.vm_name} protected ({p.guest_ip})")
        targets = [
            (lay.lan_ip_for(p.opts.host_of(role)), p.addresses.metrics_port)
            for p in pairs
            for role in ("primary", "secondary")
        ]
        scraper = Scraper(lay.ns_client, targets)
        scraper.start()
        seen: dict[str, int] = {}
        for p in pairs:
            seen[p.opts.vm_name] = p.wait_counter(120)
        mark("the client reads every counter over the LAN: " + _counters(seen))
        t_end = time.monotonic() + run_seconds
        while time.monotonic() < t_end:
            _read_all(pairs, seen)
            time.sleep(0.3)
        _read_all(pairs, seen)
        mark("counters before the kill: " + _counters(seen))
        scraper.stop()
        res.killed_host = victim
        mark(
            f"host {_HOST_NAMES[victim]} lost: kill -9 of every agent and QEMU in "
            f"{lay.ns_for(victim)}"
        )
        kill_host(pairs, victim)
        for p in pairs:
            res.vms.append(after_host_loss(p, seen.get(p.opts.vm_name), victim))
            v = res.vms[-1]
            mark(f"{v.name}: {v.outcome}, counter {v.counter_after}, lost {v.records_lost}")
        # The surviving host's agents once more, after the kill (the dead ones are gone).
        scraper.targets = [t for t in targets if t[0] != lay.lan_ip_for(victim)]
        scraper.scrape_once()
        res.prometheus_samples, res.prometheus_scrapes = scraper.samples, scraper.scrapes
        res.prometheus_errors = scraper.errors
        mark(f"{res.prometheus_samples} samples parsed from {scraper.scrapes} scrapes")
        res.resumed = all(v.resumed for v in res.vms)
    except KemariError as err:
        res.error = str(err)
        raise
    finally:
        if scraper is not None:
            scraper.stop()
        if not keep:
            for p in pairs:
                p.stop()
            labmod.down(lab_id)
    return res


def _read_all(pairs: list[LabPair], seen: dict[str, int]) -> None:
    for p in pairs:
        with contextlib.suppress(KemariError):
            value = p.read_counter()
            seen[p.opts.vm_name] = max(value, seen.get(p.opts.vm_name, value))


def _counters(seen: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in seen.items())
