"""``kemari klab``: the kernel lab (L1 hosts under TCG with Debian's stock kernel).

``image`` builds (or finds) the L1 image; ``drbd-power-loss`` and ``kvm-power-loss`` run
the DRBD scenarios of :mod:`kemari_suite.klab.drbdfailover` and
:mod:`kemari_suite.klab.kvmrecords` on two L1s and stop them again; ``protect-demo``
runs Kemari's own engine in them (:mod:`kemari_suite.klab.protectdemo`; with ``--disk
iscsi`` on the three L1s of :mod:`kemari_suite.klab.iscsidemo`). Progress goes to
stderr; ``--json`` makes the last stdout line one JSON object. The L1s live only as long
as the command (see docs/kernel-lab.md).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console

from kemari_suite import config as configmod
from kemari_suite.cli.common import guard
from kemari_suite.config import KemariConfig
from kemari_suite.errors import KemariError

if TYPE_CHECKING:
    from kemari_suite.klab.image import HostImage
    from kemari_suite.klab.iscsi import IscsiLab
    from kemari_suite.klab.pair import L1Group, L1Pair

G = TypeVar("G", bound="L1Group")

app = typer.Typer(no_args_is_help=True, help="The kernel lab: L1 hosts with Debian's kernel.")
out = Console(soft_wrap=True, highlight=False)
err = Console(stderr=True, soft_wrap=True, highlight=False)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="TOML config (paths.cache_dir, ...).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Last stdout line: one JSON object.")]


def _progress(t0: float) -> Callable[[str], None]:
    def note(msg: str) -> None:
        err.print(f"[dim]{time.monotonic() - t0:7.1f}s[/] {msg}")

    return note


NestedOpt = Annotated[
    bool, typer.Option("--nested", help="The image with QEMU inside, for L2 guests.")
]


def _build(cache_dir: Path, nested: bool, note: Callable[[str], None]) -> HostImage:
    from kemari_suite.klab.image import build_host_image
    from kemari_suite.klab.l2 import NESTED_PACKAGES, NESTED_SIZE_MIB

    if nested:
        return build_host_image(
            cache_dir, packages=NESTED_PACKAGES, size_mib=NESTED_SIZE_MIB, progress=note
        )
    return build_host_image(cache_dir, progress=note)


@contextmanager
def _group(cfg: KemariConfig, make: Callable[[Path, Path], G]) -> Iterator[G]:
    """L1s made by ``make(work, shm)`` in a temporary folder (and one for their RAM);
    stopped and removed whatever happens."""
    work = Path(tempfile.mkdtemp(prefix="klab-", dir=os.environ.get("TMPDIR", "/tmp")))
    shm = cfg.paths.shm_dir / work.name
    shm.mkdir(parents=True, exist_ok=True)
    try:
        group = make(work, shm)
        try:
            yield group
        finally:
            try:
                group.stop()
            except KemariError as e:
                err.print(f"[bold red]error:[/] stopping the L1s: {e}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)


def _pair(
    cfg: KemariConfig,
    img: HostImage,
    slot: int,
    *,
    share: str = "",
    lan: bool = False,
    memory_mib: int = 768,
    data_disk_mib: int = 64,
) -> AbstractContextManager[L1Pair]:
    """Two L1s in a temporary folder; stopped and removed whatever happens."""
    from kemari_suite.klab.pair import L1Pair, PairSpec

    spec = PairSpec(
        f"c{slot}",
        slot=slot,
        data_disk_mib=data_disk_mib,
        share=share,
        lan=lan,
        memory_mib=memory_mib,
    )
    return _group(
        cfg,
        lambda work, shm: L1Pair(
            spec, img, lab_dir=work / "lab", run_root=work / "run", shm_dir=shm
        ),
    )


def _iscsi_lab(
    cfg: KemariConfig, img: HostImage, slot: int, *, share: str
) -> AbstractContextManager[IscsiLab]:
    """The iSCSI lab of the protect demo (hosts with the tree and eth1 for the witness)
    in a temporary folder; stopped and removed whatever happens."""
    from kemari_suite.klab.iscsi import IscsiLab, IscsiLabSpec
    from kemari_suite.klab.iscsidemo import HOST_MEMORY_MIB, STORAGE_MEMORY_MIB

    spec = IscsiLabSpec(
        f"c{slot}",
        slot=slot,
        memory_mib=HOST_MEMORY_MIB,
        storage_memory_mib=STORAGE_MEMORY_MIB,
        share=share,
        lan=True,
    )
    return _group(
        cfg,
        lambda work, shm: IscsiLab(
            spec, img, lab_dir=work / "lab", run_root=work / "run", shm_dir=shm
        ),
    )


def _demo_image(cfg: KemariConfig, disk: str, note: Callable[[str], None]) -> HostImage:
    """The L1 image of the protect demo: the nested one, with the initiator for iSCSI."""
    if disk != "iscsi":
        return _build(cfg.paths.cache_dir, True, note)
    from kemari_suite.klab.image import build_host_image
    from kemari_suite.klab.iscsidemo import ISCSI_NESTED_PACKAGES, ISCSI_NESTED_SIZE_MIB

    return build_host_image(
        cfg.paths.cache_dir,
        packages=ISCSI_NESTED_PACKAGES,
        size_mib=ISCSI_NESTED_SIZE_MIB,
        progress=note,
    )


def _report(result: dict[str, object], as_json: bool) -> None:
    if as_json:
        out.print(json.dumps(result))
    else:
        for key, value in result.items():
            out.print(f"{key}: {value}")
    if not result.get("ok"):
        raise typer.Exit(1)


@app.command("image")
def image(config: ConfigOpt = None, as_json: JsonOpt = False, nested: NestedOpt = False) -> None:
    """Build (or find in the cache) the L1 host image."""
    cfg = configmod.load(config)
    img = guard(lambda: _build(cfg.paths.cache_dir, nested, _progress(time.monotonic())))
    if as_json:
        out.print(
            json.dumps(
                {
                    "key": img.key,
                    "disk": str(img.disk),
                    "kernel": str(img.kernel),
                    "kernel_version": img.kernel_version,
                    "cached": img.cached,
                }
            )
        )
    else:
        out.print(f"{img.disk}\n{img.kernel} ({img.kernel_version})")


SlotOpt = Annotated[int, typer.Option(help="Link slot (UDP ports) of the lab, 0..199.")]


@app.command("drbd-power-loss")
def drbd_power_loss(
    config: ConfigOpt = None, as_json: JsonOpt = False, slot: SlotOpt = 190
) -> None:
    """DRBD on two L1s: kill the primary, promote, resync the old one, check offline."""
    from kemari_suite.klab.drbdfailover import run_power_loss

    cfg = configmod.load(config)
    note = _progress(time.monotonic())
    img = guard(lambda: _build(cfg.paths.cache_dir, False, note))
    with _pair(cfg, img, slot) as pair:

        def scenario() -> dict[str, object]:
            pair.start()
            note(f"both L1s ready ({pair[0].boot_s:.1f} s, {pair[1].boot_s:.1f} s)")
            return run_power_loss(pair, progress=note).as_dict()

        result = guard(scenario)
    _report(result, as_json)


@app.command("kvm-power-loss")
def kvm_power_loss(config: ConfigOpt = None, as_json: JsonOpt = False, slot: SlotOpt = 191) -> None:
    """A KVM guest writes records on DRBD; its L1 dies; no acknowledged record is lost."""
    from kemari_suite.klab.kvmrecords import run_kvm_power_loss
    from kemari_suite.vm.define import ensure_image

    cfg = configmod.load(config)
    note = _progress(time.monotonic())
    img = guard(lambda: _build(cfg.paths.cache_dir, True, note))
    guest = guard(lambda: ensure_image(cfg, note))
    with _pair(cfg, img, slot) as pair:

        def scenario() -> dict[str, object]:
            pair.start()
            note(f"both L1s ready ({pair[0].boot_s:.1f} s, {pair[1].boot_s:.1f} s)")
            return run_kvm_power_loss(pair, guest, progress=note).as_dict()

        result = guard(scenario)
    _report(result, as_json)


@app.command("iscsi-pr")
def iscsi_pr(
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
    slot: SlotOpt = 193,
    backend: Annotated[
        bool,
        typer.Option(
            "--backend", help="Through the engine's shared backend (the tree by virtiofs)."
        ),
    ] = False,
) -> None:
    """An iSCSI LUN on a third L1; SCSI-3 reservations fence the preempted host (its
    writes refused by the target)."""
    from kemari_suite.klab.image import build_host_image
    from kemari_suite.klab.iscsi import ISCSI_PACKAGES, IscsiLab, IscsiLabSpec, run_pr_fencing
    from kemari_suite.klab.iscsifence import run_backend_fencing

    cfg = configmod.load(config)
    note = _progress(time.monotonic())
    img = guard(
        lambda: build_host_image(cfg.paths.cache_dir, packages=ISCSI_PACKAGES, progress=note)
    )
    tree = str(_checkout()) if backend else ""
    spec = IscsiLabSpec(f"c{slot}", slot=slot, share=tree)
    with _group(
        cfg,
        lambda work, shm: IscsiLab(
            spec, img, lab_dir=work / "lab", run_root=work / "run", shm_dir=shm
        ),
    ) as lab:

        def scenario() -> dict[str, object]:
            lab.start()
            note("three L1s ready (" + ", ".join(f"{h.boot_s:.1f} s" for h in lab.hosts) + ")")
            if backend:
                return run_backend_fencing(lab, tree, progress=note).as_dict()
            return run_pr_fencing(lab, progress=note).as_dict()

        result = guard(scenario)
    _report(result, as_json)


@app.command("sizing")
def sizing(
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
    slot: SlotOpt = 194,
    sizes: Annotated[str, typer.Option(help="Guest sizes, MiB, comma-separated.")] = "128,1024",
    samples: Annotated[int, typer.Option(help="Sync points per tracker and size.")] = 15,
    out_dir: Annotated[
        Path | None, typer.Option("--out", "-o", help="Results folder (none: no files).")
    ] = None,
) -> None:
    """`kemari bench sizing`'s trackers inside an L1 on Debian's kernel (soft-dirty
    beside compare, guests under nested KVM); only ratios count (the L1 is emulated)."""
    from kemari_suite.bench.memsync import machine_info, source_commit
    from kemari_suite.bench.sizing import write_results
    from kemari_suite.klab.host import L1Spec
    from kemari_suite.klab.pair import L1Group
    from kemari_suite.klab.sizing import L1_MEMORY_MIB, run_sizing_in_l1
    from kemari_suite.vm.define import ensure_image

    cfg = configmod.load(config)
    note = _progress(time.monotonic())
    img = guard(lambda: _build(cfg.paths.cache_dir, True, note))
    guest = guard(lambda: ensure_image(cfg, note))
    tree = str(_checkout())
    # The code measured is the tree as it is now (the L1 runs it): name its commit now.
    commit = source_commit()
    spec = L1Spec(host="l1a", memory_mib=L1_MEMORY_MIB, vcpus=2, share=tree)
    sizes_mib = [int(x) for x in sizes.split(",") if x.strip()]
    with _group(
        cfg,
        lambda work, shm: L1Group(
            f"z{slot}", [spec], img, lab_dir=work / "lab", run_root=work / "run", shm_dir=shm
        ),
    ) as group:

        def scenario() -> dict[str, object]:
            group.start()
            res = run_sizing_in_l1(
                group.hosts[0], guest, tree=tree, sizes_mib=sizes_mib, samples=samples,
                progress=note,
            )  # fmt: skip
            res["machine"]["commit"] = commit
            res["l1"]["host"] = machine_info()
            return res

        result = guard(scenario)
    if out_dir is not None:
        command = "kemari klab sizing " + " ".join(sys.argv[3:])
        note(f"wrote {write_results(result, out_dir, command.strip())}")
    from kemari_suite.bench.trackers import summary

    figures = {**summary(result["trackers"]), "l1": result["l1"]}  # type: ignore[arg-type]
    figures["ok"] = not figures.get("errors")
    _report(figures, as_json)


@app.command("power-loss")
def power_loss(
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
    backend: Annotated[
        str, typer.Option(help="The disk backend: builtin, drbd or iscsi.")
    ] = "builtin",
    trials: Annotated[int, typer.Option(min=1, help="Trials (victims alternate).")] = 20,
    seed: Annotated[int, typer.Option(help="Seed of the random kill moments.")] = 1,
    slot: SlotOpt = 195,
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Write power-loss-<backend>.jsonl and .md here."),
    ] = None,
) -> None:
    """Power-loss campaign: Kemari in two L1s, one L1 killed at a random moment (primary
    and standby in turn), every acknowledged record checked live and offline (iscsi: a
    third L1 serves the LUN, and a killed primary must be fenced)."""
    from kemari_suite.bench.memsync import header_lines, machine_info
    from kemari_suite.klab.campaign import run_campaign, summary, write_report
    from kemari_suite.vm.define import ensure_image

    if backend not in KERNEL_LAB_DISKS:
        err.print(f"[bold red]error:[/] --backend {backend}: {' or '.join(KERNEL_LAB_DISKS)}")
        raise typer.Exit(2)
    cfg = configmod.load(config)
    note = _progress(time.monotonic())
    img = guard(lambda: _demo_image(cfg, backend, note))
    guest = guard(lambda: ensure_image(cfg, note))
    tree = str(_checkout())
    machine = machine_info()  # the commit the trials run, named before they start
    record = None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        record = out_dir / f"power-loss-{backend}.jsonl"
        record.unlink(missing_ok=True)
    work = Path(tempfile.mkdtemp(prefix="klab-pl-", dir=os.environ.get("TMPDIR", "/tmp")))

    def make_lab(_n: int) -> AbstractContextManager[L1Group]:
        if backend == "iscsi":
            return _iscsi_lab(cfg, img, slot, share=tree)
        return _pair(cfg, img, slot, share=tree, lan=True, memory_mib=1024,
                     data_disk_mib=64 if backend == "drbd" else 0)  # fmt: skip

    try:
        done = guard(
            lambda: run_campaign(
                make_lab, guest, tree=tree, work=work, host_paths=cfg.paths, backend=backend,
                trials=trials, seed=seed, record=record, progress=note,
            )
        )  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = summary(done)
    if out_dir is not None:
        command = ("kemari klab power-loss " + " ".join(sys.argv[3:])).strip()
        head = header_lines(f"Power loss in the kernel lab: {backend} disk", command, machine)
        note(f"wrote {write_report(done, out_dir, backend, head)}")
    _report({**result, "ok": result["all_ok"]}, as_json)


TreeOpt = Annotated[
    Path | None,
    typer.Option(help="The suite's checkout the L1s run (shared read-only); default: this one."),
]
AccelOpt = Annotated[str, typer.Option(help="The guest's accelerator: auto, kvm or tcg.")]


def _checkout() -> Path:
    """The checkout this CLI runs from (the folder holding ``kemari_suite``)."""
    import kemari_suite

    return Path(kemari_suite.__file__).resolve().parent.parent


def protect_demo_result(run: dict[str, object]) -> dict[str, object]:
    """The JSON of ``protect-demo``: the demo's keys first, then everything measured."""
    keys: tuple[str, ...] = (
        "resumed", "accel", "disk_backend", "records_acked", "records_lost", "failover_ms",
    )  # fmt: skip
    if run.get("disk_backend") == "drbd":
        keys += ("promoted",)
    if run.get("disk_backend") == "iscsi":
        keys += ("fenced",)
    return {**{k: run.get(k) for k in keys}, **run}


