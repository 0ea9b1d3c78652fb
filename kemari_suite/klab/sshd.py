"""SSH into the L1s of a standing kernel lab, so that they can be provisioned like real
hosts (``kemari deploy`` runs the project's playbooks over SSH).

Keys are made on this machine and put into the L1s through the agent channel: a host
key per L1 (so the controller checks it from the first connection: ``known_hosts`` is
written before anyone connects) and one client key that root may log in with. sshd in
the L1 listens on port 22; QEMU's user network forwards a port of the host side to it
(``hostfwd``, bound in the namespace the L1's QEMU runs in: its lab host's LAN address).

The image for this carries ``openssh-server``, ``python3-venv`` and ``python3-packaging``
(the playbooks make a virtual environment with Ansible's pip module) beside
:data:`~kemari_suite.klab.l2.NESTED_PACKAGES`.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from kemari_suite.errors import SetupError
from kemari_suite.klab.host import L1Host
from kemari_suite.klab.l2 import NESTED_PACKAGES

#: The L1s have no package index: what the playbooks' roles install (common, qemu,
#: drbd) is in the image already, so that a deploy finds them present.
SSH_PACKAGES: tuple[str, ...] = (
    *NESTED_PACKAGES,
    "openssh-server",
    "python3-venv",
    "python3-packaging",
)
#: The forwarded port on the host side: this plus the host's index (0, 1).
SSH_PORT = 2222
_CONFIG = "/etc/ssh/klab_sshd_config"
_HOST_KEY = "/etc/ssh/klab_host_ed25519_key"


@dataclass(frozen=True)
class SshKeys:
    """The client key (``private``, ``public``) and each L1's host public key."""

    private: Path
    public: str
    host_keys: dict[str, tuple[Path, str]]
    known_hosts: Path


def _keygen(path: Path, comment: str) -> str:
    if shutil.which("ssh-keygen") is None:
        raise SetupError("ssh", "ssh-keygen is missing; install openssh-client")
    for p in (path, path.with_name(path.name + ".pub")):
        p.unlink(missing_ok=True)
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        capture_output=True,
    )
    return path.with_name(path.name + ".pub").read_text().strip()


def make_keys(folder: Path, hosts: list[str], endpoints: dict[str, tuple[str, int]]) -> SshKeys:
    """Fresh keys in ``folder``, and ``known_hosts`` naming each L1 by its forwarded
    ``endpoints[host]`` (address, port).

    Raises:
        SetupError: ssh-keygen is missing.
    """
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    client = folder / "client"
    public = _keygen(client, "kemari-klab-client")
    host_keys = {
        h: (folder / f"{h}_host", _keygen(folder / f"{h}_host", f"klab-{h}")) for h in hosts
    }
    lines = []
    for h, (_, pub) in host_keys.items():
        address, port = endpoints[h]
        kind, key = pub.split()[:2]
        lines.append(f"[{address}]:{port} {kind} {key}\n")
    known = folder / "known_hosts"
    known.write_text("".join(lines))
    return SshKeys(client, public, host_keys, known)


def start_sshd(host: L1Host, keys: SshKeys) -> None:
    """Put the keys into ``host`` and start sshd there (root by key only).

    Raises:
        AgentError: a command in the L1 failed (sshd's own message included).
    """
    private, _ = keys.host_keys[host.spec.host]
    assert host.agent is not None
    host.agent.put_file(_HOST_KEY, private.read_bytes(), mode=0o600)
    host.agent.put_file("/root/.ssh/authorized_keys", keys.public + "\n", mode=0o600)
    host.agent.put_file(
        _CONFIG,
        "\n".join(
            [
                "Port 22",
                f"HostKey {_HOST_KEY}",
                "PermitRootLogin prohibit-password",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "UsePAM no",
                "UseDNS no",
                "Subsystem sftp internal-sftp",
                "MaxStartups 50:30:100",
                "MaxSessions 50",
                "",
            ]
        ),
    )
    host.run(
        f"chmod 700 /root/.ssh && mkdir -p /run/sshd && /usr/sbin/sshd -f {_CONFIG} "
        "-E /var/log/klab-sshd.log",
        timeout=60,
    )


def ssh_command(keys_dir: Path, address: str, port: int) -> list[str]:
    """The ssh command line that logs in as root (host key checked)."""
    return [
        "ssh",
        "-i",
        str(keys_dir / "client"),
        "-o",
        f"UserKnownHostsFile={keys_dir / 'known_hosts'}",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        "BatchMode=yes",
        "-p",
        str(port),
        f"root@{address}",
    ]


__all__ = ["SSH_PACKAGES", "SSH_PORT", "SshKeys", "make_keys", "ssh_command", "start_sshd"]
