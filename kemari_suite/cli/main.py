"""The ``kemari`` command: the only place that prints or exits.

Errors from the library arrive as :class:`KemariError` and leave as one red line and
exit code 2; anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from kemari_suite import config as configmod
from kemari_suite.cli.common import guard
from kemari_suite.config import KemariConfig

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
image_app = typer.Typer(no_args_is_help=True, help="Build guest images.")
app.add_typer(image_app, name="image")
from kemari_suite.cli.lab import app as lab_app  # noqa: E402

app.add_typer(lab_app, name="lab")
from kemari_suite.cli.klab import app as klab_app  # noqa: E402

app.add_typer(klab_app, name="klab")
from kemari_suite.cli import deploy as deploy_cli  # noqa: E402
from kemari_suite.cli import remote as remote_cli  # noqa: E402

app.add_typer(deploy_cli.app, name="deploy")
app.add_typer(remote_cli.app, name="remote")
from kemari_suite.cli.vm import app as vm_app  # noqa: E402

app.add_typer(vm_app, name="vm")
disk_app = typer.Typer(no_args_is_help=True, help="Guest disk copies.")
app.add_typer(disk_app, name="disk")
bench_app = typer.Typer(
    help="Benchmarks that report figures. Without a subcommand: the lmbench/IOzone suite.",
    invoke_without_command=True,
)
app.add_typer(bench_app, name="bench")
from kemari_suite.cli import check as check_cli  # noqa: E402
from kemari_suite.cli.key import app as key_app  # noqa: E402
from kemari_suite.cli.release import release as release_cmd  # noqa: E402

app.command("check")(check_cli.check)
app.command("release")(release_cmd)
app.add_typer(key_app, name="key")


@bench_app.callback()
def bench_suite(
    ctx: typer.Context,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="TOML config.")] = None,
    quick: Annotated[bool, typer.Option(help="A short run (about 10 minutes here).")] = False,
    scenarios: Annotated[
        list[str] | None, typer.Option("--scenarios", help="Scenario names (repeatable).")
    ] = None,
    out_dir: Annotated[Path, typer.Option("-o", "--out", help="Output folder.")] = Path(
        "benchmarks/results/suite"
    ),
    json_out: Annotated[bool, typer.Option("--json", help="Last line: one JSON object.")] = False,
) -> None:
    """The lmbench- and IOzone-style comparison of Base and Kemari scenarios."""
    if ctx.invoked_subcommand is not None:
        return
    from kemari_suite.cli.benchsuite import suite_command

    suite_command(config, quick, scenarios, out_dir, json_out)


out = Console()
err = Console(stderr=True)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="TOML config file (defaults if omitted).")
]


def _int_list(option: str, text: str) -> list[int]:
    """Comma-separated integers given to ``option`` (empty items are skipped); exits 2,
    naming the option, when an item is not an integer."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        err.print(f"[bold red]error:[/] {option}: not a list of numbers: {text!r}")
        raise typer.Exit(2) from None


def _load(path: Path | None) -> KemariConfig:
    return guard(lambda: configmod.load(path))


# ---- image ---------------------------------------------------------------------------


