"""docs/lab.md, followed literally: the page's ``step:`` blocks run as they are written,
one after the other, as in one shell session, and what they print is checked.

The program is the page's own (a static C program compiled with ``gcc -static``): it
counts, appends every count to a file in the guest and serves count, lines and last
line over TCP. After the primary is killed, the guest answers from the secondary, never
behind what the client saw before, and its file agrees with its memory.

``LAB`` and ``WORK`` come from the worker id and the test's tmp folder; ``KEMARI_RUN``
and ``KEMARI_SHM`` point into private folders, so that the lab's files are this test's.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kemari_suite import lab as labmod
from kemari_suite.config import PathsConfig, load
from kemari_suite.lab import registry
from tests.conftest import needs_root, next_lab_id

pytestmark = [pytest.mark.e2e, needs_root]

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "lab.md"
STEP = re.compile(r"<!-- step: ([\w-]+) -->\n```sh\n(.*?)```", re.S)
ANSWER = re.compile(r"count=(\d+) lines=(\d+) last=(\d+)")


def doc_steps() -> dict[str, str]:
    """The page's ``step:`` blocks by name, in page order."""
    steps = dict(STEP.findall(DOC.read_text()))
    assert steps, f"no step blocks in {DOC}"
    return steps


def test_the_page_has_the_walkthrough_steps() -> None:
    order = ["program", "image", "lab-up", "start", "watch", "read", "kill", "failover"]
    assert list(doc_steps()) == [*order, "verify", "down"]


@dataclass
class Walk:
    lab_id: str
    work: Path
    env: dict[str, str]
    paths: PathsConfig
    steps: dict[str, str]

    def run(self, name: str, timeout: float = 180) -> str:
        """Run step ``name`` in bash (-e) in WORK, with lab.env sourced once it exists
        (the page sources it once, in the user's one shell); returns its stdout."""
        prelude = f'[ -f "{self.work}/configs/lab.env" ] && . "{self.work}/configs/lab.env"\n'
        res = subprocess.run(
            ["bash", "-e", "-c", prelude + self.steps[name]],
            cwd=self.work,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        assert res.returncode == 0, (
            f"step {name} exited {res.returncode}:\n{res.stdout}\n{res.stderr}"
        )
        return res.stdout

    def pid(self, role: str) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int((self.work / f"{role}.pid").read_text())
        return None

    def logs(self) -> str:
        return "".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}\n"
            for p in sorted(self.work.glob("*.log"))
        )


@pytest.fixture
def walk(tmp_path: Path) -> Iterator[Walk]:
    lab_id = next_lab_id()
    work = tmp_path / "walk"
    work.mkdir()
    paths = PathsConfig(
        cache_dir=load(None).paths.cache_dir,
        run_dir=tmp_path / "run",
        shm_dir=Path("/dev/shm") / f"kemari-test-{tmp_path.name}",
    )
    paths.shm_dir.mkdir(exist_ok=True)
    labmod.down(lab_id, paths=paths)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
        "LAB": lab_id,
        "WORK": str(work),
        "KEMARI_RUN": str(paths.run_dir),
        "KEMARI_SHM": str(paths.shm_dir),
    }
    w = Walk(lab_id, work, env, paths, doc_steps())
    try:
        yield w
    finally:
        # The agents this test started, by the PIDs the page wrote down; then the lab.
        for role in ("primary", "secondary", "witness"):
            pid = w.pid(role)
            if pid is not None and _in_lab(pid, lab_id):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        labmod.down(lab_id, paths=paths)
        shutil.rmtree(paths.shm_dir, ignore_errors=True)


def _in_lab(pid: int, lab_id: str) -> bool:
    """The process is still ours: it runs in one of the lab's namespaces."""
    try:
        ns = os.stat(f"/proc/{pid}/ns/net")
    except OSError:
        return False
    for name in labmod.layout(lab_id).namespaces:
        with contextlib.suppress(OSError):
            mount = os.stat(f"/run/netns/{name}")
            if (mount.st_dev, mount.st_ino) == (ns.st_dev, ns.st_ino):
                return True
    return False


def _answer(text: str) -> tuple[int, int, int]:
    m = ANSWER.search(text)
    assert m is not None, f"no answer from the program: {text!r}"
    count, lines, last = (int(x) for x in m.groups())
    return count, lines, last


def _namespace_pids(ns: str) -> list[str]:
    res = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, check=False)
    return res.stdout.split()


def test_walkthrough(walk: Walk) -> None:
    w = walk
    lay = labmod.layout(w.lab_id)

    w.run("program")
    assert (w.work / "ticker").is_file()
    built = w.run("image")
    assert "kernel" in built and "initrd.img" in built

    printed = w.run("lab-up")
    configs = w.work / "configs"
    for role, ns, command in (
        ("witness", lay.ns_client, "witness"),
        ("secondary", lay.ns_secondary, "standby"),
        ("primary", lay.ns_primary, "protect"),
    ):
        line = f"ip netns exec {ns} kemari {command} -c {configs / f'{role}.toml'}"
        assert line in printed, printed
    for port in (
        f"{lay.repl_primary_ip}:7410",
        f"{lay.repl_secondary_ip}:7410",
        f"{lay.lan_client_ip}:7411",
        f"{lay.guest_ip}:8000",
    ):
        assert port in printed, printed
    primary = load(configs / "primary.toml")
    secondary = load(configs / "secondary.toml")
    assert primary.paths.run_dir != secondary.paths.run_dir
    assert primary.paths.shm_dir != secondary.paths.shm_dir
    assert primary.image.add == (f"{w.work}/ticker:/bin/ticker",)
    assert primary.vm.netdev == "" and primary.tap.host_tap == lay.tap_primary
    assert primary.replication.peer == secondary.replication.listen
    # Found without the environment it was made with (the registry).
    rec = registry.lookup(w.lab_id)
    assert rec is not None and rec.run_dir == w.paths.run_dir

    try:
        w.run("start")
        protected = w.run("watch")
        assert "protected" in protected
        before, lines, last = _answer(w.run("read"))
        assert before >= 1 and lines == last == before
        time.sleep(1.0)
        seen, lines, last = _answer(w.run("read"))
        assert seen > before and lines == last == seen, "the program does not go on"

        w.run("kill")
        deadline = time.monotonic() + 10
        while _namespace_pids(lay.ns_primary):
            assert time.monotonic() < deadline, "QEMU outlived its agent"
            time.sleep(0.1)
        assert "active" in w.run("failover")

        after, lines, last = _answer(w.run("verify"))
        assert after >= seen, f"the guest went back: {after} < {seen} seen before the kill"
        assert lines == last == after, f"file and memory disagree: {after}, {lines}, {last}"
        time.sleep(1.0)
        later, lines, last = _answer(w.run("verify"))
        assert later > after and lines == last == later, "the program stopped after failover"
    except BaseException:
        print(w.logs())
        raise

    w.run("down")
    assert w.lab_id not in labmod.list_labs()
    assert registry.lookup(w.lab_id) is None
    for directory in (w.paths.run_dir, w.paths.shm_dir):
        left = [p.name for p in directory.glob(f"kemari-{w.lab_id}-*")]
        assert not left, f"left in {directory}: {left}"
