"""A host folder inside an L1, through virtiofs: how the suite's own code runs there.

::

    host: virtiofsd --socket-path=<host folder>/fs.sock -o source=/work/main   (one per L1)
    L1 QEMU: -chardev socket,path=fs.sock  -device vhost-user-fs-pci,tag=kemari
    L1: mount -t virtiofs -o ro kemari /work/main

Debian's cloud kernel has ``virtiofs`` and no 9p. The folder is mounted at the same path
in the L1 and read-only there, so the L1 runs the live tree (no image rebuild for a code
change) and cannot change it. The L1's RAM is already a shared file (vhost-user needs
that). virtiofsd serves one QEMU and exits when that QEMU goes; it is still stopped by
its PID, whatever happened.

The L1 runs the suite with its own ``/usr/bin/python3`` (bookworm: 3.11, as the venv's)
and the venv's site-packages on ``PYTHONPATH`` (:func:`python_env`): the venv's own
interpreter may be a build outside the shared folder, and the wheels only need the
C library, which is the same Debian release on both sides.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from kemari_suite.errors import SetupError, VMError

SHARE_TAG = "kemari"
VIRTIOFSD_PATHS = ("/usr/lib/qemu/virtiofsd", "/usr/libexec/virtiofsd")
#: virtiofsd makes its socket at once; a loaded host may take a while to run it.
SOCKET_TIMEOUT_S = 30.0


def share_socket(folder: Path) -> Path:
    """The vhost-user socket of the L1 whose files are in ``folder``."""
    return Path(folder) / "fs.sock"


def find_virtiofsd() -> str:
    """Raises SetupError when no virtiofsd is installed (qemu-system-common ships one)."""
    for path in VIRTIOFSD_PATHS:
        if os.access(path, os.X_OK):
            return path
    raise SetupError("virtiofsd", "install qemu-system-common (virtiofsd) or virtiofsd")


class SharedFolder:
    """One virtiofsd serving ``source`` on ``socket``; :meth:`start` before the L1's QEMU."""

    def __init__(self, source: Path, socket: Path) -> None:
        self.source = Path(source)
        self.socket = Path(socket)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.socket.with_suffix(".log")

    def start(self) -> None:
        """Start virtiofsd and wait for its socket.

        Raises:
            SetupError: no virtiofsd.
            VMError: it exited or made no socket in time (its log attached).
        """
        self.socket.unlink(missing_ok=True)
        argv = [
            find_virtiofsd(), "-f", f"--socket-path={self.socket}",
            "-o", f"source={self.source}", "-o", "cache=auto", "-o", "log_level=warn",
        ]  # fmt: skip
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
        deadline = time.monotonic() + SOCKET_TIMEOUT_S
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = self.log.read_text(errors="replace")[-2000:]
                raise VMError("virtiofsd", f"no socket {self.socket}:\n{tail}")
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL, by PID (it may have exited with its QEMU already)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self.socket.unlink(missing_ok=True)


def mount_command(path: str) -> str:
    """The L1's command to mount the share read-only at ``path``."""
    p = shlex.quote(path)
    return (
        f"modprobe virtiofs && mkdir -p {p} && "
        f"(mountpoint -q {p} || mount -t virtiofs -o ro {SHARE_TAG} {p})"
    )


def site_packages(tree: str) -> str:
    """The venv's site-packages under ``tree`` (the suite's checkout, shared as is)."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    return f"{tree}/.venv/lib/{version}/site-packages"


def python_env(tree: str) -> str:
    """Environment assignments (for ``env``) that make the L1's python3 find the suite."""
    path = f"{tree}:{site_packages(tree)}"
    # Read-only: never try to write bytecode; the host's __pycache__ is used as is.
    return f"PYTHONPATH={shlex.quote(path)} PYTHONDONTWRITEBYTECODE=1"


def kemari_command(tree: str, args: list[str]) -> str:
    """A shell command running ``kemari ARGS`` in the L1 from the shared tree."""
    return f"env {python_env(tree)} python3 -m kemari_suite.cli.main {shlex.join(args)}"


__all__ = [
    "SHARE_TAG",
    "SharedFolder",
    "find_virtiofsd",
    "kemari_command",
    "mount_command",
    "python_env",
    "share_socket",
    "site_packages",
]
