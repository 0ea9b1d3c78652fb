"""Two L1 hosts joined by a replication link: a QEMU socket netdev over UDP on 127.0.0.1.

::

    L1 "l1a"  eth0 10.99.<n>.1/24                     L1 "l1b"  eth0 10.99.<n>.2/24
      -netdev socket,udp=127.0.0.1:B,     <-- UDP -->   -netdev socket,udp=127.0.0.1:A,
              localaddr=127.0.0.1:A                             localaddr=127.0.0.1:B

UDP and not the listen/connect flavour: either side can be killed and started again
without the other noticing anything but lost frames, the way a cable behaves, and no
start order is needed. Each datagram carries one Ethernet frame. The ports come from
the lab's slot (:func:`link_ports`), so parallel test workers never share a link.

:class:`L1Pair` starts both, waits for both agents at once, and stops every QEMU it
started, whatever happened (also as a context manager).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Self

from kemari_suite.errors import ConfigError
from kemari_suite.klab.host import BOOT_TIMEOUT_S, HostState, L1Host, L1Spec
from kemari_suite.klab.image import HostImage

#: Slot s uses UDP ports BASE_PORT + 2s and + 2s + 1 on 127.0.0.1.
BASE_PORT = 47600
MAX_SLOT = 199


def link_ports(slot: int) -> tuple[int, int]:
    """The UDP ports of the two ends of slot ``slot``'s link. Raises ConfigError."""
    if not 0 <= slot <= MAX_SLOT:
        raise ConfigError(f"slot {slot} is not in 0..{MAX_SLOT}", key="klab.slot")
    return BASE_PORT + 2 * slot, BASE_PORT + 2 * slot + 1


@dataclass(frozen=True)
class PairSpec:
    """Two L1 hosts of one lab: names, sizes, and the slot their link's ports come from."""

    lab_id: str
    slot: int = 0
    hosts: tuple[str, str] = ("l1a", "l1b")
    memory_mib: int = 768
    data_disk_mib: int = 0
    #: A host folder both L1s mount read-only at the same path (virtiofs; see share.py).
    share: str = ""
    #: Give both L1s a NIC on QEMU's user network (eth1: the host is 10.0.2.2).
    lan: bool = False
    #: Run each L1 in a network namespace of the host lab (its primary's, its
    #: secondary's), the link's datagrams between the two namespaces' addresses
    #: (``link_ips``) instead of 127.0.0.1: the lab's ``tbf`` then shapes the link.
    namespaces: tuple[str, str] | None = None
    link_ips: tuple[str, str] | None = None
    #: Forward these (address, port) of each host, on its side, to the L1's port 22.
    ssh_forwards: tuple[tuple[str, int], tuple[str, int]] | None = None

    @property
    def subnet(self) -> str:
        return f"10.99.{self.slot % 256}"

    def address(self, index: int) -> str:
        """The replication-link IP of host ``index`` (0 or 1), without prefix."""
        return f"{self.subnet}.{index + 1}"

    def l1_specs(self) -> tuple[L1Spec, L1Spec]:
        a, b = link_ports(self.slot)
        ports = ((a, b), (b, a))
        ips = self.link_ips or ("127.0.0.1", "127.0.0.1")
        specs = []
        for i, host in enumerate(self.hosts):
            mine, peer = ports[i]
            here, there = ips[i], ips[1 - i]
            specs.append(
                L1Spec(
                    host=host,
                    ip=f"{self.address(i)}/24",
                    netdev=f"socket,udp={there}:{peer},localaddr={here}:{mine}",
                    mac=f"52:54:00:6b:{self.slot % 256:02x}:{i + 1:02x}",
                    memory_mib=self.memory_mib,
                    data_disk_mib=self.data_disk_mib,
                    share=self.share,
                    lan=self.lan,
                    netns=self.namespaces[i] if self.namespaces else None,
                    lan_forwards=(
                        (f"tcp:{self.ssh_forwards[i][0]}:{self.ssh_forwards[i][1]}-:22",)
                        if self.ssh_forwards
                        else ()
                    ),
                )
            )
        return specs[0], specs[1]


