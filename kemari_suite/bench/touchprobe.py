"""``ktouch``: the probe that shows whether a TCG guest is in the cold-guest trap.

The trap (docs/benchmarks.md): a TCG guest whose device state has never been captured
can run a loop that writes one word in each page of a working set many times slower
than it will once a few device-state captures have happened. The benchmarks' own
workloads show it little or not at all (kbench's loops change address space all the
time; memdirty writes whole pages), so the benchmarks check their warm-up with this
program, which shows it at its strongest.

``ktouch [-m MIB] [-t SECONDS]`` writes one 8-byte word in every page of a MIB working
set (default 16), round robin, for SECONDS of guest time (default 10), then exits. Its
loop count is a probe in guest RAM (``kemari_probe.h``, magic
:data:`~kemari_suite.vm.guestmem.TOUCH_MAGIC`), so the host reads the rate without the
guest printing anything. It prints ``KEMARI-TOUCH-START`` and ``KEMARI-TOUCH-END``.

The guest workloads' folder belongs to the image builder, so the source lives here and
:func:`bench_image` compiles it (``gcc -static``, cached by a digest of its inputs) and
adds it to the benchmarks' image as ``/bin/ktouch`` with ``--add``. Every scenario of a
benchmark boots that one image.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from kemari_suite.config import ImageConfig, KemariConfig
from kemari_suite.errors import ImageError
from kemari_suite.vm import guestmem
from kemari_suite.vm.buildkit import Progress, locked, need_tool, run_step
from kemari_suite.vm.define import ensure_image
from kemari_suite.vm.image import GuestImage, build_image, gcc_version, guest_dir

#: Where the program lands in the guest.
GUEST_PATH = "/bin/ktouch"

_SOURCE = r"""/* ktouch: the cold-guest trap's probe; see kemari_suite/bench/touchprobe.py. */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "kemari_probe.h"

static struct kemari_probe probe;
static const unsigned char masked_magic[16] = {@MASKED@};

static void on_signal(int sig)
{
    kemari_probe_disarm(&probe);
    signal(sig, SIG_DFL);
    raise(sig);
}

static double now_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    long mib = 16;
    double seconds = 10.0;
    int opt;
    while ((opt = getopt(argc, argv, "m:t:")) != -1) {
        if (opt == 'm')
            mib = atol(optarg);
        else if (opt == 't')
            seconds = atof(optarg);
        else {
            fprintf(stderr, "usage: ktouch [-m MIB] [-t SECONDS]\n");
            return 2;
        }
    }
    if (mib < 1 || seconds <= 0) {
        fprintf(stderr, "ktouch: bad -m or -t\n");
        return 2;
    }
    size_t npages = (size_t)mib * (1024 * 1024 / KEMARI_PAGE);
    volatile uint64_t *ws = mmap(NULL, npages * KEMARI_PAGE, PROT_READ | PROT_WRITE,
                                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (ws == MAP_FAILED) {
        perror("ktouch: mmap");
        return 1;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);
    kemari_probe_arm(&probe, masked_magic, 0, (uint64_t)npages);
    printf("KEMARI-TOUCH-START mib=%ld seconds=%g\n", mib, seconds);
    const uint64_t words = KEMARI_PAGE / sizeof(uint64_t);
    double end = now_s() + seconds;
    uint64_t n = 0;
    do {
        for (int i = 0; i < 65536; i++) {
            ws[(n % npages) * words + (n % words)] = n;
            probe.value = ++n;
        }
    } while (now_s() < end);
    kemari_probe_disarm(&probe);
    printf("KEMARI-TOUCH-END loops=%llu\n", (unsigned long long)n);
    return 0;
}
"""


def source() -> str:
    """The C source, the magic masked as ``kemari_probe.h`` asks (never stored plain)."""
    masked = ", ".join(f"0x{b ^ 0x5A:02x}" for b in guestmem.TOUCH_MAGIC)
    return _SOURCE.replace("@MASKED@", masked)


def build_probe(cache_dir: Path, progress: Progress | None = None) -> Path:
    """The compiled ``ktouch`` (static), built once per source, header and gcc version.

    Raises:
        ImageError: the compiler failed or the cache is not writable.
        SetupError: gcc is missing.
    """
    header = guest_dir() / "workloads" / "kemari_probe.h"
    try:
        header_bytes = header.read_bytes()
    except OSError as err:
        raise ImageError("ktouch", f"cannot read {header}: {err}") from err
    digest = hashlib.sha256()
    for part in (source().encode(), header_bytes, gcc_version().encode()):
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    folder = Path(cache_dir) / "bench"
    out = folder / f"ktouch-{digest.hexdigest()[:16]}"
    if out.is_file():
        return out
    gcc = need_tool("gcc", "gcc")
    with locked(folder / ".build.lock"):
        if out.is_file():
            return out
        if progress is not None:
            progress("compiling ktouch (the warm-up probe)")
        work = folder / f".ktouch-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        try:
            (work / "ktouch.c").write_text(source())
            exe = work / "ktouch"
            argv = [gcc, "-static", "-O2", "-s", "-Wall", "-I", str(header.parent)]
            run_step(
                [*argv, "-o", str(exe), str(work / "ktouch.c")],
                "ktouch",
                timeout=300,
            )
            exe.chmod(0o755)
            exe.rename(out)
        except OSError as err:
            raise ImageError("ktouch", f"{out}: {err}") from err
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return out


@dataclass(frozen=True)
class BenchImage:
    """The image every scenario of a benchmark boots."""

    image: GuestImage
    #: Whether ``/bin/ktouch`` is in it (not when the config names a prebuilt image).
    has_probe: bool
    #: Why not, when it is not.
    note: str = ""

    def config_for_agents(self, cfg: KemariConfig) -> KemariConfig:
        """``cfg`` with ``[image]`` naming this very image, so that agents started from it
        (a lab pair) boot exactly what the unprotected baseline booted."""
        image = ImageConfig(
            kernel_package=cfg.image.kernel_package,
            kernel=str(self.image.kernel),
            initrd=str(self.image.initrd),
        )
        return dataclasses.replace(cfg, image=image)


def bench_image(cfg: KemariConfig, progress: Progress | None = None) -> BenchImage:
    """The config's own image (:func:`~kemari_suite.vm.define.ensure_image`) with
    ``ktouch`` added; the config's image alone when it names prebuilt files.

    Raises:
        ConfigError: a configured kernel or initrd does not exist.
        ImageError, SetupError: building failed.
    """
    ic = cfg.image
    if ic.kernel or ic.initrd:
        return BenchImage(
            ensure_image(cfg, progress),
            has_probe=False,
            note="the config names a prebuilt image (image.kernel/initrd): no ktouch in it",
        )
    probe = build_probe(cfg.paths.cache_dir, progress)
    image = build_image(
        cfg.paths.cache_dir,
        kernel_package=ic.kernel_package,
        add=(*ic.add, f"{probe}:{GUEST_PATH}"),
        init=ic.init,
        progress=progress,
    )
    return BenchImage(image, has_probe=True)


__all__ = ["GUEST_PATH", "BenchImage", "bench_image", "build_probe", "source"]