@image_app.command("build")
def image_build(
    config: ConfigOpt = None,
    kernel_package: Annotated[
        str | None, typer.Option(help="Debian kernel package (default from config).")
    ] = None,
    add: Annotated[
        list[str] | None, typer.Option("--add", help="Extra file SRC:DEST (repeatable).")
    ] = None,
    init: Annotated[str | None, typer.Option(help="Command the guest's init runs.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Build the guest kernel and initramfs (cached by a hash of the inputs)."""
    from kemari_suite.vm.image import build_image

    cfg = _load(config)
    pkg = kernel_package or cfg.image.kernel_package
    adds = tuple(add or cfg.image.add)
    init_cmd = init if init is not None else cfg.image.init

    def run() -> Any:
        with err.status("building the guest image") as status:
            return build_image(
                cfg.paths.cache_dir,
                kernel_package=pkg,
                add=adds,
                init=init_cmd,
                progress=lambda m: status.update(m),
            )

    img = guard(run)
    from kemari_suite.vm.lastbuild import record_last_build

    guard(lambda: record_last_build(cfg.paths.cache_dir, img))
    info = {
        "kernel": str(img.kernel),
        "initrd": str(img.initrd),
        "kernel_version": img.kernel_version,
        "key": img.key,
        "cached": img.cached,
    }
    if json_out:
        out.print_json(json.dumps(info))
    else:
        word = "cached" if img.cached else "built"
        out.print(
            f"{word}: kernel {img.kernel_version} (image {img.key})\n  {img.kernel}\n  {img.initrd}"
        )


# ---- agents --------------------------------------------------------------------------


def _run_async(coro: Any) -> Any:
    return guard(lambda: asyncio.run(coro))


VMDefOpt = Annotated[
    Path | None,
    typer.Option("--vm", help="A VM definition (TOML, see docs/vm-definition.md)."),
]
HostOpt = Annotated[
    str, typer.Option("--host", help="This host's name in the VM definition's [hosts].")
]


def _node_setup(config: Path | None, vm: Path | None, host: str) -> tuple[Any, Any]:
    """The config and (with ``--vm``) the QEMU spec this host runs; errors exit 2.

    Sets the owner-only umask first: every file the agent and its QEMU create (guest
    RAM, replica, captures, logs) is readable by its owner alone."""
    from kemari_suite.protocol.files import set_owner_only_umask

    set_owner_only_umask()
    if vm is None:
        return _load(config), None
    if config is not None:
        err.print("[bold red]error:[/] give either --config or --vm, not both")
        raise typer.Exit(2)
    if not host:
        err.print("[bold red]error:[/] --vm needs --host (this host's name in [hosts])")
        raise typer.Exit(2)
    from kemari_suite.vm.vmdef import load_vmdef

    view = guard(lambda: load_vmdef(vm, host=host).for_host(host))
    return view.config, view.spec


@app.command()
def protect(config: ConfigOpt = None, vm: VMDefOpt = None, host: HostOpt = "") -> None:
    """Run the primary: boot the VM and replicate it to the secondary."""
    from kemari_suite.node import run_primary

    cfg, spec = _node_setup(config, vm, host)
    _run_async(run_primary(cfg, **({"node_id": host, "spec": spec} if spec else {})))


@app.command()
def standby(config: ConfigOpt = None, vm: VMDefOpt = None, host: HostOpt = "") -> None:
    """Run the secondary: hold the replica, fail over when the primary is lost."""
    from kemari_suite.node import run_secondary

    cfg, spec = _node_setup(config, vm, host)
    _run_async(run_secondary(cfg, **({"node_id": host, "spec": spec} if spec else {})))


@app.command()
def witness(
    config: ConfigOpt = None,
    listen: Annotated[
        str | None,
        typer.Option(help="host:port to listen on (default: witness.listen in the config)."),
    ] = None,
) -> None:
    """Run the witness, the tiebreaker both hosts reach over the LAN."""
    from kemari_suite.protocol.files import set_owner_only_umask

    set_owner_only_umask()
    cfg = _load(config)
    address = listen or cfg.witness.listen
    if not address:
        err.print(
            "[bold red]error:[/] the witness needs an address to listen on: set "
            "\\[witness] listen in the config or pass --listen host:port"
        )
        raise typer.Exit(2)
    _run_async(_serve_witness(cfg, address))


async def _serve_witness(cfg: KemariConfig, address: str) -> None:
    """Serve leases until SIGTERM or SIGINT."""
    import signal

    from kemari_suite.ha.witness import server_from_config

    server = server_from_config(cfg, address)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await server.start()
    try:
        await stop.wait()
    finally:
        await server.close()


def _control(config: Path | None, cmd: str, *, timeout: float = 30.0, **args: Any) -> Any:
    from kemari_suite.node import control_path
    from kemari_suite.service import control

    cfg = _load(config)
    return guard(lambda: control.request(control_path(cfg), cmd, timeout=timeout, **args))


@app.command()
def status(
    config: ConfigOpt = None,
    json_out: Annotated[bool, typer.Option("--json")] = False,
    wait: Annotated[
        list[str] | None,
        typer.Option(
            "--wait",
            help="Wait until the agent is in this state (repeatable, or comma-separated: "
            "any of them); an agent not answering yet is waited for too.",
        ),
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds --wait waits (then exit 1).")] = 120.0,
    all_vms: Annotated[
        bool,
        typer.Option(
            "--all",
            help="Every agent on this host: the VMs of /etc/kemari/vms/*.toml, "
            "/etc/kemari/kemari.toml, -c CONFIG, and every control socket in their run "
            "dirs (with --json: a list, one object per VM).",
        ),
    ] = False,
) -> None:
    """Show the live state of the agent on this host (or wait for one, or list all)."""
    if all_vms:
        from kemari_suite.cli import statusall

        extra = [config] if config is not None else []
        statusall.show(out, [*extra, *statusall.config_files()], json_out=json_out)
        return
    wanted = {w.strip() for item in wait or () for w in item.split(",") if w.strip()}
    st = _wait_status(config, wanted, timeout) if wanted else _control(config, "status")
    if json_out:
        out.print_json(json.dumps(st, default=str))
    else:
        t = Table(show_header=False)
        for k, v in st.items():
            t.add_row(str(k), _human(str(k), v, now=time.time()))
        out.print(t)
    if wanted and st.get("state") not in wanted:
        err.print(
            f"[bold red]error:[/] still {st.get('state')!r} after {timeout:g} s, "
            f"not {' or '.join(sorted(wanted))}",
            highlight=False,
        )
        raise typer.Exit(1)


def _wait_status(config: Path | None, wanted: set[str], timeout: float) -> dict[str, Any]:
    """Poll the agent until its state is in ``wanted`` or ``timeout`` passes; returns the
    last status (an agent that never answered exits 2 with the reason)."""
    from kemari_suite.errors import KemariError
    from kemari_suite.node import control_path
    from kemari_suite.service import control

    path = control_path(_load(config))
    deadline = time.monotonic() + timeout
    last: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        with contextlib.suppress(KemariError):
            last = control.request(path, "status", timeout=5.0)
            if last is not None and last.get("state") in wanted:
                return last
        time.sleep(0.25)
    if last is None:
        # Once more, to say why it does not answer.
        last = guard(lambda: control.request(path, "status", timeout=5.0))
    assert last is not None
    return last


#: Status and demo values that are wall-clock times (seconds since the epoch).
_WALL_CLOCK = {"since", "at", "t", "detected_at", "t_wall", "stopped_at"}


def _human(key: str, value: Any, *, now: float | None = None, nested: bool = False) -> str:
    """A value for a human table: units from the key's suffix, sensible precision (JSON
    output keeps the full values). A table is one line per key; deeper ones inline."""
    if value is None or value == [] or value == {}:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float) and key in _WALL_CLOCK:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(value)))
        return stamp if now is None else f"{stamp} ({now - float(value):.0f} s ago)"
    unit = next((u for u in key.split("_") if u in ("ms", "s", "mib")), None)
    if isinstance(value, float):
        if unit == "ms":
            return f"{value:.1f} ms"
        if unit == "s":
            return f"{value:.2f} s"
        return f"{value:.4g}"
    if isinstance(value, int) and unit is not None:
        return f"{value} {'MiB' if unit == 'mib' else unit}"
    if isinstance(value, int) and key.endswith("_bytes") and value >= 1 << 20:
        return f"{value / (1 << 20):.1f} MiB"
    if isinstance(value, dict):
        items = [f"{k} {_human(str(k), v, nested=True)}" for k, v in value.items()]
        return ", ".join(items) if nested else "\n".join(items)
    if isinstance(value, list):
        last = value[-1]
        if isinstance(last, dict):
            brief = ": ".join(str(last[k]) for k in ("kind", "reason") if last.get(k))
            return f"{len(value)}; the last: {brief or _human(key, last, nested=True)}"
        return ", ".join(_human(key, v, nested=True) for v in value)
    return str(value)


@app.command()
def checkpoint(config: ConfigOpt = None) -> None:
    """Take a sync point now and wait for its acknowledgement."""
    res = _control(config, "checkpoint")
    out.print(f"epoch {res['epoch']} committed on the secondary")


@app.command()
def failover(
    config: ConfigOpt = None,
    yes: Annotated[
        bool, typer.Option("--yes", help="Confirm that the primary is really down.")
    ] = False,
    accept_data_loss: Annotated[
        bool,
        typer.Option(
            "--accept-data-loss",
            help="Resume this copy even when the tiebreaker says it is stale (the primary "
            "ran alone after its last checkpoint); raises an alert.",
        ),
    ] = False,
) -> None:
    """Resume the VM on this (secondary) host from the last committed checkpoint.

    The secondary first asks the tiebreaker whether its copy is stale and refuses it
    unless --accept-data-loss is given."""
    if not yes:
        err.print(
            "[bold red]error:[/] a manual failover with a live primary runs two guests; "
            "make sure the primary is down, then add --yes"
        )
        raise typer.Exit(2)
    res = _control(config, "failover", accept_data_loss=accept_data_loss)
    out.print_json(json.dumps(res, default=str))


@app.command()
def switchover(
    config: ConfigOpt = None, json_out: Annotated[bool, typer.Option("--json")] = False
) -> None:
    """Planned switchover: move the VM to the standby with no data loss; this host
    (the primary) becomes the standby. Run it again on the other host to fail back."""
    res = _control(config, "switchover", timeout=120.0)
    if json_out:
        out.print_json(json.dumps(res, default=str))
        return
    out.print(
        f"the VM runs on the peer from epoch {res['epoch']}; guest pause "
        f"{res['pause_ms']:.0f} ms; this host is the standby now"
    )


# ---- disk ----------------------------------------------------------------------------


@disk_app.command("checksums")
def disk_checksums(
    image: Annotated[Path, typer.Argument(help="Disk image or device.")],
    offset: Annotated[int, typer.Option(help="Where the guest disk starts.")] = 0,
) -> None:
    """Print block checksums of a disk copy as JSON (to compare on another host)."""
    from kemari_suite.disk.verify import checksums

    print(guard(lambda: checksums(image, offset=offset)).to_json())


@disk_app.command("verify")
def disk_verify(
    image: Annotated[Path, typer.Argument(help="This host's disk image or device.")],
    against: Annotated[
        str, typer.Option(help="The other copy: an image path or a checksums .json file.")
    ],
    offset: Annotated[int, typer.Option(help="Where the guest disk starts.")] = 0,
) -> None:
    """Compare two copies of a guest disk by block checksums; exit 1 if they differ."""
    from kemari_suite.disk.verify import checksums, compare, load_or_compute

    res = guard(
        lambda: compare(checksums(image, offset=offset), load_or_compute(against, offset=offset))
    )
    if res.same:
        out.print(f"[green]identical[/]: {res.blocks} blocks of {res.block} bytes")
        return
    shown = ", ".join(str(b) for b in res.differing[:20])
    more = "" if len(res.differing) <= 20 else f" (+{len(res.differing) - 20} more)"
    err.print(
        f"[bold red]copies differ[/]: {len(res.differing)} of {res.blocks} blocks "
        f"({res.block} bytes each): {shown}{more}; sizes {res.size_a} and {res.size_b}"
    )
    raise typer.Exit(1)


@app.command("fence-peer")
def fence_peer(
    config: ConfigOpt = None,
    resource: Annotated[str, typer.Option(help="DRBD resource (from the handler).")] = "",
    node: Annotated[
        str,
        typer.Option(
            help="This host's id at the tiebreaker (default: the agents' own, from the "
            "config: replication.node_id, else the address of replication.listen)."
        ),
    ] = "",
) -> None:
    """DRBD fence-peer handler: exit 7 if we keep the lease, 6 if the peer has it."""
    from kemari_suite.ha.fence import fence_peer as run_fence
    from kemari_suite.ha.tiebreak import node_identity

    cfg = _load(config)
    code, reason = guard(lambda: run_fence(cfg, node or node_identity(cfg)))
    err.print(f"fence-peer {resource or '-'}: {reason}", highlight=False)
    raise typer.Exit(code)


# ---- benchmarks ----------------------------------------------------------------------


@bench_app.command("memsync")
def bench_memsync(
    config: ConfigOpt = None,
    profile: Annotated[
        list[str] | None, typer.Option(help="Link profiles (repeatable; default 1g and 10g).")
    ] = None,
    window: Annotated[float, typer.Option(help="Seconds measured per phase.")] = 10.0,
    out_dir: Annotated[Path, typer.Option("--out", help="Results folder.")] = Path(
        "benchmarks/results"
    ),
) -> None:
    """Sync-point pause, throughput, bytes per page and failover time, against a floor
    and an unprotected baseline measured in the same run."""
    from kemari_suite.bench import memsync

    cfg = _load(config)
    profiles = profile or ["1g", "10g"]
    results = []
    for prof in profiles:
        with err.status(f"memsync benchmark, {prof}") as st:

            def say(msg: str) -> None:
                st.update(msg)
                out.print(f"[dim]•[/] {msg}", highlight=False)

            results.append(
                guard(lambda: memsync.run(cfg, profile=prof, window=window, progress=say))  # noqa: B023
            )
    command = "kemari bench memsync " + " ".join(sys.argv[3:])
    md = memsync.write_results(results, out_dir, command.strip())
    out.print(md.read_text())


@bench_app.command("latency")
def bench_latency(
    config: ConfigOpt = None,
    requests: Annotated[int, typer.Option(help="Requests per run.")] = 200,
    profile: Annotated[str, typer.Option(help="Link profile.")] = "10g",
    out_dir: Annotated[Path, typer.Option("--out", help="Results folder.")] = Path(
        "benchmarks/results"
    ),
) -> None:
    """Added request/response latency of a small TCP service: Kemari vs Remus policy."""
    from kemari_suite.bench import latency

    cfg = _load(config)
    with err.status("latency") as st:
        res = guard(
            lambda: latency.run(cfg, requests=requests, profile=profile, progress=st.update)
        )
    command = "kemari bench latency " + " ".join(sys.argv[3:])
    md = latency.write_results(res, out_dir, command.strip())
    out.print(md.read_text())


@bench_app.command("interval")
def bench_interval(
    config: ConfigOpt = None,
    intervals: Annotated[
        str, typer.Option(help="Values of replication.max_interval_ms to run, comma-separated.")
    ] = "100,250,500,1000",
    quick: Annotated[bool, typer.Option(help="The suite's short preset.")] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Last stdout line: the sweep's summary as JSON.")
    ] = False,
    out_dir: Annotated[Path, typer.Option("-o", "--out", help="Results folder.")] = Path(
        "benchmarks/results/interval"
    ),
    report_only: Annotated[
        bool, typer.Option("--report-only", help="Summarize the run recorded in --out again.")
    ] = False,
) -> None:
    """Choose the sync interval bound by measurement: lmbench ratios, sync points/s and
    the stopped share of the default Kemari row at each interval, beside Base."""
    from kemari_suite.bench import interval
    from kemari_suite.bench.suite import SuiteProgress

    if report_only:
        summary, md = guard(lambda: interval.report_again(out_dir))
        out.print(md.read_text())
        if as_json:
            print(json.dumps(summary))
        return

    values = _int_list("--intervals", intervals)
    cfg = _load(config)
    command = ("kemari bench interval " + " ".join(sys.argv[3:])).strip()
    with err.status("interval sweep") as st:

        def progress(p: SuiteProgress) -> None:
            st.update(f"{p.message} ({100 * p.done / max(p.total, 1):.0f}%)")

        summary, md = guard(
            lambda: interval.run_sweep(
                cfg,
                intervals=values,
                quick=quick,
                out_dir=out_dir,
                command=command,
                progress=progress,
            )
        )
    if as_json:
        err.print(md.read_text())
        print(json.dumps(summary))  # one line: the interface
    else:
        out.print(md.read_text())


