"""A real service through failover: Debian's nginx in a 2-vCPU Debian guest, protected
from a VM definition, driven by Debian's curl from the lab's client namespace.

The campaign (``kemari bench service``; a small sample runs in the e2e tests):

1. **Unprotected, cold**: the primary runs alone (the witness confirms it may), the
   client stores records for ``measure_s`` seconds. The guest has never had its device
   state captured (docs/benchmarks.md, the cold-guest trap), so this figure is kept
   only beside the baseline.
2. **Protected**: the standby starts; once the primary is protected the client stores
   records for the same time.
3. **Unprotected, warm (the baseline)**: the standby is killed; the primary goes on
   alone with a guest captured at every sync point so far, warmed as the protected
   guest was, and the client stores records for the same time again. Then the standby
   comes back and the primary is protected again.
4. **Kills**: ``kills`` times, at a random moment while the client writes, the host
   running the VM is killed (agent and QEMU, SIGKILL). The other host resumes the VM
   from the last checkpoint and protects it again once the killed host, restarted as
   a standby, has a full copy. The client never stops; a request that got no answer
   is retried under a new name, and the outage it sees is measured on the host clock.
5. **Check**: every record the client saw stored (HTTP 201) is read back from the
   running guest; then the guest is shut down cleanly and its disk is checked offline
   (``e2fsck -fn`` and every record read from the image with debugfs).

A record is a small file PUT to nginx's WebDAV location; 201 is returned only after
the guest wrote it to its page cache, and the guest's output (the 201) leaves the host
only once the checkpoint holding that state is acknowledged by the standby.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import os
import random
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kemari_suite import lab as labmod
from kemari_suite.bench.memsync import header_lines, machine_info, pct
from kemari_suite.config import KemariConfig
from kemari_suite.errors import BenchmarkError, KemariError
from kemari_suite.lab.netclient import enter_netns
from kemari_suite.lab.pair import LabPair, PairOptions
from kemari_suite.vm.debian import (
    DEFAULT_SIZE_MIB,
    build_debian_image,
    debian_cmdline,
    offline_check,
)
from kemari_suite.vm.image import build_image

Progress = Callable[[str], None]

#: Guest size for the service: enough for Debian's nginx with two workers.
MEMORY_MIB = 256
VCPUS = 2
#: The default Debian image (shared with the image tests, so CI builds it once).
DISK_MIB = DEFAULT_SIZE_MIB
#: Concurrent writers of the throughput phases (``kemari bench service --clients``).
CLIENT_COUNTS = (4, 16, 64)
#: Record names the writers of one start share (they cycle through them).
NAMES_PER_START = 1024
#: After the writers change, this long before a measurement starts.
SETTLE_S = 2.0


@dataclass
class Request:
    name: str
    body: bytes
    t0: float
    t1: float = 0.0
    code: int = 0


class Client:
    """``workers`` threads storing records until stopped.

    Each thread keeps one HTTP/1.1 connection to nginx open (from inside the client
    namespace) and PUTs ``/records/g<start>w<worker>-<n>`` with a random body on it; a
    201 (or 204) means committed. The writers of one start share ``names`` record
    names, each writer cycling through its own, so a long run rewrites records instead
    of filling the guest's disk with new files (every new body is checked as the
    record's content, :meth:`committed`). A failure (no answer, reset) is recorded and the next
    request gets a new name on a new connection, like a client that gives up on one
    request and goes on. The one-off requests (``put``, ``get``, ``control_stop``) use
    Debian's curl.
    """

    def __init__(
        self,
        ns: str,
        ip: str,
        workers: int = 4,
        timeout_s: float = 20.0,
        port: int = 80,
        names: int = NAMES_PER_START,
    ) -> None:
        self.ns, self.ip, self.workers, self.timeout_s = ns, ip, workers, timeout_s
        self.port, self.names = port, names
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._gen = 0
        self.curl = shutil.which("curl") or "curl"

    def put(self, name: str, body: bytes, timeout: float | None = None) -> int:
        """One PUT; the HTTP status, or 0 when no answer came."""
        argv = [
            "ip", "netns", "exec", self.ns, self.curl, "-s", "-o", "/dev/null",
            "-w", "%{http_code}", "--max-time", str(timeout or self.timeout_s),
            "-T", "-", f"http://{self.ip}/records/{name}",
        ]  # fmt: skip
        try:
            p = subprocess.run(argv, input=body, capture_output=True, timeout=60, check=False)
        except subprocess.TimeoutExpired:
            return 0
        out = p.stdout.decode(errors="replace").strip()
        return int(out) if out.isdigit() else 0

    def get(self, name: str, timeout: float = 20.0) -> bytes | None:
        argv = [
            "ip", "netns", "exec", self.ns, self.curl, "-sf", "--max-time", str(timeout),
            f"http://{self.ip}/records/{name}",
        ]  # fmt: skip
        p = subprocess.run(argv, capture_output=True, timeout=60, check=False)
        return p.stdout if p.returncode == 0 else None

    def control_stop(self) -> int:
        """Ask the guest to stop cleanly (sync, read-only remount, power off)."""
        argv = [
            "ip", "netns", "exec", self.ns, self.curl, "-s", "-o", "/dev/null",
            "-w", "%{http_code}", "--max-time", "30", "-T", "-",
            f"http://{self.ip}/control/stop",
        ]  # fmt: skip
        p = subprocess.run(argv, input=b"stop\n", capture_output=True, timeout=60, check=False)
        out = p.stdout.decode(errors="replace").strip()
        return int(out) if out.isdigit() else 0

    def _worker(self, w: int, gen: int, stop: threading.Event) -> None:
        # This thread alone enters the client namespace; its connections live there and
        # are kept alive between requests, as a load balancer or an API client does.
        enter_netns(self.ns)
        conn: http.client.HTTPConnection | None = None
        n = 0
        cycle = max(4, self.names // self.workers)
        rnd = random.Random(os.getpid() * 1000 + gen * 100 + w)
        try:
            while not stop.is_set():
                name = f"g{gen}w{w}-{n % cycle:06d}"
                n += 1
                body = f"{name} {rnd.getrandbits(64):016x}\n".encode()
                r = Request(name, body, time.monotonic())
                if conn is None:
                    conn = http.client.HTTPConnection(self.ip, self.port, timeout=self.timeout_s)
                r.code, conn = self._keepalive_put(conn, name, body)
                r.t1 = time.monotonic()
                with self._lock:
                    self.requests.append(r)
                if r.code == 0:
                    stop.wait(0.2)
        finally:
            if conn is not None:
                conn.close()

    def _keepalive_put(
        self, conn: http.client.HTTPConnection, name: str, body: bytes
    ) -> tuple[int, http.client.HTTPConnection | None]:
        """One PUT on a kept-alive connection: (status or 0, the connection to go on
        with). A connection the server closed while idle (nginx does after a number of
        requests) fails at once; the same PUT, idempotent, is sent again on a new one."""
        for attempt in (0, 1):
            try:
                conn.request("PUT", f"/records/{name}", body=body)
                resp = conn.getresponse()
                resp.read()
                return resp.status, conn
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                conn.close()
                if attempt:
                    return 0, None
                conn = http.client.HTTPConnection(self.ip, self.port, timeout=self.timeout_s)
            except (OSError, http.client.HTTPException):
                conn.close()
                return 0, None
        return 0, None

    def start(self) -> None:
        self._gen += 1
        stop = self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._worker, args=(w, self._gen, stop), daemon=True)
            for w in range(self.workers)
        ]
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout_s + 30)

    def set_workers(self, workers: int) -> None:
        """Go on with ``workers`` writers (the running ones finish their request)."""
        self.stop()
        self.workers = workers
        self.start()

    def committed(self) -> dict[str, bytes]:
        """Each record's body as last stored. A name whose last request failed is left
        out: the guest may hold that request's body or the one stored before it."""
        with self._lock:
            last = {r.name: r for r in self.requests}
        return {n: r.body for n, r in last.items() if r.code in (201, 204)}

    def settled(self) -> dict[str, bytes]:
        """:meth:`committed` records of earlier starts: no writer touches them now."""
        current = f"g{self._gen}w"
        return {n: b for n, b in self.committed().items() if not n.startswith(current)}

    def window(self, t0: float, t1: float) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if t0 <= r.t1 < t1]

    def longest_gap(self, t0: float, t1: float) -> float:
        """The longest time between two stored records (answers) within [t0, t1]."""
        with self._lock:
            times = sorted(r.t1 for r in self.requests if r.code in (201, 204))
        inside = [t0] + [t for t in times if t0 <= t <= t1] + [t1]
        return max(b - a for a, b in itertools.pairwise(inside))

    def first_success_after(self, t: float) -> float | None:
        """When the first request *sent* after ``t`` was answered with success (an
        answer already on its way at ``t`` says nothing about the outage)."""
        with self._lock:
            done = [r.t1 for r in self.requests if r.t0 > t and r.code in (201, 204)]
        return min(done) if done else None


