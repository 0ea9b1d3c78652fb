"""Shared fixtures: names derived from the pytest-xdist worker, teardown always."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kemari_suite.config import KemariConfig, PathsConfig, load

WORKER = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
# Every lab pair the tests start checks its dirty-page tracker against the compare
# tracker at every scan: a page the tracker misses fails that sync point (see
# kemari_suite/checkpoint/verifying.py). Unset it to run the pairs as they ship.
os.environ.setdefault("KEMARI_TRACKER_VERIFY", "1")
# Slots 20..29 are this file's (test_lab.py counts up from 0, the tap tests use 10..19,
# the deploy tests 30..35). Labs are torn down after each test, so the slots cycle.
_slots = itertools.cycle(range(20, 30))

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, QEMU)")


def next_lab_id() -> str:
    from kemari_suite.lab import worker_lab_id

    return worker_lab_id(WORKER, next(_slots))


@pytest.fixture(scope="session")
def base_config() -> KemariConfig:
    """Defaults, with the shared image cache (built once by `make test`)."""
    return load(None)


@pytest.fixture
def run_paths(tmp_path: Path, base_config: KemariConfig) -> PathsConfig:
    run_dir, shm_dir = tmp_path / "run", Path("/dev/shm") / f"kemari-test-{tmp_path.name}"
    run_dir.mkdir()
    shm_dir.mkdir(exist_ok=True)
    yield PathsConfig(cache_dir=base_config.paths.cache_dir, run_dir=run_dir, shm_dir=shm_dir)
    import shutil

    shutil.rmtree(shm_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def guest_image(base_config: KemariConfig):  # type: ignore[no-untyped-def]
    from kemari_suite.vm.define import ensure_image

    return ensure_image(base_config)


@pytest.fixture
def lab_factory() -> Iterator[Callable[..., object]]:
    """Bring up labs for one test; every one of them is torn down afterwards."""
    from kemari_suite import lab

    made: list[str] = []

    def make(profile: str = "1g") -> lab.LabLayout:
        lab_id = next_lab_id()
        lab.down(lab_id)
        made.append(lab_id)
        return lab.up(lab_id, profile)

    yield make
    for lab_id in made:
        lab.down(lab_id)
