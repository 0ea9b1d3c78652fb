"""The kernel lab: L1 hosts under TCG running Debian's stock kernel, for what the
development machines' own kernel lacks (DRBD, nested KVM, soft-dirty, sch_plug, netem).

Modules, by what they own::

    image.py       the L1 image: debootstrap rootfs + cloud kernel + modules, cached
    guestfiles.py  the files in that image (init, fence-peer handler) and the L1 cmdline
    wire.py        the host <-> L1 agent protocol (frames, no I/O; also runs in the L1)
    guestagent.py  the agent inside the L1 (standard library only)
    agent.py       the host's end of the agent channel: run a command, get a Result
    host.py        one L1 host: its QEMU command line, start, stop, kill by PID
    pair.py        two L1 hosts joined by a QEMU socket netdev (the replication link)
    drbd.py        DRBD inside the L1s: the 8.4 resource file, drbd-utils run in the L1
    drbdfailover.py  the DRBD power-loss scenario (promotion, re-protection, offline check)
    l2.py          guests inside an L1 (L2), under nested KVM
    kvmrecords.py  a KVM guest's acknowledged records on DRBD through a power loss
    share.py       the suite's tree inside an L1: virtiofsd on the host, mounted read-only
    engine.py      Kemari's engine in the L1s: role configs, agents by PID, the host's witness
    protectdemo.py Kemari protecting an L2 KVM guest through a power loss of its L1
    netem.py       the link profiles inside the L1s (1g, 10g, wan): netem on eth0
    standing.py    a kernel lab kept up by a supervisor: lab up/status/down --kernel, exec

See docs/kernel-lab.md.
"""
