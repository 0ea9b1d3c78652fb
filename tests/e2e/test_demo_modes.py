"""Every file the demo makes is readable by its owner alone.

The real demo path (:func:`kemari_suite.demo.run_demo`: lab, witness, secondary and
primary agents, a guest under QEMU, a kill -9 of the primary and the failover) runs with
its run and shm folders in the test's own place. At two moments (just before the kill,
when the primary's files all exist, and after the secondary resumed the guest) the test
walks those folders: every regular file (guest RAM and its replica, device state,
configs, key files, logs, artifacts, pid files, the console log...) must be mode 0600;
sockets and folders the agents made must have no bit for group or others.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from kemari_suite.config import KemariConfig, PathsConfig
from kemari_suite.demo import run_demo
from tests.conftest import WORKER, needs_root, next_lab_id

pytestmark = [pytest.mark.e2e, needs_root]

#: Demo steps (the start of their progress line) at which the folders are walked.
SNAPSHOT_STEPS = ("kill -9 of the primary", "counter after resume")


def loose_entries(roots: list[Path]) -> tuple[list[str], int]:
    """(what is too open, how many files were looked at) under ``roots``, not the
    roots themselves (the test made them)."""
    bad: list[str] = []
    files = 0
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                try:
                    st = p.lstat()
                except FileNotFoundError:
                    continue  # gone meanwhile (a temporary file, a socket at teardown)
                mode = stat.S_IMODE(st.st_mode)
                if stat.S_ISREG(st.st_mode):
                    files += 1
                    if mode != 0o600:
                        bad.append(f"{p} file {mode:04o}")
                elif (stat.S_ISDIR(st.st_mode) or stat.S_ISSOCK(st.st_mode)) and mode & 0o077:
                    kind = "folder" if stat.S_ISDIR(st.st_mode) else "socket"
                    bad.append(f"{p} {kind} {mode:04o}")
    return bad, files


@pytest.fixture
def short_paths(base_config: KemariConfig) -> Iterator[PathsConfig]:
    """Run and shm folders with short names: the agents' unix sockets (QMP, control)
    live in them and a socket path is at most 107 bytes."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"kdm-{WORKER}-"))
    shm_dir = Path(tempfile.mkdtemp(prefix=f"kdm-{WORKER}-", dir="/dev/shm"))
    try:
        yield PathsConfig(cache_dir=base_config.paths.cache_dir, run_dir=run_dir, shm_dir=shm_dir)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.rmtree(shm_dir, ignore_errors=True)


def test_every_file_the_demo_creates_is_owner_only(
    base_config: KemariConfig, short_paths: PathsConfig
) -> None:
    run_paths = short_paths
    cfg = dataclasses.replace(base_config, paths=run_paths)
    roots = [run_paths.run_dir, run_paths.shm_dir]
    seen: dict[str, tuple[list[str], int]] = {}

    def progress(msg: str) -> None:
        for step in SNAPSHOT_STEPS:
            if msg.startswith(step):
                seen[step] = loose_entries(roots)

    res = run_demo(cfg, lab_id=next_lab_id(), run_seconds=1.0, progress=progress)
    assert res.resumed, res.error or res.timeline
    assert set(seen) == set(SNAPSHOT_STEPS), f"steps not reached: {res.timeline}"
    # The client's outage: the witness lets the standby take over only once the lease
    # ran out, so no answer can come sooner than the heartbeat timeout after the kill.
    assert res.client_outage_ms is not None, res.timeline
    assert res.client_outage_ms >= res.heartbeat_timeout_ms, res.to_dict()
    for step, (bad, files) in seen.items():
        # The run holds configs, keys, logs, artifacts, RAM files: dozens of files.
        assert files >= 15, f"{step}: only {files} files found under {roots}"
        assert not bad, f"{step}: readable by others:\n" + "\n".join(sorted(bad))