class L1Group:
    """L1 hosts booted from one image, each named ``klab-<lab_id>-<host>``, started
    together and stopped together (also as a context manager)."""

    def __init__(
        self,
        lab_id: str,
        specs: Sequence[L1Spec],
        image: HostImage,
        *,
        lab_dir: Path,
        run_root: Path,
        shm_dir: Path,
    ) -> None:
        self.hosts = tuple(
            L1Host(
                f"klab-{lab_id}-{s.host}",
                s,
                image,
                lab_dir=lab_dir,
                run_root=run_root,
                shm_dir=shm_dir,
            )
            for s in specs
        )

    def start(self, timeout: float = BOOT_TIMEOUT_S) -> None:
        """Start every L1 and wait for every agent.

        Raises:
            VMError: a QEMU did not start or an agent did not answer in time (the
                hosts already started keep running: call :meth:`stop`).
        """
        for h in self.hosts:
            h.start()
        with ThreadPoolExecutor(max_workers=len(self.hosts)) as pool:
            for fut in [pool.submit(h.wait_ready, timeout) for h in self.hosts]:
                fut.result()

    def stop(self) -> None:
        """Stop every QEMU still running (QMP quit, then signals); a failure to stop one
        host does not keep the others running (the first error is raised after)."""
        errors = []
        for h in self.hosts:
            if h.state in (HostState.STARTED, HostState.READY):
                try:
                    h.stop()
                except Exception as err:  # stop the others anyway
                    errors.append(err)
                    h.kill()
        if errors:
            raise errors[0]

    def remove_files(self) -> None:
        for h in self.hosts:
            h.remove_files()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class PairAddresses(Protocol):
    """What a two-host scenario reads of its lab's spec (:class:`PairSpec`, or the
    iSCSI lab's spec, whose two hosts share a segment with a storage L1)."""

    @property
    def lab_id(self) -> str: ...

    @property
    def slot(self) -> int: ...

    def address(self, index: int) -> str:
        """Host ``index``'s (0, 1) address on the link the engine replicates over."""
        ...


class HostPair(Protocol):
    """Two L1 hosts, ``[0]`` and ``[1]`` (the protect demo's primary and standby), and
    the spec of their lab: an :class:`L1Pair`, or two hosts of a larger group (the
    iSCSI lab's, :class:`~kemari_suite.klab.iscsi.IscsiHosts`)."""

    @property
    def spec(self) -> PairAddresses: ...

    @property
    def hosts(self) -> tuple[L1Host, ...]: ...

    def __getitem__(self, index: int) -> L1Host: ...


class L1Pair(L1Group):
    """Both hosts of a :class:`PairSpec`; ``pair[0]``, ``pair[1]`` or ``pair.host(name)``."""

    def __init__(
        self, spec: PairSpec, image: HostImage, *, lab_dir: Path, run_root: Path, shm_dir: Path
    ) -> None:
        super().__init__(
            spec.lab_id,
            spec.l1_specs(),
            image,
            lab_dir=lab_dir,
            run_root=run_root,
            shm_dir=shm_dir,
        )
        self.spec = spec

    def __getitem__(self, index: int) -> L1Host:
        return self.hosts[index]

    def host(self, name: str) -> L1Host:
        """Raises ConfigError for a name that is not one of the pair's."""
        for h in self.hosts:
            if h.spec.host == name:
                return h
        raise ConfigError(f"no L1 host {name!r} in lab {self.spec.lab_id}", key="klab.host")


__all__ = [
    "BASE_PORT",
    "MAX_SLOT",
    "HostPair",
    "L1Group",
    "L1Pair",
    "PairAddresses",
    "PairSpec",
    "link_ports",
]
