"""``kemari bench sizing`` inside an L1: the trackers side by side on a real kernel.

This machine's kernel has no soft-dirty, so the sizing benchmark here measures uffd-wp
and compare only. An L1 booting Debian's stock kernel (6.1) has soft-dirty and no
PAGEMAP_SCAN: there the benchmark's own probes choose soft-dirty and compare, and the
guests run under nested KVM (``-accel kvm``), as production guests do::

    host   one L1 (TCG, -cpu max), the suite's tree shared read-only (virtiofs)
    L1     modprobe kvm_amd; the guest's kernel and initramfs copied in;
           kemari bench sizing --sizes '' --vm-sizes '' --tracker-sizes ... (the same
           code as on the host: each tracker and size in its own process, guests
           booted under KVM when /dev/kvm is there)
    host   reads the L1's sizing.json back and writes the report with the host's own
           report code (``bench/sizing.write_results``), adding what the L1 was

The L1 is itself emulated: absolute times are many times a real host's. Only the
ratios between trackers measured in the same run mean anything; the report says so.
Guest sizes are bounded by the L1's RAM: the compare tracker holds three copies of
guest RAM besides the guest, so 1 GiB guests need an L1 of about 6 GiB.
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Callable, Sequence
from typing import Any

from kemari_suite.errors import VMError
from kemari_suite.klab.host import L1Host
from kemari_suite.klab.l2 import enable_kvm, push_guest
from kemari_suite.klab.share import kemari_command, mount_command
from kemari_suite.vm.image import GuestImage

#: An L1 that holds a 1 GiB guest, the compare tracker's three copies, and python.
L1_MEMORY_MIB = 6144
OUT = "/root/klab-sizing"
CONFIG = "/root/klab-sizing.toml"


def l1_config(kernel: str, initrd: str) -> str:
    """The benchmark's config in the L1: its own cache and run folders, the guest
    copied in (no image build there), the accelerator chosen by probing."""
    return (
        '[paths]\ncache_dir = "/var/cache/kemari"\nrun_dir = "/run/kemari"\n'
        'shm_dir = "/dev/shm"\n\n'
        f'[image]\nkernel = "{kernel}"\ninitrd = "{initrd}"\n\n[vm]\naccel = "auto"\n'
    )


def sizing_command(tree: str, sizes_mib: Sequence[int], samples: int) -> str:
    """The L1's command line (the trackers part of the benchmark only)."""
    args = [
        "bench", "sizing", "-c", CONFIG, "--sizes", "", "--vm-sizes", "",
        "--tracker-sizes", ",".join(str(m) for m in sizes_mib),
        "--tracker-samples", str(samples), "--out", OUT,
    ]  # fmt: skip
    return f"cd /root && {kemari_command(tree, args)} >/root/klab-sizing.log 2>&1"


def run_sizing_in_l1(
    l1: L1Host,
    guest: GuestImage,
    *,
    tree: str,
    sizes_mib: Sequence[int] = (128, 1024),
    samples: int = 15,
    progress: Callable[[str], None] | None = None,
    timeout_s: float = 7200.0,
) -> dict[str, Any]:
    """Run the benchmark in ``l1`` (started, with ``share=tree``); the result as
    ``bench/sizing`` makes it, plus ``l1``: what the L1 was and how long it took.

    Raises:
        AgentError: a step in the L1 failed.
        VMError: the benchmark failed in the L1 (its log's tail in the message).
    """
    say = progress or (lambda _m: None)
    t0 = time.monotonic()
    l1.run(mount_command(tree), timeout=300)
    kvm = enable_kvm(l1)
    say(f"L1 {l1.spec.host}: /dev/kvm {'usable' if kvm else 'missing: guests under TCG'}")
    kernel, initrd = push_guest(l1, guest)
    l1.run(f"cat > {CONFIG}", stdin=l1_config(kernel, initrd).encode())
    say(f"kemari bench sizing in the L1: trackers at {list(sizes_mib)} MiB, {samples} each")
    done = l1.run(sizing_command(tree, sizes_mib, samples), timeout=timeout_s, check=False)
    if done.exit_code != 0:
        tail = l1.run("tail -n 20 /root/klab-sizing.log", check=False).stdout
        raise VMError(l1.name, f"kemari bench sizing exited {done.exit_code}:\n{tail}")
    res: dict[str, Any] = json.loads(l1.run(f"cat {shlex.quote(OUT)}/sizing.json").stdout)
    res.pop("command", None)
    res["l1"] = {
        "kernel": l1.run("uname -r").stdout.strip(),
        "memory_mib": l1.spec.memory_mib,
        "vcpus": l1.spec.vcpus,
        "accel_of_the_l1": "tcg",
        "kvm_in_the_l1": kvm,
        "took_s": round(time.monotonic() - t0, 1),
        "note": (
            "measured inside an L1 that is itself emulated (TCG): only the ratios between "
            "trackers in this run mean anything, not the times"
        ),
    }
    return res


__all__ = ["L1_MEMORY_MIB", "l1_config", "run_sizing_in_l1", "sizing_command"]
