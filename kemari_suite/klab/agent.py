"""The host's end of the agent channel: run a command inside an L1, get a :class:`RunResult`.

QEMU exposes the L1's virtio-serial port ``klab.agent`` as a unix socket
(``-chardev socket,server=on,wait=off``); :class:`AgentClient` connects to it and
speaks :mod:`kemari_suite.klab.wire`. One request is in flight at a time (a lock
serialises callers); an answer for another request (a late one, after a host-side
timeout) is dropped.

Lifecycle::

    AgentClient(path) --wait_ready()--> READY --run()...--> READY --close()--> CLOSED
                                          \\-- connection lost / garbage --> FAILED

FAILED and CLOSED are sticky for that client: every call raises :class:`AgentError`.
:meth:`AgentClient.wait_ready` on a FAILED client reconnects (a new Ping, a new
decoder), which is how callers recover after QEMU was restarted.
"""

from __future__ import annotations

import enum
import os
import shlex
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kemari_suite.errors import ProtocolError, VMError
from kemari_suite.klab.wire import Decoder, Done, Message, Ping, Pong, Run, encode


class AgentError(VMError):
    """A command inside an L1 could not be run, timed out, or (with ``check``) failed.

    ``exit_code`` is None when the command never ended (channel lost, no answer).
    """

    def __init__(
        self,
        host: str,
        reason: str,
        *,
        command: str = "",
        exit_code: int | None = None,
        stderr: str = "",
    ) -> None:
        detail = f"`{command}`: {reason}" if command else reason
        if stderr.strip():
            detail += f"\n{stderr.strip()[-2000:]}"
        super().__init__(host, detail)
        self.command = command
        self.exit_code = exit_code
        self.stderr = stderr


@dataclass(frozen=True)
class RunResult:
    """How one command inside an L1 ended."""

    host: str
    command: str
    exit_code: int
    stdout: str
    stderr: str
    #: As measured by the agent inside the L1 (its clock; TCG time, roughly wall time).
    duration_s: float
    timed_out: bool
    truncated: bool

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out

    def check(self) -> RunResult:
        """Self, if the command exited 0. Raises AgentError otherwise."""
        if not self.ok:
            why = "timed out" if self.timed_out else f"exited {self.exit_code}"
            raise AgentError(
                self.host,
                why,
                command=self.command,
                exit_code=self.exit_code,
                stderr=self.stderr or self.stdout,
            )
        return self


class ChannelState(enum.Enum):
    NEW = "new"
    READY = "ready"
    FAILED = "failed"
    CLOSED = "closed"


