"""Ready-to-run configs for a protected VM in a lab: one file per role, and how to start it.

The same rendering serves :class:`~kemari_suite.lab.pair.LabPair` (tests, demo,
benchmarks) and ``kemari lab up`` / ``kemari lab configs`` (operators), so the files
an operator starts by hand are the files the tests run.

What each role gets, and why::

    primary.toml    [paths] run_dir/shm_dir of its own (<run>/kemari-<id>-pri, ...):
                    two agents on one machine must not share QMP sockets or RAM files
                    [vm] netns = the primary's namespace; with output commit the guest
                    NIC goes through the frame proxy: [tap] host_tap = its TAP and an
                    empty vm.netdev (a plain tap backend otherwise)
                    [replication] listen on its own replication address, peer = the
                    other host's: after a switchover the roles swap
    secondary.toml  the same, mirrored
    witness.toml    the folder of pair keys, its state file and the heartbeat timeout;
                    it runs in the client namespace (the LAN), listening on the
                    client's address

Several VMs on one pair (``PairOptions.slotted``): each VM's guest address, MAC, TAPs,
replication and ``/metrics`` ports come from its name (:func:`~kemari_suite.lab.
addressing.vm_addresses`), its folders are ``<vm>`` below the hosts', its primary runs
on either host (``reverse``), and one witness folder of pair keys serves them all.

Keys are files, never inline, each mode 0600: ``replication.key`` (both hosts'
``replication.key_file``) and ``witness.d/<vm>.key``, the pair's own key at the witness
(the hosts' ``replication.witness_key_file``, the witness's ``keys_dir``): the witness
never sees the replication key.

``lab.env`` beside them holds the lab's names and addresses as shell variables.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kemari_suite.config import ImageConfig, KemariConfig, PathsConfig, dump_toml
from kemari_suite.errors import LabError
from kemari_suite.lab.addressing import (
    DEFAULT_VM,
    HOST_ROLES,
    LAB_REPL_PORT,
    HostRole,
    LabLayout,
    VmAddresses,
    vm_addresses,
    vm_slots,
)
from kemari_suite.protocol.files import mkdir_owner_only, open_owner_only, write_owner_only
from kemari_suite.protocol.keys import check_key_length, generate_key

COUNTER_PORT = 7000
WITNESS_PORT = 7411
REPL_PORT = LAB_REPL_PORT
#: The config files written, in the order their agents start.
ROLES = ("witness", "secondary", "primary")
#: The command the three agents run, by role.
AGENT_COMMANDS = {"witness": "witness", "secondary": "standby", "primary": "protect"}
DEFAULT_WORKLOAD = f"counter -q -p {COUNTER_PORT} 100"
ENV_FILE = "lab.env"
#: The replication key file both hosts read, in the configs' folder.
REPLICATION_KEY_FILE = "replication.key"
#: The witness's folder of pair keys, in the configs' folder.
WITNESS_KEYS_DIR = "witness.d"


@dataclass
class PairOptions:
    """What differs between demo, tests, benchmarks and an operator's own guest."""

    vm_name: str = "guest"
    memory_mib: int = 128
    vcpus: int = 1
    #: ``vm.run``: the command the guest's init runs, instead of the image's own.
    workload: str = DEFAULT_WORKLOAD
    mode: str = "speculative"
    max_interval_ms: int = 100
    heartbeat_interval_ms: int = 200
    heartbeat_timeout_ms: int = 3000
    tiebreaker: str = "witness"
    #: ``replication.tracker`` ("auto": uffd-wp where it runs, see DESIGN.md).
    tracker: str = "auto"
    #: ``replication.tracker_verify``: the compare tracker checks the tracker at every
    #: scan and a missed page fails the sync point. Default: on when
    #: ``$KEMARI_TRACKER_VERIFY`` is 1 (the test suite sets it, so every lab test checks
    #: the tracker it runs).
    tracker_verify: bool = field(
        default_factory=lambda: os.environ.get("KEMARI_TRACKER_VERIFY") == "1"
    )
    compression: str = "zstd"
    #: ``replication.tls``: TLS 1.3 on the replication link ("on") or MAC only ("off").
    tls: str = "on"
    #: ``replication.pipelining``: True, False or "auto" (the product's default).
    pipelining: bool | str = "auto"
    #: ``replication.reprotect``: after a failover the survivor protects the VM again
    #: as soon as the failed host comes back as a standby.
    reprotect: bool = False
    #: Guest disk: "" (none), "builtin" (one image per host) or "shared" (one for both).
    disk: str = ""
    disk_mib: int = 16
    #: Put the guest NIC behind the frame proxy (output commit) instead of a plain tap.
    tapped_net: bool = False
    #: ``tap.policy``: the product's default ("output") unless a test names another.
    policy: str = "output"
    remus_interval_ms: int = 25
    adaptive_min_spacing_ms: int = 5
    display: str = "none"
    #: ``alerts.hook`` for both agents (a command; see docs/alerts.md).
    alert_hook: str = ""
    #: ``[testing] commit_probe`` for the secondary: ``stream`` records the stream
    #: workload's probe at every commit into ``commits.jsonl`` in its artifacts.
    commit_probe: str = ""
    env_primary: dict[str, str] = field(default_factory=dict)
    env_secondary: dict[str, str] = field(default_factory=dict)
    #: Run the agents from this VM definition (``--vm FILE --host a|b``) instead of
    #: config files; see :meth:`LabPair.write_vm_definition`.
    vm_definition: str = ""
    #: The guest image both agents boot (``image.add``/``init``, or a prebuilt
    #: ``kernel``/``initrd``); None: the base config's ``[image]``.
    image: ImageConfig | None = None
    #: One of several VMs on the pair: its guest address, MAC, TAPs and ports come from
    #: its name (:func:`~kemari_suite.lab.addressing.vm_addresses`), and its run and shm
    #: folders are ``<vm name>`` subfolders of the hosts'. False: the lab's one VM
    #: (``guest``'s addresses whatever its name, the hosts' folders themselves).
    slotted: bool = False
    #: The primary runs in the lab's *secondary* namespace and the standby in the
    #: primary's: VMs of one pair can run in either direction.
    reverse: bool = False
    #: ``[metrics] listen`` for each agent: its host's LAN address, port 9400 + slot.
    metrics: bool = True
    #: The witness's folder of pair keys, shared by every VM of the pair; empty:
    #: ``witness.d`` in the pair's own configs folder.
    witness_keys_dir: str = ""

    def addresses(self, lab: LabLayout) -> VmAddresses:
        """This VM's guest address, MAC, TAPs and ports on ``lab``.

        Raises:
            LabError: ``slotted`` and the VM name is not valid.
        """
        return vm_addresses(lab, self.vm_name if self.slotted else DEFAULT_VM)

    def host_of(self, role: str) -> HostRole:
        """The lab host (namespace) the agent of ``role`` runs on."""
        primary = role == "primary"
        return "primary" if primary != self.reverse else "secondary"


