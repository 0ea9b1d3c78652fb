"""Real SSH hosts in a lab: an sshd in each host namespace, and a way to reach them.

The lab's namespaces have no link to the machine's own network, so the controller side
(Ansible, fabric) must run inside the lab too. :func:`run_in_netns` runs a function on
a fresh thread that first joins a namespace (``setns(2)`` acts on the calling thread
only; threads and subprocesses started from it inherit the namespace), which puts an
operator's machine on the lab's LAN without touching the rest of the process.

:func:`start_sshd` starts ``/usr/sbin/sshd -D`` in a namespace with a private config,
freshly generated host key, pid file and ``authorized_keys``; :meth:`SshHost.stop`
stops it by its process id. Nothing here is used by the product at run time: it is
what the integration tests (and anyone trying the playbooks on one machine) build a
host pair from.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from kemari_suite.errors import DeployError, SetupError

T = TypeVar("T")

SSHD = "/usr/sbin/sshd"
SSH_KEYGEN = "ssh-keygen"
#: sshd refuses to start without its privilege separation directory.
PRIVSEP_DIR = Path("/run/sshd")
_CLONE_NEWNET = 0x40000000
_NETNS_DIR = Path("/run/netns")


def run_in_netns(ns: str, fn: Callable[[], T]) -> T:
    """Run ``fn()`` on a new thread that has joined network namespace ``ns``.

    Raises:
        SetupError: the namespace does not exist or cannot be joined (not root).
        Whatever ``fn`` raises.
    """
    result: list[T] = []
    failure: list[BaseException] = []

    def body() -> None:
        try:
            fd = os.open(_NETNS_DIR / ns, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            failure.append(SetupError("netns", f"cannot open namespace {ns}: {err.strerror}"))
            return
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.setns(fd, _CLONE_NEWNET) != 0:
                errno = ctypes.get_errno()
                failure.append(SetupError("netns", f"setns({ns}): {os.strerror(errno)}"))
                return
        finally:
            os.close(fd)
        try:
            result.append(fn())
        except BaseException as err:
            failure.append(err)

    thread = threading.Thread(target=body, name=f"netns-{ns}")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


def _keygen(path: Path, comment: str) -> str:
    """Generate an ed25519 key pair at ``path`` and return the public key line."""
    if shutil.which(SSH_KEYGEN) is None:
        raise SetupError("ssh", "ssh-keygen is missing; install openssh-client")
    for p in (path, path.with_suffix(".pub")):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    subprocess.run(
        [SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        capture_output=True,
    )
    return path.with_name(path.name + ".pub").read_text().strip()


@dataclass(frozen=True)
class ClientKey:
    """The key pair the controller logs in with."""

    private: Path
    public: str


def make_client_key(directory: Path, name: str = "client") -> ClientKey:
    """A fresh ed25519 client key in ``directory``.

    Raises:
        SetupError: ssh-keygen is missing.
    """
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    return ClientKey(private=path, public=_keygen(path, f"kemari-test-{name}"))


@dataclass
class SshHost:
    """One sshd running in a namespace."""

    name: str
    netns: str
    address: str
    port: int
    directory: Path
    host_key_public: str
    pid: int
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def known_hosts_line(self) -> str:
        """This host's line for a known_hosts file (``[addr]:port keytype key``)."""
        keytype, key = self.host_key_public.split()[:2]
        return f"[{self.address}]:{self.port} {keytype} {key}"

    @property
    def log(self) -> Path:
        return self.directory / "sshd.log"

    def stop(self, timeout: float = 5.0) -> None:
        """Stop this sshd by its process id (SIGTERM, then SIGKILL)."""
        if self._proc is None or self._proc.poll() is not None:
            return
        self._proc.send_signal(signal.SIGTERM)
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout)