class AgentClient:
    """Runs commands in the L1 whose agent socket is ``path``.

    ``alive`` (optional) says whether the L1's QEMU still runs: waiting stops at once
    when it turns false.
    """

    def __init__(self, host: str, path: Path, *, alive: Callable[[], bool] | None = None) -> None:
        self.host = host
        self.path = Path(path)
        self._alive = alive
        self._sock: socket.socket | None = None
        self._decoder = Decoder()
        self._lock = threading.Lock()
        self._next_id = 1
        self.state = ChannelState.NEW
        self.state_history: list[ChannelState] = [ChannelState.NEW]
        #: The Pong that made the channel READY (kernel release, L1 uptime).
        self.hello: Pong | None = None

    def _set_state(self, state: ChannelState) -> None:
        self.state = state
        self.state_history.append(state)

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _fail(self, reason: str, command: str = "") -> AgentError:
        self._drop()
        self._set_state(ChannelState.FAILED)
        return AgentError(self.host, reason, command=command)

    def _check_alive(self, what: str) -> None:
        if self._alive is not None and not self._alive():
            raise self._fail(f"QEMU exited while {what}")

    def _receive(self, deadline: float, want: Callable[[Message], bool], what: str) -> Message:
        """Read until a message ``want`` accepts arrives. Raises AgentError at ``deadline``."""
        assert self._sock is not None
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AgentError(self.host, f"no answer while {what}")
            self._check_alive(what)
            self._sock.settimeout(min(left, 1.0))
            try:
                data = self._sock.recv(1 << 16)
            except TimeoutError:
                continue
            except OSError as err:
                raise self._fail(f"channel lost while {what}: {err}") from err
            if not data:
                raise self._fail(f"channel closed while {what}")
            try:
                messages = self._decoder.feed(data)
            except ProtocolError as err:
                raise self._fail(f"garbage on the channel while {what}: {err}") from err
            for msg in messages:
                if want(msg):
                    return msg

    def wait_ready(self, timeout: float = 180.0) -> Pong:
        """Connect and wait until the agent answers a Ping; its Pong.

        Raises:
            AgentError: no answer within ``timeout`` (L1 boot plus agent start), or QEMU
                exited.
        """
        with self._lock:
            if self.state is ChannelState.CLOSED:
                raise AgentError(self.host, "channel closed")
            self._drop()
            deadline = time.monotonic() + timeout
            nonce = int.from_bytes(os.urandom(8), "little")
            while True:
                self._check_alive("waiting for the agent")
                if time.monotonic() > deadline:
                    raise self._fail(f"the agent did not answer within {timeout:.0f} s")
                if self._sock is None:
                    try:
                        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                        sock.connect(str(self.path))
                    except OSError:
                        sock.close()
                        time.sleep(0.2)
                        continue
                    self._sock, self._decoder = sock, Decoder()
                try:
                    self._sock.sendall(encode(Ping(nonce)))
                    pong = self._receive(
                        min(deadline, time.monotonic() + 2.0),
                        lambda m: isinstance(m, Pong) and m.nonce == nonce,
                        "waiting for the agent",
                    )
                except AgentError:
                    if self.state is ChannelState.FAILED:
                        self._set_state(ChannelState.NEW)
                    continue
                except OSError:
                    self._drop()
                    continue
                assert isinstance(pong, Pong)
                self.hello = pong
                self._set_state(ChannelState.READY)
                return pong

    def run(
        self,
        command: str,
        *,
        timeout: float = 120.0,
        stdin: bytes = b"",
        check: bool = True,
    ) -> RunResult:
        """Run ``command`` with ``/bin/sh -c`` inside the L1.

        The agent kills the command's process group after ``timeout`` seconds; the host
        gives up 30 s after that (a loaded TCG L1 can stall).

        Raises:
            AgentError: the channel is not READY or was lost, no answer came, or (with
                ``check``) the command exited non-zero or timed out.
        """
        with self._lock:
            if self.state is not ChannelState.READY or self._sock is None:
                raise AgentError(
                    self.host, f"channel is {self.state.value}, not ready", command=command
                )
            req_id = self._next_id
            self._next_id += 1
            msg = Run(req_id, int(timeout * 1000), command.encode(), stdin)
            try:
                # A large stdin drains at the L1's pace (virtio-serial under TCG): the
                # whole request gets the command's own deadline, not the 1 s read slices.
                self._sock.settimeout(timeout + 30.0)
                self._sock.sendall(encode(msg))
            except OSError as err:
                raise self._fail(f"cannot send: {err}", command) from err
            done = self._receive(
                time.monotonic() + timeout + 30.0,
                lambda m: isinstance(m, Done) and m.req_id == req_id,
                f"running `{command[:60]}`",
            )
        assert isinstance(done, Done)
        result = RunResult(
            host=self.host,
            command=command,
            exit_code=done.exit_code,
            stdout=done.stdout.decode("utf-8", "replace"),
            stderr=done.stderr.decode("utf-8", "replace"),
            duration_s=done.duration_us / 1e6,
            timed_out=bool(done.flags & Done.TIMED_OUT),
            truncated=bool(done.flags & Done.TRUNCATED),
        )
        return result.check() if check else result

    def put_file(self, path: str, data: bytes | str, *, mode: int = 0o644) -> None:
        """Write ``data`` to ``path`` inside the L1 (atomically, parent folders made).

        Raises:
            AgentError: the write failed.
        """
        raw = data.encode() if isinstance(data, str) else data
        q = shlex.quote(path)
        tmp = shlex.quote(f"{path}.klab-tmp")
        self.run(
            f"mkdir -p $(dirname {q}) && cat > {tmp} && chmod {mode:o} {tmp} && mv {tmp} {q}",
            stdin=raw,
        )

    def close(self) -> None:
        with self._lock:
            self._drop()
            if self.state is not ChannelState.CLOSED:
                self._set_state(ChannelState.CLOSED)


__all__ = ["AgentClient", "AgentError", "ChannelState", "RunResult"]