def several_options(
    template: PairOptions, names: Sequence[str], *, on_b: int, witness_keys_dir: Path
) -> list[PairOptions]:
    """The options of each VM of ``names`` protected on one lab pair, from ``template``:
    ``slotted`` (addresses, ports and folders from each name), the last ``on_b`` with
    their primary on host B (``reverse``), all with one witness folder of pair keys.

    Raises:
        LabError: a name is invalid, given twice, or two names take the same slot.
    """
    vm_slots(names)
    return [
        dataclasses.replace(
            template,
            vm_name=name,
            slotted=True,
            reverse=i >= len(names) - on_b,
            witness_keys_dir=str(witness_keys_dir),
        )
        for i, name in enumerate(names)
    ]


def options_from_config(cfg: KemariConfig) -> PairOptions:
    """Options that carry ``cfg``'s replication, tap, alert and image settings (the
    witness is the tiebreaker: a lab has one); change the rest with
    :func:`dataclasses.replace`."""
    r, t = cfg.replication, cfg.tap
    return PairOptions(
        mode=r.mode,
        tracker=r.tracker,
        tracker_verify=r.tracker_verify,
        compression=r.compression,
        tls=r.tls,
        max_interval_ms=r.max_interval_ms,
        heartbeat_interval_ms=r.heartbeat_interval_ms,
        heartbeat_timeout_ms=r.heartbeat_timeout_ms,
        pipelining=r.pipelining,
        reprotect=r.reprotect,
        policy=t.policy,
        remus_interval_ms=t.remus_interval_ms,
        adaptive_min_spacing_ms=t.adaptive_min_spacing_ms,
        alert_hook=cfg.alerts.hook,
        image=cfg.image,
    )


