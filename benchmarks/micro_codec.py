"""Micro-benchmark of page encoding (codec) and frame authentication (wire).

Run: .venv/bin/python benchmarks/micro_codec.py [--pages 4000] [--reps 5]

Prints median times over a few repetitions for one batch of dirty pages (4000 pages,
16 MB by default) in three patterns:

  text+delta  text-like pages, 300 random bytes changed per page, old version known (XOR)
  text/raw    the same pages without an old version (RAW, compressible)
  random      random pages, random old version (RAW, incompressible)

decode = validate + decompress + apply into a RAM image. Then the wire: HMAC-SHA256
throughput, encode_parts + feed of one 16 MB Pages frame, and the epoch digest.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import hmac
import os
import statistics
import time
from collections.abc import Callable

import numpy as np

from kemari_suite.protocol.codec import PAGE_SIZE, PageEncoder, blob_info, decode_pages
from kemari_suite.protocol.wire import EpochDigest, Pages, Role, Session

WORDS = (
    b"the of and to in is that for it as was with be by on not he this are or his from at"
    b" which but have an they you were her she there been one all we their has would when"
    b" kernel page memory replica epoch guest device state buffer socket commit acknowledge"
).split()


def median_ms(fn: Callable[[], object], reps: int) -> float:
    fn()  # warm up: first-touch page faults, compressor contexts
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def text_pages(k: int, rng: np.random.Generator) -> np.ndarray:
    words = [WORDS[i] for i in rng.integers(0, len(WORDS), 40_000)]
    block = np.frombuffer(b" ".join(words), dtype=np.uint8)
    starts = rng.integers(0, len(block) - PAGE_SIZE, k)
    return np.stack([block[s : s + PAGE_SIZE] for s in starts])


def patterns(k: int) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    rng = np.random.default_rng(42)
    old = text_pages(k, rng)
    new = old.copy()
    for i, s in enumerate(rng.integers(0, PAGE_SIZE - 300, k)):
        new[i, s : s + 300] = rng.integers(0, 256, 300, dtype=np.uint8)
    rnd_old = rng.integers(0, 256, (k, PAGE_SIZE), dtype=np.uint8)
    rnd_new = rng.integers(0, 256, (k, PAGE_SIZE), dtype=np.uint8)
    return {"text+delta": (new, old), "text/raw": (new, None), "random": (rnd_new, rnd_old)}


def codec_table(k: int, reps: int) -> None:
    encoders: dict[str, PageEncoder] = {
        "zstd-1": PageEncoder("zstd", level=1),
        "zstd-1 x2thr": PageEncoder("zstd", level=1, threads=2),
        "zstd--3": PageEncoder("zstd", level=-3),
        "lz4": PageEncoder("lz4"),
        "none": PageEncoder("none"),
    }
    n_total = 2 * k
    indices = np.arange(0, n_total, 2, dtype=np.uint64)
    target = np.zeros((n_total, PAGE_SIZE), np.uint8)
    mb = k * PAGE_SIZE / 1e6
    print(f"codec: {k} pages ({mb:.1f} MB) per batch, median of {reps}")
    print(f"{'pattern':11} {'encoder':13} {'encode ms':>9} {'decode ms':>9} {'B/page':>7}  kinds")
    for pname, (new, old) in patterns(k).items():
        for ename, enc in encoders.items():
            blob = enc.encode(indices, new, old)
            t_enc = median_ms(functools.partial(enc.encode, indices, new, old), reps)
            t_dec = median_ms(functools.partial(decode_pages, blob, target), reps)
            info = blob_info(blob)
            kinds = f"z{info.n_zero} r{info.n_raw} x{info.n_xor} s{info.n_same}"
            print(f"{pname:11} {ename:13} {t_enc:9.2f} {t_dec:9.2f} {len(blob) / k:7.0f}  {kinds}")


def wire_table(reps: int) -> None:
    size = 16 << 20
    data = os.urandom(size)
    view = memoryview(data)
    key = os.urandom(32)
    mb = size / 1e6

    def mac() -> bytes:
        h = hmac.new(key, digestmod="sha256")
        h.update(view)
        return h.digest()

    primary = Session("bench", role=Role.PRIMARY, node_id="p", initiator=True)
    secondary = Session("bench", role=Role.SECONDARY, node_id="s", initiator=False)
    primary.start()
    secondary.feed(primary.data_to_send())
    primary.feed(secondary.data_to_send())
    secondary.feed(primary.data_to_send())
    msg = Pages(epoch=1, encoded=data)
    frames = [b"".join(primary.encode_parts(msg)) for _ in range(reps + 1)]
    frame_iter = iter(frames)

    def digest() -> bytes:
        d = EpochDigest(1)
        d.update(msg)
        return d.digest()

    rows = [
        ("HMAC-SHA256 (hmac.new, memoryview)", median_ms(mac, reps)),
        ("sha256 (EpochDigest)", median_ms(digest, reps)),
        ("blake2b (for comparison)", median_ms(lambda: hashlib.blake2b(view).digest(), reps)),
        ("Session.encode_parts(Pages)", median_ms(lambda: primary.encode_parts(msg), reps)),
        ("Session.feed(frame)", median_ms(lambda: secondary.feed(next(frame_iter)), reps)),
    ]
    print(f"\nwire: one {mb:.1f} MB payload, median of {reps}")
    print(f"{'operation':36} {'ms':>7} {'MB/s':>7}")
    for name, ms in rows:
        print(f"{name:36} {ms:7.2f} {mb / ms * 1e3:7.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pages", type=int, default=4000)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    codec_table(args.pages, args.reps)
    wire_table(args.reps)


if __name__ == "__main__":
    main()