@bench_app.command("floor")
def bench_floor(
    config: ConfigOpt = None,
    samples: Annotated[int, typer.Option(help="Sync points to time.")] = 100,
) -> None:
    """The floor of a compare-tracked sync point: stop + full scan + device state + cont."""
    from kemari_suite.bench import memsync

    cfg = _load(config)
    with err.status("floor") as st:
        res = guard(lambda: memsync.run_floor(cfg, samples=samples, progress=st.update))
    out.print_json(json.dumps(res))


@bench_app.command("multivm")
def bench_multivm(
    config: ConfigOpt = None,
    window: Annotated[float, typer.Option(help="Seconds of each measurement window.")] = 10.0,
    profile: Annotated[str, typer.Option(help="Replication link profile: 1g or 10g.")] = "1g",
    as_json: Annotated[
        bool, typer.Option("--json", help="Last stdout line: the figures as one JSON object.")
    ] = False,
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Write multivm.json and multivm.md in this folder."),
    ] = None,
) -> None:
    """Four VMs protected on one pair against each alone, in one run: pause p50 and
    throughput ratios (at most 1.2), then the loss of the host holding most of them."""
    from kemari_suite.bench import multivm

    if os.geteuid() != 0:
        err.print("[bold red]error:[/] the benchmark creates network namespaces: run it as root")
        raise typer.Exit(2)
    cfg = _load(config)
    with err.status("multivm") as st:

        def say(msg: str) -> None:
            st.update(msg)
            err.print(f"[dim]•[/] {msg}", highlight=False)

        res = guard(lambda: multivm.run(cfg, window_s=window, profile=profile, progress=say))
    if out_dir is not None:
        report = multivm.write_report(res, out_dir, " ".join(["kemari", *sys.argv[1:]]))
        err.print(f"report: {report}")
    if as_json:
        print(json.dumps(res.to_dict()))
    else:
        t = Table(title=f"{len(res.vms)} VMs on one pair vs each alone (bound {res.bound}x)")
        for col in ("vm", "pause p50 alone", "together", "ratio", "throughput ratio", "ok"):
            t.add_column(col)
        for f in res.vms:
            p50s = [w.pause_ms_p50 for w in (f.alone, f.together)]
            t.add_row(
                f.name,
                *("-" if v is None else f"{v:.1f} ms" for v in p50s),
                str(f.pause_ratio),
                str(f.throughput_ratio),
                str(f.ok),
            )
        out.print(t)
    if not res.ok:
        raise typer.Exit(1)