# --------------------------------------------------------------------------- where things go


def role_run_dir(paths: PathsConfig, lab_id: str, role: str) -> Path:
    """``role``'s own run directory (``<run_dir>/kemari-<id>-pri`` and so on)."""
    return paths.run_dir / f"kemari-{lab_id}-{role[:3]}"


def role_shm_dir(paths: PathsConfig, lab_id: str, role: str) -> Path:
    """``role``'s own shm directory, for its guest RAM files."""
    return paths.shm_dir / f"kemari-{lab_id}-{role[:3]}"


def agent_run_dir(paths: PathsConfig, lab_id: str, opts: PairOptions, role: str) -> Path:
    """The run directory of ``role``'s agent for the VM of ``opts``: its host's own,
    and with several VMs on the pair (``opts.slotted``) a ``<vm name>`` subfolder."""
    base = role_run_dir(paths, lab_id, opts.host_of(role))
    return base / opts.vm_name if opts.slotted else base


def agent_shm_dir(paths: PathsConfig, lab_id: str, opts: PairOptions, role: str) -> Path:
    """The shm directory (guest RAM files) of ``role``'s agent; see :func:`agent_run_dir`."""
    base = role_shm_dir(paths, lab_id, opts.host_of(role))
    return base / opts.vm_name if opts.slotted else base


def default_dir(paths: PathsConfig, lab_id: str) -> Path:
    """Where ``kemari lab up`` writes the configs unless told (removed by ``lab down``)."""
    return paths.run_dir / f"kemari-{lab_id}-configs"


def witness_listen(lab: LabLayout) -> str:
    """The witness's address: the client's, on the LAN both hosts reach."""
    return f"{lab.lan_client_ip}:{WITNESS_PORT}"


def disk_image(directory: Path, opts: PairOptions, role: str) -> Path:
    """The guest disk of ``role``: one file per host, or one shared file."""
    return directory / ("shared-disk.img" if opts.disk == "shared" else f"disk-{role}.img")


def lease_file(directory: Path) -> Path:
    """The file standing in for a shared LUN when the tiebreaker is a lease."""
    return directory / "lease.img"


def replication_key_file(directory: Path) -> Path:
    """The pair's replication key (both hosts' ``replication.key_file``)."""
    return directory / REPLICATION_KEY_FILE


def witness_key_file(directory: Path, opts: PairOptions) -> Path:
    """The pair's key at the witness: ``<keys_dir>/<vm name>.key``."""
    return witness_keys_dir(directory, opts) / f"{opts.vm_name}.key"


def witness_keys_dir(directory: Path, opts: PairOptions) -> Path:
    """The witness's folder of pair keys (``opts.witness_keys_dir`` when the VMs of a
    pair share one witness)."""
    return Path(opts.witness_keys_dir) if opts.witness_keys_dir else directory / WITNESS_KEYS_DIR


# --------------------------------------------------------------------------- rendering


def render(
    lab: LabLayout, base: KemariConfig, opts: PairOptions, *, directory: Path
) -> dict[str, dict[str, Any]]:
    """The config tree of every role (see the module docstring); no side effects.

    ``base`` gives the cache directory, the accelerator and (unless ``opts.image``) the
    guest image; its paths are where the roles' run and shm directories go. The key
    files they name are in ``directory`` (:func:`write` writes them).
    """
    trees: dict[str, dict[str, Any]] = {
        role: _host_tree(lab, base, opts, role, directory) for role in HOST_ROLES
    }
    trees["witness"] = {
        "paths": _paths_tree(
            base,
            role_run_dir(base.paths, lab.lab_id, "witness"),
            role_shm_dir(base.paths, lab.lab_id, "witness"),
        ),
        "replication": {
            "heartbeat_interval_ms": opts.heartbeat_interval_ms,
            "heartbeat_timeout_ms": opts.heartbeat_timeout_ms,
        },
        "witness": {
            "keys_dir": str(witness_keys_dir(directory, opts)),
            # Its own run folder: removed with the lab, never shared with another lab.
            "state_file": str(role_run_dir(base.paths, lab.lab_id, "witness") / "witness.json"),
        },
    }
    return trees