#: The disk backends the kernel lab's demo runs with (iscsi: a third L1 serves the LUN).
KERNEL_LAB_DISKS = ("builtin", "drbd", "iscsi")


@app.command("protect-demo")
def protect_demo(
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
    slot: SlotOpt = 192,
    tree: TreeOpt = None,
    accel: AccelOpt = "auto",
    disk: Annotated[
        str,
        typer.Option(
            help="The engine's disk backend: builtin, drbd (8.4 in the L1s) or iscsi (a LUN "
            "served by a third L1, fenced by SCSI-3 reservations)."
        ),
    ] = "builtin",
    min_acks: Annotated[int, typer.Option(help="Records acknowledged before the kill.")] = 30,
    verify_tracker: Annotated[
        bool,
        typer.Option(
            "--verify-tracker",
            help="replication.tracker_verify: the compare tracker checks the fast one at "
            "every scan (a missed page stops the primary; over-reporting is counted).",
        ),
    ] = False,
    reprotect: Annotated[
        bool,
        typer.Option(
            "--reprotect",
            help="Then start the killed L1 again from its disk as the standby (DRBD "
            "resyncs it), wait until protected again, write more records and kill the "
            "other L1: the guest must come back in the first with every record "
            "(builtin or drbd).",
        ),
    ] = False,
) -> None:
    """Kemari inside two L1s: standby in one, protect in the other (the guest under
    nested KVM), records over TCP, power loss of the primary L1, resumed on the other."""
    run_kernel_lab_demo(
        configmod.load(config),
        disk=disk,
        as_json=as_json,
        slot=slot,
        tree=tree,
        accel=accel,
        min_acks=min_acks,
        tracker_verify=verify_tracker,
        reprotect=reprotect,
    )