@bench_app.command("sizing")
def bench_sizing(
    config: ConfigOpt = None,
    sizes: Annotated[
        str, typer.Option(help="Compare-scan sizes (no VM), MiB, comma-separated.")
    ] = "128,256,512,1024",
    vm_sizes: Annotated[
        str | None, typer.Option(help="Sizes that boot a compare-tracker guest ('' none).")
    ] = None,
    samples: Annotated[int, typer.Option(help="Scans per size and dirty case.")] = 20,
    vm_samples: Annotated[int, typer.Option(help="Sync points timed per VM.")] = 30,
    vm_budget: Annotated[float, typer.Option(help="Seconds allowed for the VM part.")] = 300.0,
    tracker_sizes: Annotated[
        str, typer.Option(help="Guest sizes (MiB) at which every tracker is timed.")
    ] = "128,1024,4096",
    tracker_samples: Annotated[int, typer.Option(help="Sync points per tracker and size.")] = 30,
    quick: Annotated[
        bool,
        typer.Option(
            "--quick", help="Only the trackers, at 128 MiB and 4 GiB, 15 sync points each."
        ),
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Last stdout line: the trackers' summary as JSON.")
    ] = False,
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--out", help="Results folder (default benchmarks/results; none with --quick)."
        ),
    ] = None,
) -> None:
    """Sync-point pause and primary memory per tracker and guest RAM size, side by side,
    and the compare tracker's cost per GiB."""
    from kemari_suite.bench import sizing, trackers

    def ints(text: str) -> list[int]:
        return [int(x) for x in text.split(",") if x.strip()]

    cfg = _load(config)
    command = ("kemari bench sizing " + " ".join(sys.argv[3:])).strip()
    if out_dir is None and not quick:
        out_dir = Path("benchmarks/results")
    with err.status("sizing") as st:
        md, res = guard(
            lambda: sizing.bench_sizing_command(
                cfg,
                sizes_mib=() if quick else ints(sizes),
                vm_sizes_mib=() if quick else None if vm_sizes is None else ints(vm_sizes),
                samples=samples,
                vm_samples=vm_samples,
                vm_budget_s=vm_budget,
                tracker_sizes_mib=trackers.QUICK_SIZES_MIB if quick else ints(tracker_sizes),
                tracker_samples=15 if quick else tracker_samples,
                out_dir=out_dir,
                command=command,
                progress=st.update,
            )
        )
    if as_json:
        if md is not None:
            err.print(md.read_text())
        print(json.dumps(trackers.summary(res["trackers"])))  # one line: the interface
    elif md is not None:
        out.print(md.read_text())
    else:
        out.print(trackers.format_section(res["trackers"]))