def start_sshd(
    name: str,
    netns: str,
    address: str,
    port: int,
    directory: Path,
    authorized_keys: list[str],
    *,
    timeout: float = 10.0,
) -> SshHost:
    """Start sshd in ``netns`` listening on ``address:port``, with a fresh host key.

    Root may log in with the ``authorized_keys`` only (no passwords, no PAM).

    Raises:
        SetupError: sshd or ssh-keygen is missing, or sshd did not come up (the
            message quotes its log).
    """
    if not Path(SSHD).exists():
        raise SetupError("ssh", f"{SSHD} is missing; install openssh-server")
    directory.mkdir(parents=True, exist_ok=True)
    PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
    host_key = directory / "ssh_host_ed25519_key"
    host_pub = _keygen(host_key, f"kemari-test-{name}")
    (directory / "authorized_keys").write_text("".join(k.strip() + "\n" for k in authorized_keys))
    config = directory / "sshd_config"
    config.write_text(
        "\n".join(
            [
                f"ListenAddress {address}",
                f"Port {port}",
                f"HostKey {host_key}",
                f"PidFile {directory / 'sshd.pid'}",
                f"AuthorizedKeysFile {directory / 'authorized_keys'}",
                # The test directories live below /tmp; sshd's ownership walk would refuse.
                "StrictModes no",
                "UsePAM no",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "PermitRootLogin prohibit-password",
                "Subsystem sftp internal-sftp",
                "UseDNS no",
                "MaxStartups 50:30:100",
                "MaxSessions 50",
                "LogLevel VERBOSE",
                "",
            ]
        )
    )
    log = (directory / "sshd.log").open("wb")
    try:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, SSHD, "-D", "-e", "-f", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    finally:
        log.close()
    host = SshHost(
        name=name,
        netns=netns,
        address=address,
        port=port,
        directory=directory,
        host_key_public=host_pub,
        pid=proc.pid,
        _proc=proc,
    )
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise SetupError("ssh", f"sshd for {name} exited {proc.returncode}: {_tail(host.log)}")
        if _log_says_listening(host.log):
            return host
        if time.monotonic() > deadline:
            host.stop()
            raise SetupError("ssh", f"sshd for {name} did not start: {_tail(host.log)}")
        time.sleep(0.02)


def _log_says_listening(log: Path) -> bool:
    try:
        return "Server listening" in log.read_text(errors="replace")
    except FileNotFoundError:
        return False


def _tail(log: Path, lines: int = 5) -> str:
    try:
        return " | ".join(log.read_text(errors="replace").strip().splitlines()[-lines:]) or "-"
    except FileNotFoundError:
        return "-"


def wait_reachable(address: str, port: int, timeout: float = 5.0) -> None:
    """Wait until a TCP connect to ``address:port`` succeeds (call inside the namespace).

    Raises:
        DeployError: it does not within ``timeout``.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((address, port), timeout=1.0):
                return
        except OSError as err:
            if time.monotonic() > deadline:
                raise DeployError(f"{address}:{port}", f"not reachable: {err}") from err
            time.sleep(0.05)


@dataclass
class LabPair:
    """Both hosts of a lab as SSH hosts, with the client key and a known_hosts file."""

    primary: SshHost
    secondary: SshHost
    client_key: ClientKey
    known_hosts: Path
    #: The namespace the controller runs in (the lab's client namespace, on the LAN).
    controller_netns: str

    @property
    def hosts(self) -> tuple[SshHost, SshHost]:
        return (self.primary, self.secondary)

    def connection_vars(self, host: SshHost) -> dict[str, object]:
        """Inventory variables that reach ``host`` with host key checking on."""
        return {
            "ansible_host": host.address,
            "ansible_port": host.port,
            "ansible_user": "root",
            "ansible_ssh_private_key_file": str(self.client_key.private),
            "ansible_ssh_common_args": (
                f"-o UserKnownHostsFile={self.known_hosts} -o StrictHostKeyChecking=yes"
            ),
            "kemari_known_hosts": str(self.known_hosts),
        }

    def stop(self) -> None:
        for h in self.hosts:
            h.stop()


def start_pair(
    lab_id: str,
    directory: Path,
    *,
    ports: tuple[int, int] = (2201, 2202),
    profile: str = "1g",
) -> LabPair:
    """sshd in the primary and secondary namespaces of lab ``lab_id`` (which must be
    up), listening on their LAN addresses, with one client key and a known_hosts file.

    Raises:
        SetupError: sshd or ssh-keygen is missing or sshd did not start.
    """
    from kemari_suite import lab

    lay = lab.layout(lab_id, profile)
    key = make_client_key(directory / "client")
    started: list[SshHost] = []
    try:
        for role, port in zip(lab.HOST_ROLES, ports, strict=True):
            started.append(
                start_sshd(
                    role,
                    lay.ns_for(role),
                    lay.lan_ip_for(role),
                    port,
                    directory / role,
                    [key.public],
                )
            )
    except BaseException:
        for h in started:
            h.stop()
        raise
    known = directory / "known_hosts"
    known.write_text("".join(h.known_hosts_line + "\n" for h in started))
    return LabPair(started[0], started[1], key, known, lay.ns_client)
