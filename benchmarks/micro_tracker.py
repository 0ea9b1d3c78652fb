"""Micro-benchmark of the dirty-page trackers on a guest-sized RAM file.

A RAM file in /dev/shm (128 MiB by default) is mapped twice, as with QEMU: a writable
mapping plays the guest, the tracker reads through its own read-only mapping. Reports
p50 / p99 in milliseconds of:

- a full compare scan of clean RAM, 1 and 2 threads, with and without the memcmp
  pre-check that skips clean chunks;
- a compare scan with ~4000 dirty pages, scattered at random or in one cluster;
- staging 4000 pages into the preallocated buffer, reading their previous version
  (XOR-delta base), committing them to the shadow;
- the soft-dirty tracker's candidate check (4000 candidates against the shadow; the
  kernel part is faked: CONFIG_MEM_SOFT_DIRTY is off on the test machines);
- reading the /proc/<pid>/pagemap entries of the whole mapping (the kernel cost that
  soft-dirty adds per scan, measured on this process's own mapping).

Usage: .venv/bin/python benchmarks/micro_tracker.py [--mib 128] [--iterations 200]
       [--dirty 4000] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

from kemari_suite.checkpoint.tracker import (
    CompareTracker,
    ProcPagemap,
    SoftDirtyTracker,
    allocate_index,
    allocate_pages,
    probe_soft_dirty,
)
from kemari_suite.vm.guestram import PAGE_SIZE, GuestRAM


class FakeKernel:
    """Soft-dirty bits set by the benchmark itself."""

    def __init__(self, n_pages: int) -> None:
        self.dirty = np.zeros(n_pages, dtype=np.uint64)

    def read(self, out: np.ndarray) -> None:
        np.left_shift(self.dirty, np.uint64(55), out=out)

    def clear(self) -> None:
        self.dirty[:] = 0

    def close(self) -> None:
        pass


def percentiles(samples: list[float]) -> dict[str, float]:
    a = np.array(samples) * 1e3
    return {
        "p50_ms": round(float(np.percentile(a, 50)), 3),
        "p99_ms": round(float(np.percentile(a, 99)), 3),
        "max_ms": round(float(a.max()), 3),
        "n": len(samples),
    }


def timed(fn: Callable[..., object], *args: object, **kwargs: object) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--mib", type=int, default=128)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--dirty", type=int, default=4000)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    n_pages = args.mib * 1024 * 1024 // PAGE_SIZE
    iters = args.iterations
    rng = np.random.default_rng(1)
    path = Path(f"/dev/shm/kemari-bench-{os.getpid()}-{uuid.uuid4().hex[:6]}.ram")
    results: dict[str, dict[str, float]] = {}
    load_before = os.getloadavg()
    try:
        with path.open("wb") as f:
            f.truncate(n_pages * PAGE_SIZE)
        with GuestRAM(path, writable=True) as guest, GuestRAM(path) as agent:
            # Realistic content: random bytes (zero pages would compare the same way,
            # but would not exercise the memory system honestly).
            guest.pages[:] = rng.integers(0, 256, (n_pages, PAGE_SIZE), dtype=np.uint8)
            ram = agent.pages
            out = allocate_index(n_pages)
            staging = allocate_pages(n_pages)
            prev = allocate_pages(n_pages)

            def dirty(pattern: str) -> np.ndarray:
                if pattern == "clean":
                    return np.zeros(0, dtype=np.int64)
                if pattern == "random":
                    idx = np.sort(rng.choice(n_pages, args.dirty, replace=False))
                else:
                    start = int(rng.integers(0, n_pages - args.dirty))
                    idx = np.arange(start, start + args.dirty)
                guest.pages[idx, int(rng.integers(0, PAGE_SIZE))] ^= 0x5A
                return idx.astype(np.int64)

            # Every variant scans the same dirty state, in rotating order, so that load
            # from elsewhere on the machine spreads evenly over them.
            kernel = FakeKernel(n_pages)
            trackers = {
                "memcmp+numpy": CompareTracker(n_pages, threads=2, precheck=True),
                "numpy": CompareTracker(n_pages, threads=2, precheck=False),
            }
            soft = SoftDirtyTracker(n_pages, source=kernel)
            for t in (*trackers.values(), soft):
                t.reset(ram)
            variants = [(tag, threads) for tag in trackers for threads in (1, 2)]
            samples: dict[str, list[float]] = {}

            def record(name: str, seconds: float) -> None:
                samples.setdefault(name, []).append(seconds)

            main_tracker = trackers["memcmp+numpy"]
            for i in range(iters):
                for pattern in ("clean", "random", "clustered"):
                    idx = dirty(pattern)
                    label = "clean" if pattern == "clean" else f"{args.dirty} {pattern}"
                    for j in range(len(variants)):
                        tag, threads = variants[(i + j) % len(variants)]
                        tracker = trackers[tag]
                        seconds = timed(tracker.scan, ram, out=out, threads=threads)
                        record(f"scan {label}, {tag}, {threads} thr", seconds)
                        assert np.array_equal(out[: len(idx)], idx), "scan missed pages"
                    if pattern == "clean":
                        continue
                    kernel.dirty[idx] = 1
                    record(
                        f"soft-dirty scan {label} (fake pagemap)", timed(soft.scan, ram, out=out)
                    )
                    n = main_tracker.scan(ram, out=out)
                    assert n == len(idx)
                    sel = out[:n]
                    record(f"stage {label}", timed(main_tracker.stage, ram, sel, staging))
                    record(f"previous {label}", timed(main_tracker.previous, sel, prev))
                    record(f"commit {label}", timed(main_tracker.commit, sel, staging))
                    trackers["numpy"].commit(sel, staging[:n])
                    soft.commit(sel, staging[:n])
                    kernel.clear()
            for t in (*trackers.values(), soft):
                t.close()
            results.update({name: percentiles(v) for name, v in sorted(samples.items())})

        # Views outlive GuestRAM.close(): drop ours so the file is mapped once in this
        # process, as it is in QEMU.
        del ram
        with GuestRAM(path):
            source = ProcPagemap(os.getpid(), path, n_pages)
            entries = np.zeros(n_pages, dtype=np.uint64)
            reads = [timed(source.read, entries) for _ in range(iters)]
            source.close()
            results[f"read /proc/self/pagemap, {n_pages} entries"] = percentiles(reads)
    finally:
        path.unlink(missing_ok=True)

    ok, reason = probe_soft_dirty()
    load_after = os.getloadavg()
    width = max(len(k) for k in results)
    print(f"{args.mib} MiB ({n_pages} pages), {iters} iterations, {os.cpu_count()} CPUs")
    print(f"{'':{width}}  {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for name, r in results.items():
        print(f"{name:{width}}  {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} {r['max_ms']:8.2f}")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    print(f"soft-dirty probe: {'ok' if ok else 'unavailable'}: {reason}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "mib": args.mib,
                    "iterations": iters,
                    "loadavg": [load_before[0], load_after[0]],
                    "soft_dirty": [ok, reason],
                    **results,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