@bench_app.command("service")
def bench_service(
    config: ConfigOpt = None,
    kills: Annotated[int, typer.Option(help="Random kills of the host running the VM.")] = 10,
    seconds: Annotated[
        float, typer.Option(help="Each throughput measurement, unprotected and protected.")
    ] = 20.0,
    clients: Annotated[
        str, typer.Option(help="Concurrent writers of the throughput phases, comma-separated.")
    ] = "4,16,64",
    soak_minutes: Annotated[
        float, typer.Option(help="Protected under load with no fault; false failovers counted.")
    ] = 0.0,
    profile: Annotated[str, typer.Option(help="Replication link profile: 1g or 10g.")] = "10g",
    quick: Annotated[
        bool,
        typer.Option("--quick", help="2 kills, 8 s per measurement, no soak, no result files."),
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Last stdout line: the figures as one JSON object.")
    ] = False,
    output: Annotated[
        Path | None,
        typer.Option("-o", help="Results folder (default benchmarks/results; none with --quick)."),
    ] = None,
) -> None:
    """nginx in a Debian guest through random kills: throughput protected vs
    unprotected by client count, failover outage, switchovers, an optional soak, and
    every stored record checked (benchmarks/results/service.md)."""
    from kemari_suite.bench import service

    counts = _int_list("--clients", clients)
    if quick:
        kills, seconds, soak_minutes = min(kills, 2), min(seconds, 8.0), 0.0
    if output is None and not quick:
        output = Path("benchmarks/results")
    cfg = _load(config)
    with err.status("service") as st:

        def say(msg: str) -> None:
            st.update(msg)
            err.print(f"[dim]{time.strftime('%H:%M:%S')}[/] {msg}")

        res = guard(
            lambda: service.run(
                cfg,
                kills=kills,
                measure_s=seconds,
                clients=counts,
                soak_s=soak_minutes * 60,
                profile=profile,
                progress=say,
            )
        )
    if output is not None:
        md = service.write_results(res, output, "kemari " + " ".join(sys.argv[1:]))
        err.print(f"results: {md}")
    if as_json:
        print(json.dumps(service.summary(res)))  # one line: the interface
    else:
        out.print_json(json.dumps(service.summary(res)))
    if not res["ok"]:
        raise typer.Exit(1)


