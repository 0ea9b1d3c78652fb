"""What ``ocf:kemari:vm`` acts on: the agent's control socket, the agent process it
started (pid file, log), and the clone instance's promotion score (``crm_attribute``)."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from kemari_suite.config import KemariConfig
from kemari_suite.errors import KemariError
from kemari_suite.service import control

log = logging.getLogger(__name__)


class Control(Protocol):
    """The agent's control socket (``kemari status`` and friends talk to it)."""

    def status(self) -> dict[str, Any] | None:
        """The status, or None when nothing answers."""
        ...

    def request(self, cmd: str, *, timeout: float, **args: Any) -> Any:
        """One request.

        Raises:
            KemariError: no answer, or the agent refused.
        """
        ...


@dataclass(frozen=True)
class SocketControl:
    """The real control socket."""

    path: Path

    def status(self) -> dict[str, Any] | None:
        try:
            st = control.request(self.path, "status", timeout=5.0)
        except KemariError:
            return None
        return st if isinstance(st, dict) else None

    def request(self, cmd: str, *, timeout: float, **args: Any) -> Any:
        return control.request(self.path, cmd, timeout=timeout, **args)


@dataclass
class PromotionScore:
    """``crm_attribute --promotion`` for this clone instance; logs and goes on outside a
    cluster (no crm_attribute, or it fails)."""

    env: Mapping[str, str]
    binary: str | None = field(
        default_factory=lambda: shutil.which("crm_attribute", path=_PATH) or None
    )
    #: Every call made (for tests and the log): the argv.
    calls: list[list[str]] = field(default_factory=list)

    def set(self, score: int | None) -> None:
        args = ["-v", str(score)] if score is not None and score > 0 else ["-D"]
        if self.binary is None:
            log.warning("no crm_attribute (not in a cluster?): promotion score %s not set", args)
            return
        argv = [self.binary, "--promotion", "-l", "reboot", *args]
        self.calls.append(argv)
        try:
            proc = subprocess.run(
                argv, capture_output=True, text=True, timeout=10, env=dict(self.env), check=False
            )
        except (OSError, subprocess.TimeoutExpired) as err:
            log.warning("crm_attribute failed: %s", err)
            return
        if proc.returncode != 0:
            log.warning(
                "crm_attribute %s exited %d (not in a cluster?): %s",
                " ".join(args),
                proc.returncode,
                (proc.stderr or proc.stdout).strip()[-300:],
            )


_PATH = "/usr/sbin:/usr/bin:/sbin:/bin:/usr/local/sbin:/usr/local/bin"


def _alive(pid: int) -> bool:
    """``pid`` runs and is a kemari agent (not a reused pid).

    A zombie is dead (where nothing reaps the agent's children, an agent that ended
    stays one); an empty command line is a process still starting or still ending
    (its memory gone, its sockets not yet), so it counts as alive.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    # The state follows the command name, which is in parentheses and may hold spaces.
    state = stat.rpartition(")")[2].split()[:1]
    if state and state[0] in ("Z", "X"):
        return False
    return not cmdline or b"kemari" in cmdline


@dataclass
class AgentProcess:
    """The agent process this resource started: its pid file and log."""

    pidfile: Path
    logfile: Path

    @classmethod
    def for_config(cls, cfg: KemariConfig) -> AgentProcess:
        root = cfg.paths.run_dir
        return cls(root / f"ocf-{cfg.vm.name}.pid", root / f"ocf-{cfg.vm.name}.log")

    def pid(self) -> int | None:
        try:
            return int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None

    def alive(self) -> bool:
        pid = self.pid()
        return pid is not None and _alive(pid)

    def spawn(self, argv: list[str]) -> int:
        """Start ``argv`` detached (its own session), output appended to the log.

        Raises:
            OSError: it could not be started.
        """
        self.pidfile.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        env = dict(os.environ)
        env["PATH"] = f"{env.get('PATH', '')}:{_PATH}".strip(":")
        fd = os.open(self.logfile, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=fd,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
                cwd="/",
                env=env,
            )
        finally:
            os.close(fd)
        self.pidfile.write_text(f"{proc.pid}\n")
        return proc.pid

    def kill(self) -> None:
        """SIGKILL the agent's process group (it leads its own session: QEMU dies too)."""
        pid = self.pid()
        if pid is None or not _alive(pid):
            return
        with contextlib.suppress(OSError):
            if os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)

    def forget(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.pidfile.unlink()

    def log_tail(self, n: int = 800) -> str:
        try:
            return self.logfile.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""


__all__ = ["AgentProcess", "Control", "PromotionScore", "SocketControl"]
