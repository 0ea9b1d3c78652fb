"""``kemari vm``: check VM definitions, show their QEMU command lines, import from libvirt.

Registered in :mod:`kemari_suite.cli.main` with ``app.add_typer(vm_app, name="vm")``.
Errors leave through :func:`kemari_suite.cli.common.guard` (one red line, exit code 2).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from kemari_suite.cli.common import guard

if TYPE_CHECKING:
    from kemari_suite.vm.vmdef import MachineCatalog

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="VM definitions: check them, show their QEMU command lines, import from libvirt.",
)
out = Console()
err = Console(stderr=True)

#: Exit code of ``import-libvirt`` when something cannot be carried over.
EXIT_CANNOT = 3


def _machines() -> MachineCatalog:
    """This host's QEMU machine types (looked up at call time so tests can swap it)."""
    from kemari_suite.vm.vmdef import qemu_machines

    return qemu_machines()


FileArg = Annotated[Path, typer.Argument(help="VM definition (TOML).")]


@app.command("check")
def check(
    file: FileArg,
    host: Annotated[
        str | None,
        typer.Option("--host", help="Check the files as this host sees them (its overrides)."),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Validate a VM definition; print its summary, warnings and identity digest."""
    from kemari_suite.vm import vmdef

    defn = guard(lambda: vmdef.load_vmdef(file, host=host, machines=_machines))
    ident = guard(lambda: vmdef.identity(defn, host))
    digest = vmdef.identity_digest(ident)
    warns = vmdef.check_warnings(defn)
    from kemari_suite.vm.lastbuild import image_id_of

    image_id = image_id_of(defn.boot.kernel, defn.boot.initrd)
    if json_out:
        out.print_json(
            json.dumps(
                {
                    "file": str(file),
                    "host": host,
                    "identity": ident,
                    "identity_digest": digest,
                    "image_id": image_id,
                    "warnings": warns,
                }
            )
        )
        return
    t = Table(title=f"vm {defn.name}", show_header=False)
    boot = (
        f"kernel {defn.boot.kernel}"
        + (f" + initrd {defn.boot.initrd}" if defn.boot.initrd else "")
        + (f", cmdline {defn.boot.cmdline!r}" if defn.boot.cmdline else "")
        if defn.boot.mode == "kernel"
        else f"firmware {defn.boot.firmware}"
    )
    rows: list[tuple[str, str]] = [
        ("machine", defn.machine),
        ("vcpus / memory", f"{defn.vcpus} / {defn.memory_mib} MiB"),
        ("accel / display", f"{defn.accel} / {defn.display}"),
        ("boot", boot),
        ("image id", image_id),
    ]
    view_disks = defn.host(host).disks if host else defn.disks
    view_nics = defn.host(host).nics if host else defn.nics
    for i, d in enumerate(view_disks):
        size = f", {d.size_mib} MiB" if d.size_mib is not None else ""
        rows.append((f"disk[{i}] {d.name}", f"{d.path} ({d.backend}{size})"))
    for i, n in enumerate(view_nics):
        where = f"tap {n.tap}" if n.tap else f"bridge {n.bridge}"
        rows.append((f"nic[{i}]", f"{n.mac} {n.model}, {where}"))
    for i, dev in enumerate(defn.devices):
        rows.append((f"device[{i}]", dev.qemu_arg()))
    for h in defn.hosts:
        extra = f", netns {h.netns}" if h.netns else ""
        rows.append((f"host {h.name}", f"{h.replication_address}{extra}"))
    for k, v in rows:
        t.add_row(k, v)
    out.print(t)
    # Plain print: the digest must never be wrapped (operators compare it between hosts).
    print(f"identity digest: {digest}")
    for w in warns:
        err.print(f"[yellow]warning:[/] {w}", highlight=False)
    checked = f"as host {host} sees it" if host else "top-level paths"
    out.print(f"[green]ok[/]: {file} ({checked})", highlight=False)


@app.command("argv")
def argv(
    file: FileArg,
    host: Annotated[str, typer.Option("--host", help="The host whose command line to show.")],
    direct: Annotated[
        bool,
        typer.Option(
            "--direct",
            help="The NIC on its TAP and the disk on its file, instead of the taps' sockets.",
        ),
    ] = False,
    incoming: Annotated[
        bool, typer.Option("--incoming", help="The secondary's failover start (-incoming).")
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the argv as JSON.")] = False,
) -> None:
    """Print the QEMU command line of a VM definition on one host."""
    from kemari_suite.vm import vmdef

    def run() -> list[str]:
        defn = vmdef.load_vmdef(file, host=host, check_files=False, machines=_machines)
        return defn.for_host(host).argv(tapped=not direct, incoming=incoming)

    line = guard(run)
    if json_out:
        print(json.dumps(line))
    else:
        print(shlex.join(line))


@app.command("import-libvirt")
def import_libvirt(
    domain_xml: Annotated[Path, typer.Argument(help="Domain XML (virsh dumpxml NAME).")],
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Write the definition here.")
    ] = None,
    host_a: Annotated[str, typer.Option("--host-a", help="Host a's replication address.")] = "",
    host_b: Annotated[str, typer.Option("--host-b", help="Host b's replication address.")] = "",
    force: Annotated[
        bool, typer.Option("--force", help="Write the file even when something cannot carry over.")
    ] = False,
) -> None:
    """Turn a libvirt domain into a VM definition and say what could not carry over.

    Exit code 0 when everything essential carried over, 3 when something cannot (the
    file is then written only with --force).
    """
    from kemari_suite.vm import libvirt

    res = guard(
        lambda: libvirt.import_domain_file(
            domain_xml, host_a=host_a, host_b=host_b, machines=_machines
        )
    )
    style: dict[str, Any] = {"dropped": "dim", "changed": "yellow", "cannot": "bold red"}
    for note in res.notes:
        err.print(
            f"[{style[note.severity]}]{note.severity}:[/] {note.field}: {note.message}",
            highlight=False,
        )
    write = res.ok or force
    if output is None:
        if write:
            print(res.text, end="")
    elif write:
        guard(lambda: _write(output, res.text))
        err.print(f"wrote {output}", highlight=False)
    else:
        err.print(
            f"[bold red]not written:[/] {output}: something cannot be carried over "
            "(--force writes it anyway)",
            highlight=False,
        )
    if not res.ok:
        raise typer.Exit(EXIT_CANNOT)


def _write(path: Path, text: str) -> None:
    from kemari_suite.errors import ConfigError

    try:
        path.write_text(text)
    except OSError as e:
        raise ConfigError(f"cannot write: {e.strerror}", path=str(path)) from e


__all__ = ["EXIT_CANNOT", "app"]