# ---- demo ----------------------------------------------------------------------------


@app.command()
def demo(
    config: ConfigOpt = None,
    profile: Annotated[str, typer.Option(help="Link profile: 1g, 10g or unlimited.")] = "1g",
    json_out: Annotated[
        bool, typer.Option("--json", help="Print one JSON object with the results.")
    ] = False,
    seconds: Annotated[float, typer.Option(help="How long the protected guest runs.")] = 4.0,
    keep: Annotated[bool, typer.Option(help="Leave the lab and agents for inspection.")] = False,
    vms: Annotated[
        int,
        typer.Option(
            min=1,
            max=99,
            help="Protect this many guests on the pair, in both directions, and kill the "
            "host holding most primaries.",
        ),
    ] = 1,
    pacemaker: Annotated[
        bool,
        typer.Option(
            "--pacemaker",
            help="Run the demo under a real Corosync + Pacemaker cluster in the lab "
            "(ocf:kemari:vm, qnetd as the third vote, a stand-in fence device); the link "
            "profile is 1g.",
        ),
    ] = False,
    kernel_lab: Annotated[
        bool,
        typer.Option(
            "--kernel-lab",
            help="Run the demo in the kernel lab: two L1 hosts on Debian's kernel, the "
            "guest under nested KVM (TCG if it has none), a power loss of the primary L1.",
        ),
    ] = False,
    disk: Annotated[
        str,
        typer.Option(help="With --kernel-lab: the disk backend, builtin or drbd (8.4)."),
    ] = "builtin",
) -> None:
    """Failover demo: protect a guest in the lab, kill -9 the primary, watch it go on."""
    if os.geteuid() != 0:
        err.print("[bold red]error:[/] the demo creates network namespaces: run it as root")
        raise typer.Exit(2)
    if sum((pacemaker, vms > 1, kernel_lab)) > 1:
        err.print("[bold red]error:[/] --pacemaker, --vms and --kernel-lab are separate demos")
        raise typer.Exit(2)
    if disk != "builtin" and not kernel_lab:
        err.print("[bold red]error:[/] --disk chooses the kernel lab's backend: add --kernel-lab")
        raise typer.Exit(2)
    cfg = _load(config)
    if kernel_lab:
        from kemari_suite.cli.klab import run_kernel_lab_demo

        run_kernel_lab_demo(cfg, disk=disk, as_json=json_out)
    elif pacemaker:
        _demo_pacemaker(cfg, seconds=seconds, keep=keep, json_out=json_out)
    elif vms > 1:
        _demo_multi(cfg, vms, profile=profile, seconds=seconds, keep=keep, json_out=json_out)
    else:
        _demo_one(cfg, profile=profile, seconds=seconds, keep=keep, json_out=json_out)


