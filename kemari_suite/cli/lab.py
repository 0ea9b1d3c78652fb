"""``kemari lab``: the local host pair, and ready-to-run configs for a VM protected in it.

``up`` builds the lab and writes the three agents' configs; ``configs`` writes them
again (other options, another folder); ``status``, ``list`` and ``down`` find a lab
through the machine-wide registry whatever ``KEMARI_RUN`` says. Commands meant to be
copied are printed whole, never wrapped; ``--json`` prints one JSON object instead.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from kemari_suite import config as configmod
from kemari_suite.cli.common import guard
from kemari_suite.config import ImageConfig, KemariConfig
from kemari_suite.errors import ConfigError

if TYPE_CHECKING:
    from kemari_suite.lab import LabLayout, LabStatus
    from kemari_suite.lab.configs import LabConfigs, PairOptions

app = typer.Typer(no_args_is_help=True, help="The local host-pair lab (network namespaces).")
out = Console(soft_wrap=True, highlight=False)
err = Console(stderr=True, soft_wrap=True, highlight=False)

LabIdOpt = Annotated[str, typer.Option("--id", help="Lab id (1-4 letters or digits).")]
ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="Base TOML config: paths, image, replication settings."),
]
OutOpt = Annotated[
    Path | None,
    typer.Option(
        "--out", "-o", help="Folder for the configs (default <run_dir>/kemari-<id>-configs)."
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]
NameOpt = Annotated[str, typer.Option("--name", help="The VM's name (vm.name).")]
MemoryOpt = Annotated[int, typer.Option("--memory", help="Guest RAM, MiB.")]
VcpusOpt = Annotated[int, typer.Option("--vcpus", help="Guest vCPUs.")]
AddOpt = Annotated[
    list[str] | None,
    typer.Option("--add", help="Extra file for the guest image, SRC:DEST (repeatable)."),
]
InitOpt = Annotated[
    str | None, typer.Option("--init", help="Command baked into the image for init to run.")
]
KernelOpt = Annotated[Path | None, typer.Option("--guest-kernel", help="Prebuilt guest kernel.")]
InitrdOpt = Annotated[Path | None, typer.Option("--guest-initrd", help="Prebuilt guest initramfs.")]
KernelLabOpt = Annotated[
    bool,
    typer.Option(
        "--kernel",
        help="The kernel lab: two L1 hosts on Debian's kernel (DRBD, KVM, netem), kept "
        "running by a supervisor until `lab down --kernel` (profiles 1g, 10g, wan, "
        "unlimited).",
    ),
]
RunOpt = Annotated[
    str | None,
    typer.Option(
        "--run",
        help="Command the guest runs (vm.run, overrides the image's). Default: the image's "
        "own --init, or the counter workload on port 7000 for the stock image.",
    ),
]
PortOpt = Annotated[
    list[int] | None,
    typer.Option("--guest-port", help="A TCP port your guest serves, to list (repeatable)."),
]
DiskOpt = Annotated[
    str, typer.Option("--disk", help="Guest disk: builtin (one per host), shared, or none.")
]
DiskMibOpt = Annotated[int, typer.Option("--disk-mib", help="Guest disk size, MiB.")]
CommitOpt = Annotated[
    bool,
    typer.Option(
        "--output-commit/--no-output-commit",
        help="Guest NIC behind the frame proxy (output commit) or a plain TAP backend.",
    ),
]


VmsOpt = Annotated[
    int,
    typer.Option(
        "--vms",
        min=1,
        max=99,
        help="Write configs for this many VMs, vm1..vmN, on the pair: the first half with "
        "their primary on host A, the rest on host B, one witness for all.",
    ),
]


@dataclasses.dataclass(frozen=True)
class _VMChoices:
    """What the config-writing commands take from their options."""

    name: str
    memory: int
    vcpus: int
    add: tuple[str, ...]
    init: str | None
    kernel: Path | None
    initrd: Path | None
    run: str | None
    guest_ports: tuple[int, ...]
    disk: str
    disk_mib: int
    output_commit: bool


# --------------------------------------------------------------------------- commands


@app.command("up")
def lab_up(
    lab_id: LabIdOpt = "0",
    profile: Annotated[str, typer.Option(help="Link profile: 1g, 10g or unlimited.")] = "1g",
    config: ConfigOpt = None,
    out_dir: OutOpt = None,
    name: NameOpt = "guest",
    memory: MemoryOpt = 128,
    vcpus: VcpusOpt = 1,
    add: AddOpt = None,
    init: InitOpt = None,
    kernel: KernelOpt = None,
    initrd: InitrdOpt = None,
    run: RunOpt = None,
    guest_port: PortOpt = None,
    disk: DiskOpt = "none",
    disk_mib: DiskMibOpt = 64,
    output_commit: CommitOpt = True,
    vms: VmsOpt = 1,
    kernel_lab: KernelLabOpt = False,
    ssh: Annotated[
        bool, typer.Option("--ssh/--no-ssh", help="With --kernel: sshd in the L1s (port 2222).")
    ] = True,
    json_out: JsonOpt = False,
) -> None:
    """Create a lab, write ready-to-run configs for a VM in it, print how to start it.

    The lab: primary, secondary and client namespaces, a shaped replication link, a LAN.
    The configs: primary.toml, secondary.toml, witness.toml and lab.env (with ``--vms``:
    one folder of them per VM, each VM with its own address, TAPs and ports).
    """
    if kernel_lab:
        _kernel_up(lab_id, profile, config, ssh=ssh, json_out=json_out)
        return
    choices = _VMChoices(
        name, memory, vcpus, tuple(add or ()), init, kernel, initrd, run,
        tuple(guest_port or ()), disk, disk_mib, output_commit,
    )  # fmt: skip
    if vms > 1:
        if name != "guest":
            err.print("[bold red]error:[/] --name names one VM; --vms names them vm1..vmN")
            raise typer.Exit(2)
        _several_command(lab_id, config, out_dir, choices, vms, json_out=json_out, profile=profile)
        return
    _configs_command(lab_id, config, out_dir, choices, json_out=json_out, profile=profile)


@app.command("configs")
def lab_configs(
    lab_id: LabIdOpt = "0",
    config: ConfigOpt = None,
    out_dir: OutOpt = None,
    name: NameOpt = "guest",
    memory: MemoryOpt = 128,
    vcpus: VcpusOpt = 1,
    add: AddOpt = None,
    init: InitOpt = None,
    kernel: KernelOpt = None,
    initrd: InitrdOpt = None,
    run: RunOpt = None,
    guest_port: PortOpt = None,
    disk: DiskOpt = "none",
    disk_mib: DiskMibOpt = 64,
    output_commit: CommitOpt = True,
    json_out: JsonOpt = False,
) -> None:
    """Write ready-to-run configs for a VM in a lab, print how to start it.

    A fresh key each time: restart all three agents with the new files.
    """
    choices = _VMChoices(
        name, memory, vcpus, tuple(add or ()), init, kernel, initrd, run,
        tuple(guest_port or ()), disk, disk_mib, output_commit,
    )  # fmt: skip
    _configs_command(lab_id, config, out_dir, choices, json_out=json_out, profile=None)


@app.command("down")
def lab_down(
    lab_id: LabIdOpt = "0",
    kernel_lab: KernelLabOpt = False,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Remove a lab and all it left: processes, namespaces, links, files.

    Its files are found through the registry, wherever KEMARI_RUN pointed.
    """
    from kemari_suite import lab

    if kernel_lab:
        _kernel_down(lab_id, config, json_out=json_out)
        return

    rep = guard(lambda: lab.down(lab_id))
    if json_out:
        print(json.dumps(dataclasses.asdict(rep) | {"found": rep.found}, default=str))
        return
    if not rep.found:
        out.print(f"no lab {lab_id}: nothing to remove")
        out.print(
            f"looked for namespaces {', '.join(lab.layout(lab_id).namespaces)} in "
            f"/run/netns, the registry entry {_registry_file(lab_id)}, and "
            f"kemari-{lab_id}-* in {', '.join(str(d) for d in rep.searched)}"
        )
        return
    out.print(f"lab {lab_id} removed")
    if rep.namespaces:
        out.print(f"  namespaces  {', '.join(rep.namespaces)}")
    for path in rep.removed:
        out.print(f"  removed     {path}")
    if rep.registry_file is not None:
        out.print(f"  registry    {rep.registry_file}")