def _paths_tree(base: KemariConfig, run_dir: Path, shm_dir: Path) -> dict[str, Any]:
    return {
        "cache_dir": str(base.paths.cache_dir),
        "run_dir": str(run_dir),
        "shm_dir": str(shm_dir),
    }


def _image_tree(image: ImageConfig) -> dict[str, Any]:
    tree: dict[str, Any] = {"kernel_package": image.kernel_package}
    if image.add:
        tree["add"] = list(image.add)
    if image.init:
        tree["init"] = image.init
    if image.kernel or image.initrd:
        tree["kernel"], tree["initrd"] = image.kernel, image.initrd
    return tree


def _host_tree(
    lab: LabLayout,
    base: KemariConfig,
    o: PairOptions,
    role: HostRole,
    directory: Path,
) -> dict[str, Any]:
    # ``role`` is the agent's (primary, secondary); ``host`` the namespace it runs in.
    host, other = o.host_of(role), o.host_of("secondary" if role == "primary" else "primary")
    addr = o.addresses(lab)
    tap = addr.tap_for(host)
    tree: dict[str, Any] = {
        "paths": _paths_tree(
            base,
            agent_run_dir(base.paths, lab.lab_id, o, role),
            agent_shm_dir(base.paths, lab.lab_id, o, role),
        ),
        "image": _image_tree(o.image if o.image is not None else base.image),
        "vm": {
            "name": o.vm_name,
            "memory_mib": o.memory_mib,
            "vcpus": o.vcpus,
            "accel": base.vm.accel,
            # With output commit the frame proxy opens the TAP; QEMU has no netdev.
            "netdev": "" if o.tapped_net else f"tap,ifname={tap},script=no,downscript=no",
            # A plain TAP is untapped output: the agents refuse it unless the config says
            # the lab accepts that (``tapped_net=False`` is that explicit opt-out).
            "unprotected_output": not o.tapped_net,
            "netns": lab.ns_for(host),
            "ip": f"{addr.guest_ip}/{lab.lan_prefix}",
            "run": o.workload,
            "display": o.display,
        },
        "replication": {
            "key_file": str(replication_key_file(directory)),
            # Each host listens on its own address and knows the other's: after a
            # switchover the roles swap.
            "peer": f"{lab.repl_ip_for(other)}:{addr.repl_port}",
            "listen": f"{lab.repl_ip_for(host)}:{addr.repl_port}",
            # The host's name, never the role's: after a failover and re-protection
            # both hosts have run ``kemari standby``.
            "node_id": host,
            "mode": o.mode,
            "tracker": o.tracker,
            "tracker_verify": o.tracker_verify,
            "compression": o.compression,
            "tls": o.tls,
            "max_interval_ms": o.max_interval_ms,
            "pipelining": o.pipelining,
            "reprotect": o.reprotect,
            "heartbeat_interval_ms": o.heartbeat_interval_ms,
            "heartbeat_timeout_ms": o.heartbeat_timeout_ms,
            "tiebreaker": o.tiebreaker,
            "witness": witness_listen(lab) if o.tiebreaker == "witness" else "",
        },
    }
    if o.tiebreaker == "witness":
        tree["replication"]["witness_key_file"] = str(witness_key_file(directory, o))
    if o.slotted:
        tree["vm"]["mac"] = addr.mac
    if o.metrics:
        tree["metrics"] = {"listen": f"{lab.lan_ip_for(host)}:{addr.metrics_port}"}
    if o.alert_hook:
        tree["alerts"] = {"hook": o.alert_hook}
    if o.tapped_net:
        tree["tap"] = {
            "host_tap": tap,
            "policy": o.policy,
            "remus_interval_ms": o.remus_interval_ms,
            "adaptive_min_spacing_ms": o.adaptive_min_spacing_ms,
        }
    if o.disk:
        tree["disk"] = {"backend": o.disk, "path": str(disk_image(directory, o, role))}
    if o.commit_probe and role == "secondary":
        tree["testing"] = {"commit_probe": o.commit_probe}
    if o.tiebreaker == "lease":
        # Both "hosts" share this machine's filesystem: a file stands in for the LUN.
        tree.setdefault("disk", {})["lease_device"] = str(lease_file(directory))
    return tree