def _with_progress(json_out: bool, call: Callable[[Callable[[str], None] | None], Any]) -> Any:
    """``call(progress)`` under :func:`guard`: quiet for ``--json`` (stdout keeps the
    JSON line alone), else each step printed and shown in a live status line."""

    def run() -> Any:
        if json_out:
            return call(None)
        with err.status("starting") as st:

            def say(msg: str) -> None:
                st.update(msg)
                out.print(f"[dim]•[/] {msg}", highlight=False)

            return call(say)

    return guard(run)


def _demo_one(
    cfg: KemariConfig, *, profile: str, seconds: float, keep: bool, json_out: bool
) -> None:
    """``kemari demo``: see :mod:`kemari_suite.demo`."""
    from kemari_suite.demo import run_demo

    res = _with_progress(
        json_out,
        lambda say: run_demo(cfg, profile=profile, run_seconds=seconds, progress=say, keep=keep),
    )
    if json_out:
        print(json.dumps(res.to_dict()))
        return
    t = Table(title="Kemari failover demo", show_header=False)
    for k, v in res.to_dict().items():
        if k != "timeline":
            t.add_row(k, _human(k, v))
    out.print(t)
    if res.resumed:
        out.print("[bold green]the guest survived the loss of its host[/]")
    else:
        out.print("[bold red]the guest did not resume correctly[/]")
        raise typer.Exit(1)