@app.command("status")
def lab_status(
    lab_id: LabIdOpt = "0",
    kernel_lab: KernelLabOpt = False,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Show what exists of a lab (exit 1 unless it is complete).

    Found through its namespaces and the registry, whatever the environment says.
    """
    from kemari_suite import lab

    if kernel_lab:
        _kernel_status(lab_id, config, json_out=json_out)
        return

    st = guard(lambda: lab.status(lab_id))
    if json_out:
        print(json.dumps(dataclasses.asdict(st), default=str))
    else:
        _show_status(st)
    if not st.complete:
        raise typer.Exit(1)


@app.command("list")
def lab_list(json_out: JsonOpt = False) -> None:
    """Every lab on this machine: from its namespaces and from the registry."""
    from kemari_suite import lab
    from kemari_suite.lab import registry

    live = set(lab.list_labs())
    ids = sorted(live | set(registry.registered()))
    rows = []
    for lab_id in ids:
        rec = registry.lookup(lab_id)
        rows.append(
            {
                "lab_id": lab_id,
                "up": lab_id in live,
                "profile": rec.profile if rec is not None else None,
                "run_dir": str(rec.run_dir) if rec is not None else None,
                "shm_dir": str(rec.shm_dir) if rec is not None else None,
                "configs_dir": str(rec.configs_dir) if rec and rec.configs_dir else None,
            }
        )
    if json_out:
        print(json.dumps(rows))
        return
    if not rows:
        out.print(f"no labs (no kemari-* namespaces, nothing in {registry.REGISTRY_DIR})")
        return
    for row in rows:
        where = f"files in {row['run_dir']}" if row["run_dir"] else "not registered"
        state = "up" if row["up"] else "gone (stale registry entry)"
        configs = f", configs in {row['configs_dir']}" if row["configs_dir"] else ""
        out.print(f"{row['lab_id']:<5} {state:<4} {row['profile'] or '?':<9} {where}{configs}")


# --------------------------------------------------------------------------- helpers


def _configs_command(
    lab_id: str,
    config: Path | None,
    out_dir: Path | None,
    choices: _VMChoices,
    *,
    json_out: bool,
    profile: str | None,
) -> None:
    """``lab up`` (with a ``profile``: the lab is built first, and taken down again if
    its configs cannot be written) and ``lab configs`` (for the lab as it is)."""
    from kemari_suite import lab
    from kemari_suite.lab import configs as labconfigs
    from kemari_suite.lab import registry

    cfg = _load(config)
    opts = guard(lambda: _options(cfg, choices))
    if profile is not None:
        lay = guard(lambda: lab.up(lab_id, profile, paths=cfg.paths))
    else:
        st = guard(lambda: lab.status(lab_id, paths=cfg.paths))
        if not st.exists:
            err.print(f"note: lab {lab_id} is not up; run `kemari lab up --id {lab_id}` first")
        lay = st.layout or guard(lambda: lab.layout(lab_id))
        rec = registry.lookup(lab_id)
        if rec is not None:
            # The agents' run and shm folders go where the lab's files are, so that
            # `kemari lab down` finds them.
            paths = dataclasses.replace(cfg.paths, run_dir=rec.run_dir, shm_dir=rec.shm_dir)
            cfg = dataclasses.replace(cfg, paths=paths)
    directory = (out_dir or labconfigs.default_dir(cfg.paths, lab_id)).absolute()

    def write() -> labconfigs.LabConfigs:
        written = labconfigs.write(lay, cfg, opts, directory, guest_ports=choices.guest_ports)
        for path in written.configs.values():
            configmod.load(path)  # ready to run: every value checked now, not at start
        registry.note_configs(lab_id, written.directory)
        return written

    try:
        written = guard(write)
    except typer.Exit:
        if profile is not None:
            guard(lambda: lab.down(lab_id, paths=cfg.paths))
        raise
    _show_configs(lay, written, opts, json_out=json_out, created=profile is not None)


def _several_command(
    lab_id: str,
    config: Path | None,
    out_dir: Path | None,
    choices: _VMChoices,
    count: int,
    *,
    json_out: bool,
    profile: str,
) -> None:
    """``lab up --vms N``: the lab, then one folder of configs per VM (``<dir>/vmK``),
    each VM's TAPs; the lab is taken down again if a step fails."""
    from kemari_suite import lab
    from kemari_suite.lab import configs as labconfigs
    from kemari_suite.lab import registry
    from kemari_suite.lab.lab import add_vm_taps

    cfg = _load(config)
    opts = guard(lambda: _options(cfg, choices))
    directory = (out_dir or labconfigs.default_dir(cfg.paths, lab_id)).absolute()
    names = [f"vm{i}" for i in range(1, count + 1)]
    keys_dir = directory / labconfigs.WITNESS_KEYS_DIR
    several = guard(
        lambda: labconfigs.several_options(opts, names, on_b=count // 2, witness_keys_dir=keys_dir)
    )
    lay = guard(lambda: lab.up(lab_id, profile, paths=cfg.paths))

    def write() -> list[tuple[PairOptions, LabConfigs]]:
        done = []
        for o in several:
            written = labconfigs.write(
                lay, cfg, o, directory / o.vm_name, guest_ports=choices.guest_ports
            )
            for path in written.configs.values():
                configmod.load(path)
            done.append((o, written))
        add_vm_taps(lay, [o.addresses(lay) for o in several])
        registry.note_configs(lab_id, directory)
        return done

    try:
        done = guard(write)
    except typer.Exit:
        guard(lambda: lab.down(lab_id, paths=cfg.paths))
        raise
    _show_several(lay, done, json_out=json_out)


def _show_several(
    lay: LabLayout, done: list[tuple[PairOptions, LabConfigs]], *, json_out: bool
) -> None:
    prog = _kemari_prog()
    kemari = shlex.join(prog)
    witness = done[0][1].launch("witness").shell(prog)
    vms: list[dict[str, Any]] = []
    for o, w in done:
        a = o.addresses(lay)
        vms.append(
            {
                "name": o.vm_name,
                "slot": a.slot,
                "guest_ip": a.guest_ip,
                "mac": a.mac,
                "primary_host": "A" if o.host_of("primary") == "primary" else "B",
                "taps": {r: a.tap_for(r) for r in ("primary", "secondary")},
                "replication_port": a.repl_port,
                "metrics_port": a.metrics_port if o.metrics else None,
                "directory": str(w.directory),
                "configs": {r: str(p) for r, p in w.configs.items() if r != "witness"},
                "commands": {x.role: x.shell(prog) for x in w.launches if x.role != "witness"},
                "status": {
                    r: f"{kemari} status -c {shlex.quote(str(w.configs[r]))}"
                    for r in ("primary", "secondary")
                },
            }
        )
    down = f"{kemari} lab down --id {lay.lab_id}"
    if json_out:
        print(
            json.dumps(
                {
                    "lab_id": lay.lab_id,
                    "profile": lay.profile.name,
                    "namespaces": {r: lay.ns_for(r) for r in ("primary", "secondary", "client")},
                    "lan": {r: lay.lan_ip_for(r) for r in ("primary", "secondary", "client")},
                    "witness": witness,
                    "vms": vms,
                    "down": down,
                }
            )
        )
        return
    out.print(f"lab {lay.lab_id} is up (profile {lay.profile.name}), {len(vms)} VMs on its pair:")
    out.print(f"  {'VM':<6} {'guest IP':<15} {'primary on':<11} {'repl port':<10} metrics port")
    for v in vms:
        metrics = v["metrics_port"] if v["metrics_port"] is not None else "-"
        out.print(
            f"  {v['name']:<6} {v['guest_ip']:<15} host {v['primary_host']:<6} "
            f"{v['replication_port']:<10} {metrics}"
        )
    out.print("")
    out.print("start the witness, then each VM's standby before its primary:")
    out.print(f"  {witness}")
    for v in vms:
        out.print(f"  {v['commands']['secondary']}")
        out.print(f"  {v['commands']['primary']}")
    out.print("take the lab down, agents included:")
    out.print(f"  {down}")


#: The host lab's tbf profile under each kernel-lab profile (``wan`` is rated by netem).
KERNEL_LAB_TBF = {"1g": "1g", "10g": "10g", "wan": "1g", "unlimited": "unlimited"}


def _kernel_up(
    lab_id: str, profile: str, config: Path | None, *, ssh: bool, json_out: bool
) -> None:
    """``lab up --kernel``: start the supervisor, wait with a live status line."""
    from kemari_suite import lab
    from kemari_suite.klab import standing
    from kemari_suite.klab.netem import get_profile

    cfg = _load(config)
    guard(lambda: standing.validate_id(lab_id))
    guard(lambda: get_profile(profile))
    # The host lab's namespaces first: the L1s' link crosses its shaped veth pair.
    lay = guard(lambda: lab.up(lab_id, KERNEL_LAB_TBF.get(profile, "1g"), paths=cfg.paths))
    kw: dict[str, Any] = {
        "profile": profile,
        "config": config,
        "namespaces": (lay.ns_primary, lay.ns_secondary),
        "link_ips": (lay.repl_primary_ip, lay.repl_secondary_ip),
        "ssh_addresses": (lay.lan_primary_ip, lay.lan_secondary_ip),
        "ssh": ssh,
    }

    def start() -> standing.StandingStatus:
        if json_out:
            return standing.up(cfg.paths, lab_id, **kw)
        with err.status(f"kernel lab {lab_id}: starting") as st:
            return standing.up(cfg.paths, lab_id, progress=st.update, **kw)

    try:
        res = guard(start)
    except typer.Exit:
        guard(lambda: lab.down(lab_id, paths=cfg.paths))
        raise
    if json_out:
        print(json.dumps(res.as_dict()))
        return
    _show_kernel(res)
    if res.ssh_dir and res.hosts and res.hosts[0].ssh:
        from kemari_suite.klab.sshd import ssh_command

        address, port = res.hosts[0].ssh
        login = shlex.join(ssh_command(Path(res.ssh_dir), address, port))
        out.print(f"log in to l1a:           ip netns exec {lay.ns_client} {login}")
    out.print(f"run a command in an L1:  kemari klab exec --id {lab_id} --host l1a -- uname -a")
    out.print(f"take it down:            kemari lab down --kernel --id {lab_id}")


def _kernel_status(lab_id: str, config: Path | None, *, json_out: bool) -> None:
    from kemari_suite.klab import standing

    cfg = _load(config)
    res = guard(lambda: standing.status(cfg.paths, lab_id))
    if json_out:
        print(json.dumps(res.as_dict()))
    else:
        _show_kernel(res)
    if not res.ok:
        raise typer.Exit(1)


def _show_kernel(res: Any) -> None:
    if res.state == "absent":
        out.print(f"no kernel lab {res.lab_id} (looked for {res.state_file})")
        return
    out.print(
        f"kernel lab {res.lab_id}: {res.state}, link profile {res.profile} (netem in the "
        f"L1s), supervisor PID {res.supervisor_pid}"
    )
    if res.namespaces:
        out.print(f"  namespaces {', '.join(res.namespaces)} (the host lab's tbf on the link)")
    if res.error:
        out.print(f"  error: {res.error}")
    for h in res.hosts:
        answer = {True: "agent answers", False: "agent silent", None: "-"}[h.answered]
        link = ", ".join(f"{k} {v}" for k, v in h.qdisc.items()) or "no netem"
        alive = "running" if h.alive else "gone"
        ssh = f", sshd at {h.ssh[0]}:{h.ssh[1]}" if h.ssh else ""
        out.print(
            f"  {h.name:<4} QEMU PID {h.pid} {alive}, {answer}, {h.kernel or '?'}, {link}{ssh}"
        )


def _kernel_down(lab_id: str, config: Path | None, *, json_out: bool) -> None:
    from kemari_suite import lab
    from kemari_suite.klab import standing

    cfg = _load(config)
    res = guard(lambda: standing.down(cfg.paths, lab_id))
    # Then the host lab the L1s ran in (its namespaces, its files).
    if lab_id in lab.list_labs():
        guard(lambda: lab.down(lab_id))
    if json_out:
        print(json.dumps(dataclasses.asdict(res)))
    elif not res.found:
        out.print(f"no kernel lab {lab_id}: nothing to remove")
    else:
        killed = f"; SIGKILL to QEMU PIDs {res.killed}" if res.killed else ""
        out.print(f"kernel lab {lab_id} removed{killed}")


def _load(path: Path | None) -> KemariConfig:
    return guard(lambda: configmod.load(path))


def _registry_file(lab_id: str) -> Path:
    from kemari_suite.lab import registry

    return registry.registry_file(lab_id)


def _options(cfg: KemariConfig, c: _VMChoices) -> PairOptions:
    """PairOptions from the base config and the command's options.

    Raises:
        ConfigError: a bad option (a missing prebuilt kernel, an unknown disk kind).
    """
    from kemari_suite.lab import configs as labconfigs

    image = _image(cfg.image, c)
    stock = not (image.add or image.init or image.kernel or image.initrd)
    run = c.run if c.run is not None else (labconfigs.DEFAULT_WORKLOAD if stock else "")
    if c.disk not in ("none", "builtin", "shared"):
        raise ConfigError(f"{c.disk!r}: expected builtin, shared or none", key="--disk")
    return dataclasses.replace(
        labconfigs.options_from_config(cfg),
        vm_name=c.name,
        memory_mib=c.memory,
        vcpus=c.vcpus,
        workload=run,
        tapped_net=c.output_commit,
        disk="" if c.disk == "none" else c.disk,
        disk_mib=c.disk_mib,
        image=image,
    )


def _image(base: ImageConfig, c: _VMChoices) -> ImageConfig:
    """The base config's image with the command's --add/--init/--guest-kernel/--guest-initrd,
    paths
    made absolute (the agents may start anywhere)."""
    image = base
    if c.add:
        adds = []
        for spec in c.add:
            src, sep, dest = spec.rpartition(":")
            if not sep or not src:
                raise ConfigError(f"{spec!r}: expected SRC:DEST", key="--add")
            adds.append(f"{Path(src).absolute()}:{dest}")
        image = dataclasses.replace(image, add=tuple(adds))
    if c.init is not None:
        image = dataclasses.replace(image, init=c.init)
    if c.kernel is not None or c.initrd is not None:
        for flag, value in (("--guest-kernel", c.kernel), ("--guest-initrd", c.initrd)):
            if value is None or not value.is_file():
                raise ConfigError(
                    f"{value} is not a file (give both --guest-kernel and --guest-initrd)", key=flag
                )
        assert c.kernel is not None and c.initrd is not None
        image = dataclasses.replace(
            image, kernel=str(c.kernel.absolute()), initrd=str(c.initrd.absolute())
        )
    return image


def _kemari_prog() -> tuple[str, ...]:
    """How to call this very ``kemari``: its name when PATH finds this one, else its
    path, else through the interpreter."""
    me = Path(sys.argv[0]).absolute()
    if me.name == "kemari" and me.is_file():
        found = shutil.which("kemari")
        if found is not None and Path(found).absolute() == me:
            return ("kemari",)
        return (str(me),)
    return (sys.executable, "-m", "kemari_suite.cli.main")


def _show_configs(
    lay: LabLayout, written: LabConfigs, opts: PairOptions, *, json_out: bool, created: bool
) -> None:
    prog = _kemari_prog()
    kemari = shlex.join(prog)
    status_cmds = {
        role: f"{kemari} status -c {shlex.quote(str(written.configs[role]))}"
        for role in ("primary", "secondary")
    }
    if json_out:
        print(
            json.dumps(
                {
                    "lab_id": lay.lab_id,
                    "profile": lay.profile.name,
                    "namespaces": {r: lay.ns_for(r) for r in ("primary", "secondary", "client")},
                    "replication": {r: lay.repl_ip_for(r) for r in ("primary", "secondary")},
                    "lan": {r: lay.lan_ip_for(r) for r in ("primary", "secondary", "client")},
                    "guest_ip": lay.guest_ip,
                    "taps": {r: lay.tap_for(r) for r in ("primary", "secondary")},
                    "ports": [dataclasses.asdict(p) for p in written.ports],
                    "directory": str(written.directory),
                    "configs": {r: str(p) for r, p in written.configs.items()},
                    "env_file": str(written.env_file),
                    "commands": {x.role: x.shell(prog) for x in written.launches},
                    "status": status_cmds,
                    "down": f"{kemari} lab down --id {lay.lab_id}",
                }
            )
        )
        return
    p = lay.profile
    rate = f"{p.rate_bit / 1e9:g} Gbit/s" if p.rate_bit else "unshaped"
    link = f"profile {p.name}: replication link {rate}, MTU {p.mtu}"
    out.print(f"lab {lay.lab_id} is up ({link})" if created else f"lab {lay.lab_id} ({link})")
    rows = [("", "namespace", "replication", "LAN", "TAP")]
    for role in ("primary", "secondary"):
        repl = f"{lay.repl_ip_for(role)}/{lay.repl_prefix}"
        lan = f"{lay.lan_ip_for(role)}/{lay.lan_prefix}"
        rows.append((role, lay.ns_for(role), repl, lan, lay.tap_for(role)))
    rows.append(("client", lay.ns_client, "-", f"{lay.lan_client_ip}/{lay.lan_prefix}", "-"))
    rows.append(("guest", "(the VM)", "-", f"{lay.guest_ip}/{lay.lan_prefix}", "-"))
    for row in rows:
        out.print("  {:<10} {:<14} {:<18} {:<16} {}".format(*row).rstrip())
    out.print("")
    out.print("ports (TCP):")
    for port in written.ports:
        where = "" if port.address == lay.guest_ip else f" (in {port.namespace})"
        out.print(f"  {port.address + ':' + str(port.port):<20} {port.what}{where}")
    out.print("")
    vm = f'the VM "{opts.vm_name}" ({opts.memory_mib} MiB'
    vm += ", output commit)" if opts.tapped_net else ")"
    out.print(f"configs for {vm} in {written.directory}:")
    names = [p.name for p in written.configs.values()] + [written.env_file.name]
    out.print("  " + "  ".join(names))
    out.print("")
    out.print("start the agents in this order, each in a terminal of its own:")
    for launch in written.launches:
        if launch.role == "primary":
            out.print(f"  # once `{status_cmds['secondary']}` answers:")
        out.print(f"  {launch.shell(prog)}")
    out.print("watch them:")
    for cmd in status_cmds.values():
        out.print(f"  {cmd}")
    out.print("take the lab down, agents included:")
    out.print(f"  {kemari} lab down --id {lay.lab_id}")


def _show_status(st: LabStatus) -> None:
    if not st.exists:
        out.print(f"no lab {st.lab_id}")
        out.print("looked in:")
        for path in st.looked_in:
            out.print(f"  {path}")
        if st.registry_file is not None:
            out.print(f"stale registry entry {st.registry_file}: `kemari lab down` removes it")
        return
    state = "complete" if st.complete else "incomplete"
    out.print(f"lab {st.lab_id}: {state}, profile {st.profile or '?'}")
    out.print(f"  namespaces  {', '.join(st.namespaces)}")
    if st.registry_file is not None:
        out.print(f"  registry    {st.registry_file}")
        out.print(f"  files in    {st.run_dir} and {st.shm_dir} (kemari-{st.lab_id}-*)")
    else:
        out.print("  registry    none (made by an older version?)")
    out.print(f"  state file  {st.state_file or 'none found'}")
    lay = st.layout
    if lay is not None:
        out.print(f"  guest       {lay.guest_ip} (reach it from {lay.ns_client})")
    out.print(f"  {'namespace':<14} {'interface':<13} {'kind':<7} {'state':<10} addresses, shaping")
    for link in st.links:
        state = "down" if not link.admin_up else ("up" if link.carrier else "no-carrier")
        extra = list(link.addresses)
        if link.master:
            extra.append(f"in {link.master}")
        if link.rate_bit:
            extra.append(f"tbf {link.rate_bit / 1e9:g} Gbit/s")
        kind = link.kind or "-"
        out.print(f"  {link.ns:<14} {link.name:<13} {kind:<7} {state:<10} {', '.join(extra)}")
    for problem in st.problems:
        err.print(f"problem: {problem}")


__all__ = ["app"]