# --------------------------------------------------------------------------- launching


@dataclass(frozen=True)
class Launch:
    """How to start one role's agent: ``argv`` inside namespace ``namespace``."""

    role: str
    namespace: str
    config: Path
    #: The kemari arguments (after the program), e.g. ("protect", "-c", "/x/primary.toml").
    args: tuple[str, ...]

    def argv(self, kemari: tuple[str, ...] = ("kemari",)) -> list[str]:
        """The whole command line, ``ip netns exec`` included."""
        return ["ip", "netns", "exec", self.namespace, *kemari, *self.args]

    def shell(self, kemari: tuple[str, ...] = ("kemari",)) -> str:
        """:meth:`argv` quoted for a shell."""
        return shlex.join(self.argv(kemari))


@dataclass(frozen=True)
class Port:
    """A TCP port the protected VM's lab uses."""

    port: int
    address: str
    namespace: str
    what: str


@dataclass(frozen=True)
class LabConfigs:
    """What :func:`write` wrote, and how to use it."""

    lab_id: str
    directory: Path
    #: Config file by role (witness, secondary, primary).
    configs: dict[str, Path]
    env_file: Path
    #: In start order: witness, standby, protect.
    launches: tuple[Launch, ...]
    ports: tuple[Port, ...]
    #: The replication key file (both hosts) and the pair's key file at the witness.
    key_file: Path
    witness_key_file: Path

    def launch(self, role: str) -> Launch:
        """The launch of ``role``.

        Raises:
            KeyError: no such role.
        """
        for item in self.launches:
            if item.role == role:
                return item
        raise KeyError(role)


def launches(
    lab: LabLayout, configs: dict[str, Path], opts: PairOptions | None = None
) -> tuple[Launch, ...]:
    """The three agents' commands, in start order (the standby before the primary)."""
    opts = opts if opts is not None else PairOptions()
    items = []
    for role in ROLES:
        args: tuple[str, ...] = (AGENT_COMMANDS[role], "-c", str(configs[role]))
        if role == "witness":
            args += ("--listen", witness_listen(lab))
        ns = lab.ns_client if role == "witness" else lab.ns_for(opts.host_of(role))
        items.append(Launch(role=role, namespace=ns, config=configs[role], args=args))
    return tuple(items)


def ports(lab: LabLayout, opts: PairOptions, guest_ports: tuple[int, ...] = ()) -> tuple[Port, ...]:
    """Every TCP port in play: replication on both hosts, the witness, the guest's services
    (the counter workload's, when it runs, and ``guest_ports``)."""
    addr = opts.addresses(lab)
    found = [
        Port(
            addr.repl_port,
            lab.repl_ip_for(opts.host_of(r)),
            lab.ns_for(opts.host_of(r)),
            f"replication: the {r} listens",
        )
        for r in HOST_ROLES
    ]
    if opts.metrics:
        found += [
            Port(
                addr.metrics_port,
                lab.lan_ip_for(opts.host_of(r)),
                lab.ns_for(opts.host_of(r)),
                f"/metrics of the {r}'s agent (Prometheus)",
            )
            for r in HOST_ROLES
        ]
    if opts.tiebreaker == "witness":
        found.append(Port(WITNESS_PORT, lab.lan_client_ip, lab.ns_client, "the witness"))
    counter = opts.workload == DEFAULT_WORKLOAD
    served = [p for p in guest_ports if not (counter and p == COUNTER_PORT)]
    reach = f"reach it from {lab.ns_client}"
    if counter:
        what = f"the guest's counter workload ({reach})"
        found.append(Port(COUNTER_PORT, addr.guest_ip, lab.ns_client, what))
    what = f"your guest's service ({reach})"
    found += [Port(p, addr.guest_ip, lab.ns_client, what) for p in served]
    return tuple(found)


