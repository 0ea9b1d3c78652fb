"""A KVM guest writing acknowledged records on DRBD, through a power loss of its host.

The CI scenario of the kernel lab (issue 14, item 7)::

    both     DRBD up, l1a Primary, initial sync (PowerLossScenario.bring_up, initial_sync)
    l1a      modprobe kvm_amd; the project's guest under -accel kvm (an L2), its disk
             /dev/drbd0, running guest/workloads/records.c (O_DSYNC records, "W n" ->
             "OK n" over TCP, port forwarded to the L1's 127.0.0.1)
    l1a      a client writes records 0, 1, 2... and logs each acknowledged one
    host     reads the log (the last acknowledged record), then SIGKILLs l1a's QEMU at
             once: the L2, its client and l1a's page cache die mid-stream
    l1b      peer noticed; drbdadm primary (fence-peer handler); drbdadm down; stop
    host     reads l1b's backing file: every acknowledged record must be there, valid

Records are checked with :func:`valid_records`, the same layout and FNV-1a checksum as
records.c, straight from the file (DRBD's internal meta-data sits at the end).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kemari_suite.errors import DrbdError
from kemari_suite.klab.drbdfailover import PowerLossScenario
from kemari_suite.klab.l2 import enable_kvm, push_guest, start_l2
from kemari_suite.klab.pair import L1Pair
from kemari_suite.vm.image import GuestImage

RECORD_SIZE = 4096
RECORD_MAGIC = b"KEMARI-RECORD!!!"
RECORDS_PORT = 7000
RECORDS_READY = "KEMARI-RECORDS-READY"
ACK_LOG = "/run/klab-acks"
#: Runs in the L1: writes records 0, 1, ... through the guest's TCP service and appends
#: each acknowledged number to ACK_LOG (tmpfs: the host reads it through the agent).
RECORDS_CLIENT = f"""
import socket, sys
s = socket.create_connection(("127.0.0.1", {RECORDS_PORT}), timeout=60)
f = s.makefile("rwb", buffering=0)
log = open("{ACK_LOG}", "a", buffering=1)
for n in range(int(sys.argv[1])):
    f.write(b"W %d\\n" % n)
    line = f.readline().split()
    if line != [b"OK", str(n).encode()]:
        sys.exit(f"bad answer to W {{n}}: {{line}}")
    log.write(f"{{n}}\\n")
"""
_FNV_OFFSET, _FNV_PRIME, _MASK = 0xCBF29CE484222325, 0x100000001B3, (1 << 64) - 1


def _fnv1a(h: int, data: bytes) -> int:
    for b in data:
        h = ((h ^ b) * _FNV_PRIME) & _MASK
    return h


def record_valid(rec: bytes, n: int) -> bool:
    """Whether ``rec`` (4096 bytes) is record ``n`` as records.c writes it."""
    if len(rec) != RECORD_SIZE or rec[:16] != RECORD_MAGIC:
        return False
    if int.from_bytes(rec[16:24], "little") != n:
        return False
    total = _fnv1a(_fnv1a(_FNV_OFFSET, rec[:24]), rec[32:])
    return int.from_bytes(rec[24:32], "little") == total


def valid_records(path: Path, limit: int) -> int:
    """How many records 0, 1, ... are valid at the start of ``path`` (at most ``limit``)."""
    count = 0
    with path.open("rb") as fh:
        while count < limit and record_valid(fh.read(RECORD_SIZE), count):
            count += 1
    return count


@dataclass(frozen=True)
class KvmPowerLossRun:
    """What one run measured (seconds, host clock) and found."""

    accel: str
    l2_boot_s: float
    records_acked: int
    records_found: int
    peer_noticed_s: float
    promote_s: float
    fence_peer_calls: int
    total_s: float
    steps: dict[str, float] = field(default_factory=dict)

    @property
    def records_lost(self) -> int:
        return max(0, self.records_acked - self.records_found)

    @property
    def ok(self) -> bool:
        return self.records_acked > 0 and self.records_lost == 0 and self.fence_peer_calls >= 1

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "records_lost": self.records_lost, "ok": self.ok}


def run_kvm_power_loss(
    pair: L1Pair,
    guest: GuestImage,
    *,
    min_acks: int = 100,
    max_records: int = 4000,
    progress: Callable[[str], None] | None = None,
) -> KvmPowerLossRun:
    """Run the scenario on a started pair of L1s built with the nested packages.

    Every L1 is stopped at the end.

    Raises:
        DrbdError: DRBD failed, /dev/kvm is missing in the L1, or the client stopped
            before ``min_acks`` acknowledgements.
        AgentError, VMError: an L1 or the L2 did not answer.
    """
    t_start = time.monotonic()
    sc = PowerLossScenario(pair, progress)
    a, b = pair[0], pair[1]
    sc.bring_up()
    sc.initial_sync()
    t0 = time.monotonic()
    if not enable_kvm(a):
        raise DrbdError("-", "modprobe kvm_amd", 1, f"no /dev/kvm in {a.spec.host}")
    kernel, initrd = push_guest(a, guest)
    l2 = start_l2(
        a,
        kernel,
        initrd,
        accel="kvm",
        run=f"records -d /dev/vda -p {RECORDS_PORT}",
        drives=("/dev/drbd0",),
        forward_port=RECORDS_PORT,
        ready_marker=RECORDS_READY,
    )
    sc.step("L2 under KVM on /dev/drbd0", t0)
    t0 = time.monotonic()
    a.run(f"rm -f {ACK_LOG}; cat > /run/klab-client.py", stdin=RECORDS_CLIENT.encode())
    a.run(
        f"nohup python3 /run/klab-client.py {max_records} </dev/null >/run/klab-client.log 2>&1 &"
    )
    acked = 0
    while acked < min_acks:
        if time.monotonic() - t0 > 600:
            log = a.run("cat /run/klab-client.log", check=False).stdout
            raise DrbdError("-", "records client", 1, f"{acked} acks after 600 s: {log}")
        time.sleep(1.0)
        lines = a.run(f"tail -n 1 {ACK_LOG} 2>/dev/null || true").stdout.split()
        acked = int(lines[-1]) + 1 if lines else 0
    # Kill right after reading: records acknowledged after the read may or may not be
    # found; every one acknowledged up to it must be.
    sc.step(f"{acked} records acknowledged", t0)
    noticed, promote, fence_calls = sc.power_loss()
    t0 = time.monotonic()
    sc.res[b.spec.host].down()
    b.stop()
    found = valid_records(b.data_disk, max_records)
    sc.step("offline record check", t0)
    return KvmPowerLossRun(
        accel=l2.accel,
        l2_boot_s=round(l2.boot_s, 2),
        records_acked=acked,
        records_found=found,
        peer_noticed_s=noticed,
        promote_s=promote,
        fence_peer_calls=fence_calls,
        total_s=round(time.monotonic() - t_start, 2),
        steps=sc.steps,
    )


__all__ = [
    "ACK_LOG",
    "RECORDS_PORT",
    "KvmPowerLossRun",
    "record_valid",
    "run_kvm_power_loss",
    "valid_records",
]
