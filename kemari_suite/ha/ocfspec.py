"""``ocf:kemari:vm``'s contract with Pacemaker: exit codes, promotion scores, the
resource parameters, meta-data and validate-all (:mod:`kemari_suite.ha.ocf` has the
actions)."""

from __future__ import annotations

import enum
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from kemari_suite import config as configmod
from kemari_suite.config import KemariConfig
from kemari_suite.errors import ConfigError
from kemari_suite.vm.spec import VMPaths


class OcfRc(enum.IntEnum):
    """OCF exit codes (resource-agents' ocf-returncodes; OCF 1.1 names)."""

    SUCCESS = 0
    ERR_GENERIC = 1
    ERR_ARGS = 2
    ERR_UNIMPLEMENTED = 3
    ERR_PERM = 4
    ERR_INSTALLED = 5
    ERR_CONFIGURED = 6
    NOT_RUNNING = 7
    RUNNING_PROMOTED = 8
    FAILED_PROMOTED = 9


#: Promotion scores. The running primary's is the highest, so Pacemaker never moves a
#: healthy VM for a score; a current standby's comes next; the bootstrap score lets
#: Pacemaker pick a host for the very first (cold) boot.
PROMOTED_SCORE = 1000
STANDBY_SCORE = 100
BOOTSTRAP_SCORE = 1

#: The actions the agent implements (meta-data lists each).
ACTIONS = (
    "start",
    "stop",
    "monitor",
    "promote",
    "demote",
    "notify",
    "meta-data",
    "validate-all",
)


# ---- parameters ------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """One resource parameter, as meta-data declares it."""

    name: str
    kind: str  # string | integer | boolean | time (ra-api-1.dtd)
    default: str
    shortdesc: str
    longdesc: str
    required: bool = False


PARAMS = (
    Param(
        "config",
        "string",
        "/etc/kemari/kemari.toml",
        "Agent configuration (TOML)",
        "The Kemari configuration this host's agents run with (kemari standby -c CONFIG). "
        "Give either config or vmdef.",
    ),
    Param(
        "vmdef",
        "string",
        "",
        "VM definition (TOML)",
        "A VM definition (docs/vm-definition.md) instead of a config: the agents run "
        "with --vm VMDEF --host HOST.",
    ),
    Param(
        "host",
        "string",
        "",
        "This host's name in the VM definition",
        "With vmdef: this host's name in its [hosts]. Default: the cluster node's name.",
    ),
    Param(
        "name",
        "string",
        "",
        "VM name",
        "The VM's name; when set, validate-all refuses a configuration for another VM.",
    ),
    Param(
        "kemari",
        "string",
        "",
        "The kemari command",
        "Path of the kemari command. Default: the one installed beside the Python that runs "
        "this agent, else kemari on PATH.",
    ),
    Param(
        "bootstrap",
        "boolean",
        "false",
        "Allow the first cold boot",
        "Allow promote to boot the VM from cold (kemari protect) on a standby that never "
        "received a checkpoint. Only for the very first start of a new VM: with a VM that "
        "ran before, a cold boot starts from a disk that may be older than the lost "
        "primary's. Clear it once the VM runs.",
    ),
    Param(
        "release_solo_on_peer_stop",
        "boolean",
        "false",
        "Go on unprotected when the peer's instance stopped",
        "After Pacemaker stopped the peer's instance (or fenced its node), a primary "
        "holding output with no standby (state held) runs kemari release --solo: it goes "
        "on unprotected instead of pausing the guest at replication.held_limit_mib.",
    ),
)

#: Timeouts (seconds) of each action, as meta-data advertises them.
ACTION_TIMEOUTS: dict[str, int] = {
    "start": 120,
    "stop": 90,
    "monitor": 30,
    "promote": 180,
    "demote": 180,
    "notify": 30,
    "meta-data": 5,
    "validate-all": 30,
}


def _boolean(env: Mapping[str, str], name: str, default: str) -> bool:
    """An OCF boolean parameter.

    Raises:
        ConfigError: not one of the usual spellings of true or false.
    """
    raw = env.get(f"OCF_RESKEY_{name}", default).strip().lower()
    if raw in ("1", "true", "yes", "on", "y"):
        return True
    if raw in ("0", "false", "no", "off", "n", ""):
        return False
    raise ConfigError(f"not a boolean: {raw!r}", key=name)


def _find_kemari() -> str:
    beside = Path(sys.executable).parent / "kemari"
    if beside.exists():
        return str(beside)
    return shutil.which("kemari") or "kemari"