def env_lines(lab: LabLayout, directory: Path) -> list[str]:
    """``lab.env``: the lab's names and addresses as shell variable assignments."""
    values = {
        "LAB": lab.lab_id,
        "PROFILE": lab.profile.name,
        "NS_PRIMARY": lab.ns_primary,
        "NS_SECONDARY": lab.ns_secondary,
        "NS_CLIENT": lab.ns_client,
        "PRIMARY_REPL_IP": lab.repl_primary_ip,
        "SECONDARY_REPL_IP": lab.repl_secondary_ip,
        "PRIMARY_LAN_IP": lab.lan_primary_ip,
        "SECONDARY_LAN_IP": lab.lan_secondary_ip,
        "CLIENT_IP": lab.lan_client_ip,
        "GUEST_IP": lab.guest_ip,
        "TAP_PRIMARY": lab.tap_primary,
        "TAP_SECONDARY": lab.tap_secondary,
        "REPL_PORT": str(REPL_PORT),
        "WITNESS": witness_listen(lab),
        "CONFIGS": str(directory),
    }
    return [f"{k}={shlex.quote(v)}" for k, v in values.items()]


def write(
    lab: LabLayout,
    base: KemariConfig,
    opts: PairOptions,
    directory: Path,
    *,
    key: str | None = None,
    guest_ports: tuple[int, ...] = (),
) -> LabConfigs:
    """Write every role's config, the key files they name (``key``: the replication
    key; None: a new random one; the witness key is always new), the guest disks or
    lease file, and ``lab.env`` into ``directory``. Every file is mode 0600 and the
    folders this creates 0700.

    Existing disk images are kept (a restarted pair goes on with its disks).

    Raises:
        LabError: a file cannot be written.
        ConfigError: ``key`` is shorter than 32 bytes.
    """
    if key is not None:
        check_key_length(key.encode(), what="replication.key")
    trees = render(lab, base, opts, directory=directory)
    configs: dict[str, Path] = {}
    key_file, wkey_file = replication_key_file(directory), witness_key_file(directory, opts)
    try:
        mkdir_owner_only(directory)
        key_text = key if key is not None else generate_key()
        write_owner_only(key_file, key_text + "\n")
        mkdir_owner_only(wkey_file.parent)
        write_owner_only(wkey_file, generate_key() + "\n")
        if opts.disk:
            reserved = 1 << 20 if opts.disk == "shared" else 0
            for host in HOST_ROLES:
                _sparse(disk_image(directory, opts, host), reserved + (opts.disk_mib << 20))
        if opts.tiebreaker == "lease":
            _sparse(lease_file(directory), 1 << 20)
        for role in ROLES:
            configs[role] = write_owner_only(directory / f"{role}.toml", dump_toml(trees[role]))
        header = f"# lab {lab.lab_id}: names and addresses (`. {directory / ENV_FILE}`)\n"
        env_file = write_owner_only(
            directory / ENV_FILE, header + "\n".join(env_lines(lab, directory)) + "\n"
        )
    except OSError as err:
        raise LabError(lab.lab_id, f"cannot write the configs in {directory}: {err}") from err
    return LabConfigs(
        lab_id=lab.lab_id,
        directory=directory,
        configs=configs,
        env_file=env_file,
        launches=launches(lab, configs, opts),
        ports=ports(lab, opts, guest_ports),
        key_file=key_file,
        witness_key_file=wkey_file,
    )


def _sparse(path: Path, size: int) -> None:
    """A guest disk (or lease) image of ``size`` bytes, mode 0600: it holds guest data."""
    if not path.exists():
        with open_owner_only(path, "wb") as f:
            f.truncate(size)
    else:
        os.chmod(path, 0o600)