def run_kernel_lab_demo(
    cfg: KemariConfig,
    *,
    disk: str,
    as_json: bool,
    slot: int = 192,
    tree: Path | None = None,
    accel: str = "auto",
    min_acks: int = 30,
    tracker_verify: bool = False,
    reprotect: bool = False,
) -> None:
    """``klab protect-demo`` and ``demo --kernel-lab``: report the run (the last stdout
    line with ``as_json``); exit 1 unless it resumed with nothing acknowledged lost,
    2 for a disk backend the lab cannot run (``reprotect``: builtin or drbd)."""
    from kemari_suite.klab.iscsi import IscsiLab
    from kemari_suite.klab.iscsidemo import run_iscsi_protect_demo
    from kemari_suite.klab.pair import L1Pair
    from kemari_suite.klab.protectdemo import run_protect_demo
    from kemari_suite.vm.define import ensure_image

    if disk not in KERNEL_LAB_DISKS:
        err.print(
            f"[bold red]error:[/] --disk {disk}: the kernel lab runs "
            f"{' or '.join(KERNEL_LAB_DISKS)}"
        )
        raise typer.Exit(2)
    if reprotect and disk == "iscsi":
        err.print("[bold red]error:[/] --reprotect runs with --disk builtin or drbd")
        raise typer.Exit(2)
    note = _progress(time.monotonic())
    img = guard(lambda: _demo_image(cfg, disk, note))
    guest = guard(lambda: ensure_image(cfg, note))
    share = (tree or _checkout()).resolve()
    lab: AbstractContextManager[L1Group]
    if disk == "iscsi":
        lab = _iscsi_lab(cfg, img, slot, share=str(share))
    else:
        data_mib = 64 if disk == "drbd" else 0
        lab = _pair(
            cfg, img, slot, share=str(share), lan=True, memory_mib=1024, data_disk_mib=data_mib
        )
    with lab as group:

        def scenario() -> dict[str, object]:
            group.start()
            boots = ", ".join(f"{h.boot_s:.1f} s" for h in group.hosts)
            note(f"{len(group.hosts)} L1s ready ({boots})")
            common: dict[str, Any] = {
                "tree": str(share),
                "work": group.hosts[0].folder.parent / "engine",
                "host_paths": cfg.paths,
                "accel": accel,
                "min_acks": min_acks,
                "tracker_verify": tracker_verify,
                "progress": note,
            }
            if reprotect:
                from kemari_suite.klab.reprotectdemo import run_reprotect_demo

                assert isinstance(group, L1Pair)
                del common["tracker_verify"]
                return run_reprotect_demo(group, guest, disk_backend=disk, **common).as_dict()
            if isinstance(group, IscsiLab):
                run = run_iscsi_protect_demo(group, guest, **common)
            else:
                assert isinstance(group, L1Pair)
                run = run_protect_demo(group, guest, disk_backend=disk, **common)
            return protect_demo_result(run.as_dict())

        result = guard(scenario)
    _report(result, as_json)