@dataclass(frozen=True)
class Params:
    """The resource's parameters (``OCF_RESKEY_*``)."""

    config: Path | None
    vmdef: Path | None
    host: str
    name: str
    kemari: str
    bootstrap: bool = False
    release_solo_on_peer_stop: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Params:
        """Read the parameters.

        Raises:
            ConfigError: a malformed value, or neither (or both) of config and vmdef.
        """
        vmdef = env.get("OCF_RESKEY_vmdef", "")
        # The config's default applies only when no VM definition is given.
        config = env.get("OCF_RESKEY_config", "" if vmdef else PARAMS[0].default)
        if config and vmdef:
            raise ConfigError("give either config or vmdef, not both", key="config")
        if not config and not vmdef:
            raise ConfigError("give config or vmdef", key="config")
        host = env.get("OCF_RESKEY_host", "") or env.get("OCF_RESKEY_CRM_meta_on_node", "")
        return cls(
            config=Path(config) if config else None,
            vmdef=Path(vmdef) if vmdef else None,
            host=host or socket.gethostname().split(".")[0],
            name=env.get("OCF_RESKEY_name", ""),
            kemari=env.get("OCF_RESKEY_kemari", "") or _find_kemari(),
            bootstrap=_boolean(env, "bootstrap", "false"),
            release_solo_on_peer_stop=_boolean(env, "release_solo_on_peer_stop", "false"),
        )

    @property
    def source(self) -> Path:
        """The file the agents are started from."""
        path = self.config or self.vmdef
        assert path is not None
        return path

    def agent_args(self) -> list[str]:
        """What selects the VM on a ``kemari`` command line."""
        if self.vmdef is not None:
            return ["--vm", str(self.vmdef), "--host", self.host]
        return ["-c", str(self.config)]

    def load(self) -> tuple[KemariConfig, Path]:
        """This host's config and the agent's control socket.

        Raises:
            ConfigError: the file is missing or invalid.
        """
        if self.vmdef is not None:
            from kemari_suite.vm.vmdef import load_vmdef

            view = load_vmdef(self.vmdef, host=self.host, check_files=False).for_host(self.host)
            return view.config, view.paths.run_dir / "control.sock"
        cfg = configmod.load(self.config)
        paths = VMPaths.for_vm(cfg.vm.name, cfg.paths.run_dir, cfg.paths.shm_dir)
        return cfg, paths.run_dir / "control.sock"


# ---- meta-data -------------------------------------------------------------------------


def _xml(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def metadata(version: str = "0.1.0") -> str:
    """The agent's OCF 1.1 meta-data (valid against resource-agents' ra-api-1.dtd)."""
    params = "\n".join(
        f'    <parameter name="{p.name}" required="{int(p.required)}" unique="0">\n'
        f'      <longdesc lang="en">{_xml(p.longdesc)}</longdesc>\n'
        f'      <shortdesc lang="en">{_xml(p.shortdesc)}</shortdesc>\n'
        f'      <content type="{p.kind}" default="{_xml(p.default)}"/>\n'
        "    </parameter>"
        for p in PARAMS
    )
    t = ACTION_TIMEOUTS
    actions = "\n".join(
        [
            f'    <action name="start" timeout="{t["start"]}s"/>',
            f'    <action name="stop" timeout="{t["stop"]}s"/>',
            f'    <action name="monitor" timeout="{t["monitor"]}s" interval="10s" '
            'role="Promoted"/>',
            f'    <action name="monitor" timeout="{t["monitor"]}s" interval="11s" '
            'role="Unpromoted"/>',
            f'    <action name="promote" timeout="{t["promote"]}s"/>',
            f'    <action name="demote" timeout="{t["demote"]}s"/>',
            f'    <action name="notify" timeout="{t["notify"]}s"/>',
            f'    <action name="meta-data" timeout="{t["meta-data"]}s"/>',
            f'    <action name="validate-all" timeout="{t["validate-all"]}s"/>',
        ]
    )
    return f"""<?xml version="1.0"?>
<!DOCTYPE resource-agent SYSTEM "ra-api-1.dtd">
<resource-agent name="vm" version="{version}">
  <version>1.1</version>
  <longdesc lang="en">
A VM kept running through the loss of its host by Kemari Suite, as a promotable clone:
promoted is the host running the VM (the primary agent, kemari protect), unpromoted the
host holding its replica (the standby agent, kemari standby). Promote on a standby whose
primary is gone is a failover; a demote of a protected primary is a planned switchover.
Set the meta attributes promotable=true, promoted-max=1, clone-max=2 and notify=true.
  </longdesc>
  <shortdesc lang="en">Kemari-protected VM (promotable)</shortdesc>
  <parameters>
{params}
  </parameters>
  <actions>
{actions}
  </actions>
</resource-agent>
"""


# ---- validate-all ----------------------------------------------------------------------


def validate(params: Params, *, run_check: bool = True) -> tuple[OcfRc, str]:
    """validate-all: the parameters, the files, then ``kemari check``."""
    if not Path(params.kemari).exists() and shutil.which(params.kemari) is None:
        return OcfRc.ERR_INSTALLED, f"no kemari command at {params.kemari}"
    if not params.source.is_file() or not os.access(params.source, os.R_OK):
        return OcfRc.ERR_INSTALLED, f"{params.source} is missing or unreadable on this host"
    if run_check:
        argv = [params.kemari, "check", *params.agent_args()]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired) as err:
            return OcfRc.ERR_INSTALLED, f"{' '.join(argv)}: {err}"
        said = (proc.stderr + proc.stdout).strip()
        if proc.returncode == 2:
            return OcfRc.ERR_CONFIGURED, f"kemari check refused {params.source}: {said}"
        if proc.returncode != 0:
            return OcfRc.ERR_GENERIC, f"kemari check exited {proc.returncode}: {said}"
    try:
        cfg, _ = params.load()
    except ConfigError as err:
        return OcfRc.ERR_CONFIGURED, str(err)
    if params.name and cfg.vm.name != params.name:
        return (
            OcfRc.ERR_ARGS,
            f"{params.source} is for VM {cfg.vm.name!r}, not {params.name!r}",
        )
    return OcfRc.SUCCESS, "ok"


__all__ = [
    "ACTIONS",
    "ACTION_TIMEOUTS",
    "BOOTSTRAP_SCORE",
    "PARAMS",
    "PROMOTED_SCORE",
    "STANDBY_SCORE",
    "OcfRc",
    "Param",
    "Params",
    "metadata",
    "validate",
]
