"""DRBD resource configuration: :class:`DrbdConfig` and the resource file it renders.

:class:`DrbdConfig` is a frozen dataclass tree, validated on construction (what
drbdadm's dry run does not check: node-id and minor ranges, ports, duplicates).
:func:`render_resource` writes the resource file with safe defaults: ``protocol C``;
``fencing resource-and-stonith`` with a ``fence-peer`` handler that runs the suite's
tiebreaker (``kemari fence-peer --resource RES``); every ``after-sb-0pri/1pri/2pri``
policy ``disconnect`` (a split brain is never resolved by throwing one side's writes
away automatically); ``verify-alg sha256``; ``auto-promote no`` (only the failover logic
promotes); quorum off for two nodes, or majority with a diskless tiebreaker node.

The fence-peer handler runs on a primary that lost its peer, with I/O frozen. DRBD sets
``DRBD_RESOURCE``, ``DRBD_PEER_NODE_ID`` and friends in its environment; it must exit
with DRBD's documented codes (3: peer already outdated or worse, 4: peer outdated, 5:
peer unreachable and assumed dead, 6: outdate yourself, 7: peer STONITHed); when it
fails, I/O stays frozen until ``drbdadm resume-io``. The handler template is formatted
with ``{resource}``; see README.md for the contract ``kemari fence-peer`` implements.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from kemari_suite.errors import ConfigError

SplitBrainPolicy0 = Literal[
    "disconnect", "discard-younger-primary", "discard-older-primary", "discard-zero-changes",
    "discard-least-changes", "discard-node",
]  # fmt: skip
SplitBrainPolicy1 = Literal[
    "disconnect", "consensus", "violently-as0p", "discard-secondary", "call-pri-lost-after-sb"
]
SplitBrainPolicy2 = Literal["disconnect", "violently-as0p", "call-pri-lost-after-sb"]
Fencing = Literal["resource-and-stonith", "resource-only", "dont-care"]
OnNoQuorum = Literal["io-error", "suspend-io"]

#: DRBD 9 node ids are 0..31 and minors fit in 20 bits (drbdadm's dry run checks neither).
MAX_NODE_ID = 31
MAX_MINOR = (1 << 20) - 1
DEFAULT_CONFIG_DIR = Path("/etc/drbd.d")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,62}$")
_HOST = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_TOKEN = re.compile(r"^[a-z0-9][a-z0-9()-]{0,31}$")
_PATH = re.compile(r"^/[^\s\"'\\;{}#]*$")


@dataclass(frozen=True)
class DrbdNode:
    """One host of the resource.

    ``name`` must be the host's ``uname -n`` (drbdadm picks its ``on NAME`` section by it).
    ``address`` is an IP literal (DRBD does not resolve names). ``disk`` overrides the
    resource's backing disk on this node; ``"none"`` makes it a diskless tiebreaker
    (counted for quorum, holds no data).
    """

    name: str
    address: str
    node_id: int
    port: int = 7789
    disk: str = ""


@dataclass(frozen=True)
class QuorumOptions:
    """DRBD 9 quorum. ``quorum`` is "off", "majority", "all" or a node count."""

    quorum: str | int = "off"
    on_no_quorum: OnNoQuorum = "io-error"


@dataclass(frozen=True)
class DrbdConfig:
    """A DRBD resource with one volume, validated on construction.

    Raises:
        ConfigError: naming the field (``drbd.nodes[1].node_id`` ...) of the first bad value.
    """

    resource: str
    nodes: tuple[DrbdNode, ...]
    #: Backing disk on every node (unless the node overrides it).
    disk: str = ""
    minor: int = 0
    #: "internal" or the path of an external meta-data device.
    meta_disk: str = "internal"
    verify_alg: str = "sha256"
    fencing: Fencing = "resource-and-stonith"
    #: Formatted with ``{resource}``; empty for none (then ``fencing`` must be dont-care).
    fence_peer_handler: str = "kemari fence-peer --resource {resource}"
    #: Run by DRBD when a split brain is not resolved automatically (notification only).
    split_brain_handler: str = ""
    after_sb_0pri: SplitBrainPolicy0 = "disconnect"
    after_sb_1pri: SplitBrainPolicy1 = "disconnect"
    after_sb_2pri: SplitBrainPolicy2 = "disconnect"
    quorum: QuorumOptions = field(default_factory=QuorumOptions)
    #: DRBD 9 promotes on open by default; Kemari promotes only on failover.
    auto_promote: bool = False
    #: ``ping-int`` in seconds (1..120; None: DRBD's 10): how long a silent peer still
    #: counts as connected. A takeover waits for DRBD to lose a dead primary it still
    #: counts as connected (:func:`kemari_suite.disk.drbd.promote_resource`, bounded by
    #: ``PEER_LOSS_WAIT_S``): keep it well under that.
    ping_int_s: int | None = None

    def __post_init__(self) -> None:
        validate(self)

    def node(self, name: str) -> DrbdNode:
        """Raises ConfigError when ``name`` is not a node of the resource."""
        for n in self.nodes:
            if n.name == name:
                return n
        raise ConfigError(
            f"{name!r} is not a node of resource {self.resource} "
            f"(nodes: {', '.join(n.name for n in self.nodes)})",
            key="drbd.nodes",
        )

    def disk_of(self, node: DrbdNode) -> str:
        return node.disk or self.disk

    @property
    def device(self) -> str:
        return f"/dev/drbd{self.minor}"


def _bad(key: str, reason: str) -> ConfigError:
    return ConfigError(reason, key=f"drbd.{key}")


def _check_command(key: str, template: str, resource: str) -> None:
    try:
        cmd = template.format(resource=resource)
    except (KeyError, IndexError, ValueError) as err:
        raise _bad(key, f"bad template (only {{resource}} is substituted): {err}") from err
    if any(c in cmd for c in '"\\\n\r;{}#'):
        raise _bad(key, "must not contain quotes, backslashes, ';', braces, '#' or newlines")


def validate(cfg: DrbdConfig) -> None:
    """Check what drbdadm's dry run does not (node-id and minor ranges, ports, duplicates).

    Raises:
        ConfigError: naming the field of the first bad value.
    """
    if not _NAME.match(cfg.resource) or cfg.resource == "all":
        raise _bad("resource", f"{cfg.resource!r}: 1-63 letters, digits, '_', '.', '+', '-'")
    if not isinstance(cfg.nodes, tuple):
        raise _bad("nodes", f"expected a tuple of nodes, got {type(cfg.nodes).__name__}")
    if len(cfg.nodes) < 2:
        raise _bad("nodes", "a resource needs at least two nodes")
    if len(cfg.nodes) > MAX_NODE_ID + 1:
        raise _bad("nodes", f"at most {MAX_NODE_ID + 1} nodes")
    names: dict[str, int] = {}
    ids: dict[int, int] = {}
    endpoints: dict[tuple[str, int], int] = {}
    data_nodes = 0
    for i, n in enumerate(cfg.nodes):
        key = f"nodes[{i}]"
        if not isinstance(n, DrbdNode):
            raise _bad(key, f"expected a node, got {n!r}")
        if not n.name:
            raise _bad(f"{key}.name", "missing")
        if not _HOST.match(n.name):
            raise _bad(f"{key}.name", f"{n.name!r} is not a host name")
        if n.name in names:
            raise _bad(f"{key}.name", f"{n.name!r} already used by nodes[{names[n.name]}]")
        names[n.name] = i
        if isinstance(n.node_id, bool) or not isinstance(n.node_id, int):
            raise _bad(f"{key}.node_id", f"expected an integer, got {n.node_id!r}")
        if not 0 <= n.node_id <= MAX_NODE_ID:
            raise _bad(f"{key}.node_id", f"{n.node_id} is not in 0..{MAX_NODE_ID}")
        if n.node_id in ids:
            raise _bad(f"{key}.node_id", f"{n.node_id} already used by nodes[{ids[n.node_id]}]")
        ids[n.node_id] = i
        if not n.address:
            raise _bad(f"{key}.address", "missing")
        try:
            addr = ipaddress.ip_address(n.address)
        except ValueError:
            raise _bad(
                f"{key}.address", f"{n.address!r} is not an IP address (DRBD needs one)"
            ) from None
        if addr.is_unspecified or addr.is_multicast:
            raise _bad(f"{key}.address", f"{n.address} cannot be a node address")
        if isinstance(n.port, bool) or not isinstance(n.port, int) or not 1 <= n.port <= 65535:
            raise _bad(f"{key}.port", f"{n.port!r} is not a TCP port (1..65535)")
        if (str(addr), n.port) in endpoints:
            raise _bad(
                f"{key}.port",
                f"{n.address}:{n.port} already used by nodes[{endpoints[(str(addr), n.port)]}]",
            )
        endpoints[(str(addr), n.port)] = i
        disk = cfg.disk_of(n)
        if not disk:
            raise _bad(f"{key}.disk", "no backing disk (set drbd.disk or the node's disk)")
        if disk != "none":
            if not _PATH.match(disk):
                raise _bad(f"{key}.disk", f"{disk!r} is not an absolute device path")
            data_nodes += 1
    if data_nodes < 2:
        raise _bad("nodes", "at least two nodes need a backing disk")
    if isinstance(cfg.minor, bool) or not isinstance(cfg.minor, int):
        raise _bad("minor", f"expected an integer, got {cfg.minor!r}")
    if not 0 <= cfg.minor <= MAX_MINOR:
        raise _bad("minor", f"{cfg.minor} is not in 0..{MAX_MINOR}")
    if cfg.meta_disk != "internal" and not _PATH.match(cfg.meta_disk):
        raise _bad("meta_disk", f"{cfg.meta_disk!r}: 'internal' or an absolute device path")
    if not _TOKEN.match(cfg.verify_alg):
        raise _bad("verify_alg", f"{cfg.verify_alg!r} is not a kernel hash name")
    if cfg.fencing not in ("resource-and-stonith", "resource-only", "dont-care"):
        raise _bad("fencing", f"{cfg.fencing!r} is not a fencing policy")
    if cfg.fence_peer_handler:
        _check_command("fence_peer_handler", cfg.fence_peer_handler, cfg.resource)
    elif cfg.fencing != "dont-care":
        raise _bad("fence_peer_handler", f"fencing {cfg.fencing} needs a fence-peer handler")
    if cfg.split_brain_handler:
        _check_command("split_brain_handler", cfg.split_brain_handler, cfg.resource)
    for key, value, allowed in (
        ("after_sb_0pri", cfg.after_sb_0pri, SplitBrainPolicy0),
        ("after_sb_1pri", cfg.after_sb_1pri, SplitBrainPolicy1),
        ("after_sb_2pri", cfg.after_sb_2pri, SplitBrainPolicy2),
    ):
        if value not in get_args(allowed):
            raise _bad(key, f"{value!r} is not one of {', '.join(get_args(allowed))}")
    q = cfg.quorum.quorum
    if isinstance(q, bool) or not (
        q in ("off", "majority", "all") or (isinstance(q, int) and 1 <= q <= len(cfg.nodes))
    ):
        raise _bad("quorum.quorum", f"{q!r}: 'off', 'majority', 'all' or 1..{len(cfg.nodes)} nodes")
    if cfg.quorum.on_no_quorum not in ("io-error", "suspend-io"):
        raise _bad("quorum.on_no_quorum", f"{cfg.quorum.on_no_quorum!r}")
    p = cfg.ping_int_s
    if p is not None and (isinstance(p, bool) or not isinstance(p, int) or not 1 <= p <= 120):
        raise _bad("ping_int_s", f"{p!r} is not a number of seconds in 1..120")


def _address(node: DrbdNode) -> str:
    addr = ipaddress.ip_address(node.address)
    if addr.version == 6:
        return f"ipv6 [{addr}]:{node.port}"
    return f"ipv4 {addr}:{node.port}"


#: Resource-file dialects :func:`render_resource` writes: DRBD 9, and the 8.4 that
#: Debian's kernels carry (drbd-utils 9 drives both).
DIALECTS = ("9", "8.4")


def _check_84(cfg: DrbdConfig) -> None:
    if len(cfg.nodes) != 2:
        raise ConfigError("DRBD 8.4 resources have exactly two nodes", key="drbd.nodes")
    if any(cfg.disk_of(n) == "none" for n in cfg.nodes):
        raise ConfigError("DRBD 8.4 has no diskless tiebreaker node", key="drbd.nodes")
    if cfg.quorum.quorum != "off":
        raise ConfigError("DRBD 8.4 has no quorum", key="drbd.quorum.quorum")


def render_resource(cfg: DrbdConfig, *, dialect: str = "9") -> str:
    """The resource file for ``cfg`` (drbd.conf syntax) in ``dialect``: "9" (options with
    quorum, node ids, a connection mesh) or "8.4" (two nodes, fencing in ``disk``).

    Raises:
        ConfigError: an unknown dialect, or what 8.4 cannot express (more than two
            nodes, a diskless node, quorum).
    """
    if dialect not in DIALECTS:
        raise ConfigError(f"unknown DRBD dialect {dialect!r}", key="drbd.dialect")
    v84 = dialect == "8.4"
    if v84:
        _check_84(cfg)
    r = cfg.resource
    handlers = []
    if cfg.fence_peer_handler:
        handlers.append(f'fence-peer "{cfg.fence_peer_handler.format(resource=r)}";')
    if cfg.split_brain_handler:
        handlers.append(f'split-brain "{cfg.split_brain_handler.format(resource=r)}";')
    if v84:
        lines = [
            f"# Kemari Suite: DRBD resource {r} (DRBD 8.4). Generated; edit the Kemari config.",
            f"resource {r} {{",
            "  disk {",
            f"    fencing {cfg.fencing};",
            "  }",
            "  net {",
            "    protocol C;",
        ]
    else:
        opts = [f"quorum {cfg.quorum.quorum};"]
        if cfg.quorum.quorum != "off":
            opts.append(f"on-no-quorum {cfg.quorum.on_no_quorum};")
        opts.append(f"auto-promote {'yes' if cfg.auto_promote else 'no'};")
        lines = [
            f"# Kemari Suite: DRBD resource {r}. Generated; edit the Kemari config instead.",
            f"resource {r} {{",
            "  options {",
            *(f"    {o}" for o in opts),
            "  }",
            "  net {",
            "    protocol C;",
            f"    fencing {cfg.fencing};",
        ]
    if cfg.ping_int_s is not None:
        lines.append(f"    ping-int {cfg.ping_int_s};")
    lines += [
        f"    verify-alg {cfg.verify_alg};",
        f"    after-sb-0pri {cfg.after_sb_0pri};",
        f"    after-sb-1pri {cfg.after_sb_1pri};",
        f"    after-sb-2pri {cfg.after_sb_2pri};",
        "    rr-conflict disconnect;",
        "  }",
    ]
    if handlers:
        lines += ["  handlers {", *(f"    {h}" for h in handlers), "  }"]
    for n in cfg.nodes:
        disk = cfg.disk_of(n)
        lines += [f"  on {n.name} {{"]
        if not v84:
            lines.append(f"    node-id {n.node_id};")
        lines += [
            f"    address {_address(n)};",
            "    volume 0 {",
            f"      device minor {cfg.minor};",
        ]
        if disk == "none":
            lines.append("      disk none;")
        else:
            meta = "internal" if cfg.meta_disk == "internal" else f'"{cfg.meta_disk}"'
            lines += [f'      disk "{disk}";', f"      meta-disk {meta};"]
        lines += ["    }", "  }"]
    if not v84:
        lines += ["  connection-mesh {", f"    hosts {' '.join(n.name for n in cfg.nodes)};", "  }"]
    lines += ["}", ""]
    return "\n".join(lines)


def drbd_config_from_dict(
    data: dict[str, Any], *, path: str | None = None, prefix: str = "disk.drbd"
) -> DrbdConfig:
    """Build a DrbdConfig from a TOML table, naming the file and dotted key on error.

    Raises:
        ConfigError: an unknown key, a wrong type or an invalid value.
    """
    from kemari_suite import config as _config

    try:
        return _config.build(DrbdConfig, data, path=path, prefix=prefix)
    except ConfigError as err:
        if err.path is None and err.key and err.key.startswith("drbd."):
            raise ConfigError(err.reason, path=path, key=f"{prefix}{err.key[4:]}") from err
        raise


__all__ = [
    "DEFAULT_CONFIG_DIR",
    "DIALECTS",
    "MAX_MINOR",
    "MAX_NODE_ID",
    "DrbdConfig",
    "DrbdNode",
    "QuorumOptions",
    "drbd_config_from_dict",
    "render_resource",
    "validate",
]