def _demo_multi(
    cfg: KemariConfig, count: int, *, profile: str, seconds: float, keep: bool, json_out: bool
) -> None:
    """``kemari demo --vms N`` (N > 1): see :mod:`kemari_suite.demo.multi`."""
    from kemari_suite.demo.multi import run_multi_demo

    res = _with_progress(
        json_out,
        lambda say: run_multi_demo(
            cfg, count=count, profile=profile, run_seconds=seconds, progress=say, keep=keep
        ),
    )
    if json_out:
        print(json.dumps(res.to_dict()))
    else:
        t = Table(title=f"Kemari failover demo, {count} VMs")
        for col in ("vm", "primary on", "outcome", "resumed", "pause p50", "records lost"):
            t.add_column(col)
        for v in res.vms:
            p50 = "-" if v.pause_ms_p50 is None else f"{v.pause_ms_p50:.1f} ms"
            t.add_row(v.name, v.primary_host, v.outcome, str(v.resumed), p50, str(v.records_lost))
        out.print(t)
        out.print(f"prometheus samples parsed: {res.prometheus_samples}")
    if not res.resumed:
        if not json_out:
            out.print("[bold red]not every guest was served again[/]")
        raise typer.Exit(1)


def _demo_pacemaker(cfg: KemariConfig, *, seconds: float, keep: bool, json_out: bool) -> None:
    """``kemari demo --pacemaker``: see :mod:`kemari_suite.demo.pacemaker`."""
    from kemari_suite.demo.pacemaker import run_pacemaker_demo

    res = _with_progress(
        json_out, lambda say: run_pacemaker_demo(cfg, say, run_seconds=seconds, keep=keep)
    )
    if json_out:
        print(json.dumps(res))
    else:
        t = Table(title="Kemari failover demo under Pacemaker", show_header=False)
        for k, v in res.items():
            t.add_row(k, _human(k, v))
        out.print(t)
    if not res["resumed"]:
        if not json_out:
            out.print("[bold red]the guest did not resume correctly under Pacemaker[/]")
        raise typer.Exit(1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