@dataclass
class Kill:
    victim: str
    at_s: float
    outage_s: float | None = None
    #: From the kill to the survivor's heartbeat timeout, and to its guest running
    #: (host wall clock; the agents report both).
    detected_s: float | None = None
    resumed_s: float | None = None
    agent_failover_ms: float | None = None
    #: Guest-bound frames of the lost epochs the survivor replayed into the resumed
    #: guest (the failover report's ``replayed_frames``).
    replayed_frames: int | None = None
    reprotected_s: float | None = None
    spot_checked: int = 0
    spot_missing: list[str] = field(default_factory=list)


def wait_ready(client: Client, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.put("ready-probe", b"ok\n", timeout=5) in (201, 204):
            return
        time.sleep(0.5)
    raise BenchmarkError("service", "the guest's nginx did not answer")


def _rate(reqs: list[Request], seconds: float) -> float:
    return sum(1 for r in reqs if r.code in (201, 204)) / seconds if seconds > 0 else 0.0


def _measure(client: Client, seconds: float) -> dict[str, Any]:
    t0 = time.monotonic()
    time.sleep(seconds)
    reqs = client.window(t0, time.monotonic())
    lat = [1e3 * (r.t1 - r.t0) for r in reqs if r.code in (201, 204)]
    return {
        "seconds": seconds,
        "stored": len(lat),
        "failed": sum(1 for r in reqs if r.code not in (201, 204)),
        "per_s": _rate(reqs, seconds),
        "latency_p50_ms": pct(lat, 50),
        "latency_p99_ms": pct(lat, 99),
    }


def read_back(client: Client, records: dict[str, bytes], threads: int = 64) -> list[str]:
    """The records that the running guest does not return, or returns changed (read on
    kept-alive connections from the client namespace, ``threads`` at a time: every
    answer waits for a sync point, so many in flight share each one)."""
    items = sorted(records.items())
    bad: list[str] = []
    checked: set[str] = set()
    lock = threading.Lock()

    def reader(part: list[tuple[str, bytes]]) -> None:
        enter_netns(client.ns)
        conn = http.client.HTTPConnection(client.ip, client.port, timeout=client.timeout_s)
        try:
            for name, body in part:
                got = _keepalive_get(conn, name)
                if got is None:  # a closed connection: once more on a new one
                    conn.close()
                    conn = http.client.HTTPConnection(
                        client.ip, client.port, timeout=client.timeout_s
                    )
                    got = _keepalive_get(conn, name)
                with lock:
                    checked.add(name)
                    if got != body:
                        bad.append(name)
        finally:
            conn.close()

    workers = [
        threading.Thread(target=reader, args=(items[i::threads],), daemon=True)
        for i in range(threads)
    ]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    # A reader that died (no namespace, an error) leaves its records unchecked: missing.
    bad += [name for name, _ in items if name not in checked]
    return sorted(bad)


def _keepalive_get(conn: http.client.HTTPConnection, name: str) -> bytes | None:
    """The record's body (b"" for a 404), or None when the connection failed."""
    try:
        conn.request("GET", f"/records/{name}")
        resp = conn.getresponse()
        data = resp.read()
    except (OSError, http.client.HTTPException):
        return None
    return data if resp.status == 200 else b""


def _final_events(pair: LabPair, role: str) -> list[dict[str, Any]]:
    """The ``guest`` and ``final-checkpoint-failed`` events of ``role``'s agents."""
    out: list[dict[str, Any]] = []
    for f in sorted((pair.run_dir(role) / "artifacts").glob("*/events.jsonl")):
        for line in f.read_text().splitlines():
            with contextlib.suppress(ValueError):
                ev = json.loads(line)
                if ev.get("event") in ("guest", "final-checkpoint-failed"):
                    out.append(ev)
    return out[-6:]


def sync_summary(pair: LabPair, role: str, t0: float, t1: float) -> dict[str, Any]:
    """The sync points the primary on ``role`` took between wall times t0 and t1."""
    import json

    rows: list[dict[str, Any]] = []
    for f in pair.run_dir(role).glob("artifacts/*-primary-*/checkpoints.jsonl"):
        for line in f.read_text().splitlines():
            with contextlib.suppress(ValueError):
                cp = json.loads(line)
                if t0 <= float(cp.get("t_wall", 0)) <= t1:
                    rows.append(cp)
    if not rows:
        return {}
    pauses = [float(c.get("guest_pause_ms") or c["pause_ms"]) for c in rows]
    triggers: dict[str, int] = {}
    for c in rows:
        t = str(c.get("trigger", "?")).split(":")[0]
        triggers[t] = triggers.get(t, 0) + 1
    span = t1 - t0
    return {
        "syncs_per_s": len(rows) / span,
        "paused_share": sum(pauses) / 1e3 / span,
        "pause_p50_ms": pct(pauses, 50),
        "pause_p99_ms": pct(pauses, 99),
        "ack_p50_ms": pct([float(c.get("ack_ms", 0)) for c in rows], 50),
        "dirty_pages_p50": pct([float(c["dirty_pages"]) for c in rows], 50),
        "triggers": triggers,
    }


def _warm_baseline(
    pair: LabPair,
    client: Client,
    opts: PairOptions,
    measure_s: float,
    counts: Sequence[int],
    say: Progress,
) -> dict[int, dict[str, Any]]:
    """The unprotected baseline on a warm guest, for each client count: the standby
    killed, the primary alone (its guest captured at every sync point until then), then
    protected again."""
    say("unprotected, warm: killing the standby")
    pair.kill("secondary")
    st = pair.wait_state("primary", {"unprotected", "held"}, opts.heartbeat_timeout_ms / 1e3 + 60)
    if st.get("state") != "unprotected":
        raise BenchmarkError("service", f"the primary alone is {st.get('state')}, not unprotected")
    out: dict[int, dict[str, Any]] = {}
    for c in counts:
        client.set_workers(c)
        time.sleep(SETTLE_S)
        out[c] = _measure(client, measure_s)
        say(f"unprotected, warm, {c} clients: {out[c]['per_s']:.1f} records/s")
    say("the standby comes back")
    client.set_workers(counts[0])
    pair.start_standby_on("secondary")
    pair.wait_state("primary", {"protected"}, 300)
    return out


#: Events that no fault-free run should show: a takeover, a fence, a lost peer or
#: witness, an epoch rolled back, a guest paused by the held-output bound.
DISRUPTIVE = (
    "failover",
    "fenced",
    "failover-refused",
    "secondary-lost",
    "primary-disconnected",
    "witness-unreachable",
    "rollback",
    "held-limit",
)


def _events_between(pair: LabPair, t0: float, t1: float) -> dict[str, int]:
    """How many of each :data:`DISRUPTIVE` event both hosts' agents logged in [t0, t1]."""
    counts: dict[str, int] = {}
    for role in ("primary", "secondary"):
        for f in sorted((pair.run_dir(role) / "artifacts").glob("*/events.jsonl")):
            for line in f.read_text().splitlines():
                with contextlib.suppress(ValueError, TypeError):
                    ev = json.loads(line)
                    if ev.get("event") in DISRUPTIVE and t0 <= float(ev.get("t", 0)) <= t1:
                        counts[ev["event"]] = counts.get(ev["event"], 0) + 1
    return counts


def soak(pair: LabPair, client: Client, seconds: float, say: Progress) -> dict[str, Any]:
    """Protected, under the client's load, with no fault, for ``seconds``: the primary's
    state every 2 s, and every disruptive event either agent logged meanwhile. A
    failover or a fence here is a false one."""
    active = _active(pair)
    w0, t0 = time.time(), time.monotonic()
    samples = not_protected = 0
    states: dict[str, int] = {}
    next_say = t0 + 60
    while (now := time.monotonic()) < t0 + seconds:
        time.sleep(min(2.0, t0 + seconds - now))
        samples += 1
        try:
            state = str(pair.status(active, timeout=10).get("state"))
        except (KemariError, OSError):
            state = "no answer"
        if state != "protected":
            not_protected += 1
            states[state] = states.get(state, 0) + 1
        if time.monotonic() >= next_say:
            next_say += 60
            done = time.monotonic() - t0
            stored = sum(1 for r in client.window(t0, time.monotonic()) if r.code in (201, 204))
            say(
                f"soak: {done / 60:.0f}/{seconds / 60:.0f} min, {stored} records stored, "
                f"{not_protected} samples not protected"
            )
    w1 = time.time()
    reqs = client.window(t0, time.monotonic())
    events = _events_between(pair, w0, w1)
    return {
        "seconds": seconds,
        "clients": client.workers,
        "false_failovers": events.get("failover", 0) + events.get("fenced", 0),
        "events": events,
        "samples": samples,
        "not_protected_samples": not_protected,
        "not_protected_states": states,
        "stored": sum(1 for r in reqs if r.code in (201, 204)),
        "failed": sum(1 for r in reqs if r.code not in (201, 204)),
        "sync": sync_summary(pair, active, w0, w1),
    }


def by_clients_figures(protected: dict[str, Any], unprotected: dict[str, Any]) -> dict[str, Any]:
    """One client count's figures: throughput ratio and the latency the protection
    adds (p50 against p50), beside the sync points' pause p50 (target: added <= 2x)."""
    un, pr = unprotected.get("per_s"), protected.get("per_s")
    lp, lu = protected.get("latency_p50_ms"), unprotected.get("latency_p50_ms")
    added = lp - lu if lp is not None and lu is not None else None
    pause = (protected.get("sync") or {}).get("pause_p50_ms")
    return {
        "protected": protected,
        "unprotected": unprotected,
        "throughput_ratio": pr / un if un and pr is not None else None,
        "added_latency_p50_ms": added,
        "pause_p50_ms": pause,
        "added_latency_over_pause": added / pause if added is not None and pause else None,
    }


def warmup_figures(cold: dict[str, Any], warm: dict[str, Any]) -> dict[str, Any]:
    """The service's cold and warm unprotected throughput, side by side.

    No threshold applies: nginx changes address space all the time and hardly shows the
    trap (docs/benchmarks.md); the figures say whether this run's baseline moved.
    """
    c, w = cold.get("per_s"), warm.get("per_s")
    return {
        "cold_per_s": c,
        "warm_per_s": w,
        "ratio": w / c if c and w is not None else None,
        "how": "the standby killed after the protected phase: the primary alone, its guest "
        "captured at every sync point until then",
    }


def _other(role: str) -> str:
    return "secondary" if role == "primary" else "primary"


def _active(pair: LabPair) -> str:
    for role in ("primary", "secondary"):
        with contextlib.suppress(KemariError, OSError):
            if pair.status(role, timeout=3).get("role") == "primary":
                return role
    raise BenchmarkError("service", "no host runs the VM")


def run(
    cfg: KemariConfig,
    *,
    kills: int = 10,
    measure_s: float = 20.0,
    clients: Sequence[int] = CLIENT_COUNTS,
    soak_s: float = 0.0,
    profile: str = "10g",
    lab_id: str = "sv",
    lay: labmod.LabLayout | None = None,
    seed: int | None = None,
    policy: str | None = None,
    min_spacing_ms: int = 5,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Run the campaign of the module docstring; returns its figures and verdicts.

    The agents run the product's defaults (``cfg``'s heartbeat, interval and sync
    policy) unless ``policy`` names another. ``clients``: the concurrent writers of the
    throughput phases (the first count also runs during the soak and the kills).

    Raises:
        BenchmarkError: the guest or the agents did not come up.
    """
    say = progress or (lambda _m: None)
    if not clients or min(clients) < 1:
        raise BenchmarkError("service", f"client counts must be 1 or more, not {clients}")
    counts = list(clients)
    r = cfg.replication
    policy = policy or cfg.tap.policy
    rnd = random.Random(seed)
    say("images: kernel + initramfs, Debian with nginx (cached)")
    image = build_image(cfg.paths.cache_dir, kernel_package=cfg.image.kernel_package)
    deb = build_debian_image(cfg.paths.cache_dir, size_mib=DISK_MIB)
    own_lab = lay is None
    if lay is None:
        labmod.down(lab_id)
        lay = labmod.up(lab_id, profile)
    opts = PairOptions(
        vm_name="web",
        memory_mib=MEMORY_MIB,
        vcpus=VCPUS,
        tiebreaker="witness",
        policy=policy,
        adaptive_min_spacing_ms=min_spacing_ms,
        max_interval_ms=r.max_interval_ms,
        heartbeat_interval_ms=r.heartbeat_interval_ms,
        heartbeat_timeout_ms=r.heartbeat_timeout_ms,
    )
    pair = LabPair(lay, cfg, opts)
    disk_a, disk_b = pair.root / "disk-a.img", pair.root / "disk-b.img"
    subprocess.run(["cp", "--sparse=always", str(deb.path), str(disk_a)], check=True)
    with disk_b.open("wb") as f:
        f.truncate(disk_a.stat().st_size)
    accel = cfg.vm.accel if cfg.vm.accel != "auto" else "tcg"
    pair.write_vm_definition(
        kernel=image.kernel,
        initrd=image.initrd,
        cmdline=debian_cmdline(),
        disk_a=disk_a,
        disk_b=disk_b,
        accel=accel,
    )
    client = Client(lay.ns_client, lay.guest_ip, workers=counts[0])
    res: dict[str, Any] = {
        "profile": profile,
        "memory_mib": MEMORY_MIB,
        "vcpus": VCPUS,
        "policy": policy,
        "min_spacing_ms": min_spacing_ms if policy == "adaptive" else None,
        "max_interval_ms": r.max_interval_ms,
        "heartbeat_interval_ms": r.heartbeat_interval_ms,
        "heartbeat_timeout_ms": r.heartbeat_timeout_ms,
        "clients": counts,
    }
    kill_log: list[Kill] = []
    t_start = time.monotonic()
    try:
        say("unprotected: the primary alone")
        pair.start_witness()
        pair.start_primary()
        pair.wait_state("primary", {"unprotected"}, 120)
        wait_ready(client, 180)
        client.start()
        res["unprotected_cold"] = _measure(client, measure_s)
        cold = res["unprotected_cold"]["per_s"]
        say(f"unprotected, never captured: {cold:.1f} records/s; starting the standby")
        pair.start_secondary()
        st = pair.wait_state("primary", {"protected"}, 300)
        res["protect"] = {"compat": st.get("compat"), "disk_resync": st.get("disk_resync")}
        res["tracker"] = st.get("tracker")
        res["tracker_reason"] = st.get("tracker_reason")
        protected: dict[int, dict[str, Any]] = {}
        for c in counts:
            client.set_workers(c)
            time.sleep(SETTLE_S)
            w0 = time.time()
            protected[c] = _measure(client, measure_s)
            protected[c]["sync"] = sync_summary(pair, "primary", w0, time.time())
            say(f"protected, {c} clients: {protected[c]['per_s']:.1f} records/s")
        client.set_workers(counts[0])
        if soak_s > 0:
            say(f"soak: {soak_s / 60:.1f} min protected with {counts[0]} clients, no fault")
            res["soak"] = soak(pair, client, soak_s, say)
            say(f"soak: {res['soak']['false_failovers']} false failovers")
        unprotected = _warm_baseline(pair, client, opts, measure_s, counts, say)
        res["by_clients"] = {
            str(c): by_clients_figures(protected[c], unprotected[c]) for c in counts
        }
        res["protected"], res["unprotected"] = protected[counts[0]], unprotected[counts[0]]
        res["warmup"] = warmup_figures(res["unprotected_cold"], res["unprotected"])
        for i in range(kills):
            victim = _active(pair)
            survivor = _other(victim)
            time.sleep(rnd.uniform(1.0, 4.0))
            k = Kill(victim=victim, at_s=time.monotonic() - t_start)
            t_kill, w_kill = time.monotonic(), time.time()
            say(f"kill {i + 1}/{kills}: {victim} host")
            pair.kill(victim)
            st = pair.wait_state(survivor, {"unprotected", "held", "syncing", "protected"}, 120)
            if st.get("role") != "primary":
                raise BenchmarkError("service", f"{survivor} did not take the VM over: {st}")
            fo = st.get("failover") or {}
            k.agent_failover_ms = fo.get("failover_ms")
            k.replayed_frames = fo.get("replayed_frames")
            if isinstance(fo.get("detected_at"), int | float):
                k.detected_s = round(float(fo["detected_at"]) - w_kill, 3)
                if isinstance(k.agent_failover_ms, int | float):
                    k.resumed_s = round(k.detected_s + k.agent_failover_ms / 1e3, 3)
            deadline = time.monotonic() + 120
            while (first := client.first_success_after(t_kill)) is None:
                if time.monotonic() > deadline:
                    raise BenchmarkError("service", f"no request succeeded after kill {i + 1}")
                time.sleep(0.1)
            k.outage_s = first - t_kill
            # A few records committed before the kill, read back from the resumed guest.
            committed = client.settled()
            sample = rnd.sample(sorted(committed), min(5, len(committed)))
            for name in sample:
                k.spot_checked += 1
                if client.get(name) != committed[name]:
                    k.spot_missing.append(name)
            pair.start_standby_on(victim)
            pair.wait_state(survivor, {"protected"}, 300)
            k.reprotected_s = time.monotonic() - t_kill
            kill_log.append(k)
            say(
                f"kill {i + 1}: outage {k.outage_s:.2f} s (timeout at {k.detected_s} s, "
                f"guest running at {k.resumed_s} s), agent failover "
                f"{k.agent_failover_ms or 0:.0f} ms, protected again after "
                f"{k.reprotected_s:.0f} s"
            )
        res["switchovers"] = []
        for _ in range(2):
            # A planned switchover, then the failback, with the client writing throughout.
            active = _active(pair)
            say(f"switchover from the {active} host")
            t0 = time.monotonic()
            sw = pair.switchover(active)
            pair.wait_state(_other(active), {"protected"}, 300)
            time.sleep(1.0)
            res["switchovers"].append(
                {
                    "from": active,
                    "pause_ms": sw.get("pause_ms"),
                    "peer_resume_ms": sw.get("peer_resume_ms"),
                    "client_longest_gap_s": client.longest_gap(t0, time.monotonic()),
                    "client_failed": sum(
                        1 for r in client.window(t0, time.monotonic()) if r.code not in (201, 204)
                    ),
                }
            )
        client.stop()
        committed = client.committed()
        say(f"check: {len(committed)} committed records, read back from the guest")
        missing_live = read_back(client, committed)
        active = _active(pair)
        disk = disk_a if active == "primary" else disk_b
        say("clean guest shutdown, then the offline check of its disk")
        code = client.control_stop()
        with contextlib.suppress(KemariError):
            pair.wait_exit(active, 120)
        check = offline_check(disk, committed)
        res["check"] = {
            # How the active host's last checkpoint went (the guest's writes on its way
            # down reach its disk only through it): the events that say so.
            "final_checkpoint": _final_events(pair, active),
            "committed": len(committed),
            "missing_live": missing_live,
            "stop_code": code,
            "offline_ok": check.ok,
            "fsck_clean": check.fsck_clean,
            "offline_missing": list(check.missing),
            "offline_mismatched": list(check.mismatched),
            # What the disk holds instead (zeros: data blocks that never reached it;
            # another body: an older write), for the first few.
            "offline_found": {
                n: check.records[n][:80].decode(errors="replace") for n in check.mismatched[:5]
            },
        }
    finally:
        client.stop()
        pair.stop()
        if own_lab:
            labmod.down(lab_id)
    outages = [k.outage_s for k in kill_log if k.outage_s is not None]
    res["kills"] = [asdict(k) for k in kill_log]
    res["outage_p50_s"] = pct(outages, 50)
    res["outage_max_s"] = max(outages) if outages else None
    un, pr = res["unprotected"]["per_s"], res["protected"]["per_s"]
    res["throughput_ratio"] = pr / un if un else None
    res["throughput_ratios"] = {
        k: v["throughput_ratio"] for k, v in res.get("by_clients", {}).items()
    }
    c = res["check"]
    res["ok"] = (
        len(kill_log) == kills
        and not c["missing_live"]
        and c["offline_ok"]
        and all(not k.spot_missing for k in kill_log)
        and all(w["client_failed"] == 0 for w in res.get("switchovers", []))
        and (res.get("soak") or {}).get("false_failovers", 0) == 0
    )
    return res


def write_results(res: dict[str, Any], folder: Path, command: str) -> Path:
    import json

    folder.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    (folder / "service.json").write_text(
        json.dumps({"command": command, "machine": machine, **res}, indent=1, default=str)
    )
    un, pr, c = res["unprotected"], res["protected"], res["check"]

    def f(v: Any, spec: str = ".1f") -> str:
        return "-" if v is None else format(v, spec)

    lines = [
        *header_lines(
            "A real service through failover: nginx in a Debian guest",
            command,
            machine,
            f". Guest: Debian 12 with Debian's nginx, {res['vcpus']} vCPUs, "
            f"{res['memory_mib']} MiB, TCG; link profile {res['profile']}; agents: sync "
            f"policy {res.get('policy', '?')}, heartbeat {res.get('heartbeat_interval_ms', '?')} ms"
            f" / timeout {res.get('heartbeat_timeout_ms', '?')} ms, interval bound "
            f"{res.get('max_interval_ms', '?')} ms. Client: parallel writers on kept-alive "
            "HTTP/1.1 connections, each PUT a new record file (HTTP 201 = stored); "
            f"{(res.get('clients') or [4])[0]} writers unless a row says otherwise.",
        ),
        "",
        "## Throughput (same run, host clock)",
        "",
        "| | records/s | stored | failed | p50 latency ms | p99 latency ms |",
        "|---|---|---|---|---|---|",
    ]
    rows = [("unprotected (warm: the baseline)", un), ("protected (Kemari)", pr)]
    if res.get("unprotected_cold"):
        rows.insert(0, ("unprotected, never captured (cold)", res["unprotected_cold"]))
    for name, m in rows:
        lines.append(
            f"| {name} | {f(m['per_s'])} | {m['stored']} | {m['failed']} "
            f"| {f(m['latency_p50_ms'])} | {f(m['latency_p99_ms'])} |"
        )
    sy = pr.get("sync") or {}
    if sy:
        lines += [
            "",
            f"While protected: {f(sy['syncs_per_s'])} sync points/s, guest paused "
            f"{f(100 * sy['paused_share'])}% of the time, pause p50 "
            f"{f(sy['pause_p50_ms'])} ms / p99 {f(sy['pause_p99_ms'])} ms, acknowledgement "
            f"p50 {f(sy['ack_p50_ms'])} ms after sending, dirty pages per sync p50 "
            f"{f(sy['dirty_pages_p50'], '.0f')}; triggers {sy['triggers']}.",
        ]
    bc = res.get("by_clients") or {}
    if bc:
        lines += [
            "",
            "## By concurrent clients (same run; unprotected = the warm baseline)",
            "",
            "| clients | unprotected records/s | protected records/s | protected / "
            "unprotected | latency p50 ms unprotected / protected | added p50 ms | pause "
            "p50 ms | added / pause | sync points/s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for k, v in bc.items():
            pu, pp = v["unprotected"], v["protected"]
            sy_k = pp.get("sync") or {}
            lines.append(
                f"| {k} | {f(pu['per_s'])} | {f(pp['per_s'])} | "
                f"{f(v['throughput_ratio'], '.2f')} | {f(pu['latency_p50_ms'])} / "
                f"{f(pp['latency_p50_ms'])} | {f(v['added_latency_p50_ms'])} | "
                f"{f(v['pause_p50_ms'])} | {f(v['added_latency_over_pause'], '.2f')} | "
                f"{f(sy_k.get('syncs_per_s'))} |"
            )
        lines += [
            "",
            "Targets (issue 16): protected / unprotected at least 0.7 at 16 or more "
            "clients; added latency p50 at most 2x the pause p50.",
        ]
    wu = res.get("warmup") or {}
    lines += [
        "",
        f"Protected / unprotected throughput: {f(res['throughput_ratio'], '.2f')} "
        f"(sync policy {res.get('policy', 'kemari')}), against the warm baseline.",
    ]
    if wu:
        lines += [
            "",
            f"Baseline warm-up: unprotected {f(wu.get('cold_per_s'))} records/s before any "
            f"device-state capture, {f(wu.get('warm_per_s'))} after the protected phase "
            f"(warm / cold {f(wu.get('ratio'), '.2f')}; {wu.get('how', '')}). "
            "See docs/benchmarks.md (the cold-guest trap).",
        ]
    if sy:
        lines += [
            "",
            f"Dirty-page tracker: {res.get('tracker') or '?'} "
            f"({res.get('tracker_reason') or '?'}). "
            f"Each sync point stopped the guest for {f(sy['pause_p50_ms'])} ms (p50) for "
            f"{res['memory_mib']} MiB, and the {res.get('policy', 'kemari')} policy takes one "
            "at every frame the guest sends (each HTTP reply), so a busy service spends "
            "that much of its time stopped per reply; under TCG the guest's own work is "
            "slow to begin with. See docs/sizing.md.",
        ]
    lines += [
        "",
        "## Kills of the host running the VM",
        "",
        "| # | killed | client outage s | heartbeat timeout at s | guest running at s "
        "| agent failover ms | frames replayed | protected again after s "
        "| spot-checked records |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for i, k in enumerate(res["kills"], 1):
        spot = f"{k['spot_checked'] - len(k['spot_missing'])}/{k['spot_checked']}"
        lines.append(
            f"| {i} | {k['victim']} | {f(k['outage_s'], '.2f')} "
            f"| {f(k.get('detected_s'), '.2f')} | {f(k.get('resumed_s'), '.2f')} "
            f"| {f(k['agent_failover_ms'], '.0f')} | {f(k.get('replayed_frames'), 'd')} "
            f"| {f(k['reprotected_s'], '.0f')} | {spot} |"
        )
    lines += [
        "",
        f"Client outage p50 {f(res['outage_p50_s'], '.2f')} s, max "
        f"{f(res['outage_max_s'], '.2f')} s (from the kill to the answer to the first "
        "request sent after it; it includes the "
        f"{f((res.get('heartbeat_timeout_ms') or 3000) / 1e3, '.1f')} s heartbeat timeout).",
        "",
        "## Planned switchover and failback (client writing throughout)",
        "",
        "| from | guest stopped ms (final sync + peer resume) | peer resume ms "
        "| client's longest gap s | failed requests |",
        "|---|---|---|---|---|",
        *[
            f"| {w['from']} host | {f(w['pause_ms'], '.0f')} | {f(w['peer_resume_ms'], '.0f')} "
            f"| {f(w['client_longest_gap_s'], '.2f')} | {w['client_failed']} |"
            for w in res.get("switchovers", [])
        ],
        "",
        *soak_lines(res.get("soak")),
        "## Every committed record present",
        "",
        f"- Records the client saw stored: {c['committed']}.",
        f"- Missing or wrong when read back from the running guest: {len(c['missing_live'])}.",
        f"- After a clean guest shutdown, offline check of the disk: fsck clean "
        f"{c['fsck_clean']}, missing {len(c['offline_missing'])}, mismatched "
        f"{len(c['offline_mismatched'])}.",
        "",
        f"Verdict: {'all kills survived, nothing lost' if res['ok'] else 'FAILED'}.",
    ]
    md = folder / "service.md"
    md.write_text("\n".join(lines) + "\n")
    return md


def soak_lines(sk: dict[str, Any] | None) -> list[str]:
    """The soak's section of the report (none when no soak ran)."""
    if not sk:
        return []
    sy = sk.get("sync") or {}
    events = ", ".join(f"{k} {v}" for k, v in sorted(sk["events"].items())) or "none"
    return [
        f"## Soak: {sk['seconds'] / 60:.0f} min protected, {sk['clients']} clients, no fault",
        "",
        f"- False failovers (a takeover or a fence with both hosts alive): "
        f"**{sk['false_failovers']}**.",
        f"- Disruptive events logged by either agent: {events}.",
        f"- The primary's state, sampled every 2 s: {sk['samples']} samples, "
        f"{sk['not_protected_samples']} not protected {sk['not_protected_states'] or ''}.",
        f"- Records stored {sk['stored']}, failed requests {sk['failed']}; "
        f"{sy.get('syncs_per_s', 0):.1f} sync points/s.",
        "",
    ]


def summary(res: dict[str, Any]) -> dict[str, Any]:
    """The one-line JSON of ``kemari bench service --json`` (an interface: keep its keys)."""
    bc = res.get("by_clients") or {}
    sk = res.get("soak")
    return {
        "throughput_ratio": {k: v["throughput_ratio"] for k, v in bc.items()},
        "added_latency_p50_ms": {k: v["added_latency_p50_ms"] for k, v in bc.items()},
        "pause_p50_ms": {k: v["pause_p50_ms"] for k, v in bc.items()},
        "outage_s_p50": res.get("outage_p50_s"),
        "outage_s_max": res.get("outage_max_s"),
        "switchover_gap_s_max": max(
            (w["client_longest_gap_s"] for w in res.get("switchovers", [])), default=None
        ),
        "false_failovers": None if not sk else sk["false_failovers"],
        "policy": res.get("policy"),
        "heartbeat_timeout_ms": res.get("heartbeat_timeout_ms"),
        "records_committed": res["check"]["committed"],
        "ok": res["ok"],
    }