@app.command("serve", hidden=True)
def serve(
    lab_id: Annotated[str, typer.Option("--id", help="The standing lab's id.")],
    profile: Annotated[str, typer.Option(help="Link profile: 1g, 10g, wan or unlimited.")] = "1g",
    slot: Annotated[int | None, typer.Option(help="Link slot; default: from the id.")] = None,
    nested: Annotated[bool, typer.Option(help="The image with QEMU, for L2 guests.")] = True,
    share: Annotated[str, typer.Option(help="A host folder the L1s mount read-only.")] = "",
    netns: Annotated[str, typer.Option(help="The L1s' namespaces: A,B.")] = "",
    link_ips: Annotated[str, typer.Option(help="The link's addresses there: A,B.")] = "",
    ssh_addresses: Annotated[str, typer.Option(help="Where each sshd is forwarded: A,B.")] = "",
    ssh: Annotated[bool, typer.Option(help="Run sshd in the L1s.")] = True,
    config: ConfigOpt = None,
) -> None:
    """The supervisor of a standing kernel lab (started by `kemari lab up --kernel`)."""
    from kemari_suite.klab.standing import serve as run_serve

    def two(text: str, what: str) -> tuple[str, str] | None:
        if not text:
            return None
        parts = text.split(",")
        if len(parts) != 2 or not all(parts):
            err.print(f"[bold red]error:[/] --{what} {text!r}: expected A,B")
            raise typer.Exit(2)
        return parts[0], parts[1]

    cfg = configmod.load(config)
    code = run_serve(
        cfg.paths,
        lab_id,
        profile=profile,
        slot=slot,
        nested=nested,
        share=share,
        namespaces=two(netns, "netns"),
        link_ips=two(link_ips, "link-ips"),
        ssh_addresses=two(ssh_addresses, "ssh-addresses"),
        ssh=ssh,
    )
    raise typer.Exit(code)


@app.command("exec")
def exec_command(
    lab_id: Annotated[str, typer.Option("--id", help="The standing lab's id.")],
    command: Annotated[list[str], typer.Argument(help="The command (after --).")],
    host: Annotated[str, typer.Option(help="The L1: l1a or l1b.")] = "l1a",
    timeout: Annotated[float, typer.Option(help="Seconds before it is stopped.")] = 300.0,
    config: ConfigOpt = None,
) -> None:
    """Run a command in an L1 of a standing kernel lab (`kemari lab up --kernel`); its
    output and exit status are the command's."""
    import shlex

    from kemari_suite.klab.standing import exec_in

    cfg = configmod.load(config)
    line = command[0] if len(command) == 1 else shlex.join(command)
    res = guard(lambda: exec_in(cfg.paths, lab_id, host, line, timeout))
    if res.stdout:
        print(res.stdout, end="" if res.stdout.endswith("\n") else "\n")
    if res.stderr:
        err.print(res.stderr.rstrip("\n"), highlight=False, markup=False)
    if res.timed_out:
        err.print(f"[bold red]error:[/] timed out after {timeout:g} s")
    raise typer.Exit(res.exit_code if not res.timed_out else 124)
