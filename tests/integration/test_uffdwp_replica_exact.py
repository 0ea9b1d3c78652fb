"""The uffd-wp tracker's fastest path keeps a replica exact, in stock QEMU under TCG.

The product's defaults with uffd-wp: pre-copy passes every
``replication.precopy_period_ms`` while the guest runs, and (``stage_during_capture``)
the staging beside QEMU's device-state capture, with a rescan after it. The
:class:`~kemari_suite.checkpoint.verifying.VerifyingTracker` cannot check that path (a
checker with a shadow scans only after the capture), so this test checks the result
instead: a replica built only from what the window and the passes staged must equal
guest RAM byte for byte at every stop, while the guest dirties memory at random.
"""

from __future__ import annotations

import asyncio

import numpy as np

from kemari_suite.bench.memsync import initial_sync, product_window, stage_and_commit
from kemari_suite.checkpoint.window import StoppedWindow
from kemari_suite.config import KemariConfig, PathsConfig, with_overrides

# The same guest, fixture and marks (root, a kernel with uffd-wp) as the verified runs.
from tests.integration.test_uffdwp_qemu import guest, paths, pytestmark  # noqa: F401

SYNC_POINTS = 20


def _pass(window: StoppedWindow, replica: np.ndarray) -> int:
    """One pre-copy pass (scan, stage, commit), applied to the replica as the
    secondary applies what it receives."""
    k = window.tracker.scan(window.pages, out=window.index, threads=1)

    def apply(idx: np.ndarray, staged: np.ndarray) -> None:
        replica[idx] = staged

    stage_and_commit(window, window.index[:k].copy(), apply)
    return k


async def _check_exact(cfg: KemariConfig, where: PathsConfig) -> tuple[int, int, bool]:
    run = "memdirty -m 24 -r 30000 -P compressible & memdirty -m 8 -r 20000 -P random"
    # One vCPU: the verified runs cover two; this test adds no second busy guest thread.
    async with guest(cfg, where, "kwx", run, vcpus=1) as vm:
        with product_window(vm, cfg, tracker="uffd-wp") as window:
            assert window.tracker.name == "uffd-wp"
            await initial_sync(window)  # armed: every write from here on is reported
            replica = window.pages.copy()
            precopied = staged_total = 0
            for _ in range(SYNC_POINTS):
                for _ in range(3):
                    await asyncio.sleep(0.025)
                    precopied += await asyncio.to_thread(_pass, window, replica)
                res = await window.run(resume=False)
                assert res.staged is not None, "a spill: the staging buffer was too small"
                replica[res.idx] = res.staged
                staged_total += len(res.idx)
                differ = np.flatnonzero(np.any(replica != window.pages, axis=1))
                assert len(differ) == 0, f"replica differs from RAM in pages {differ[:10]}"
                window.tracker.commit(res.idx, res.staged)
                await window.cont()
            return precopied, staged_total, window.early_stage


def test_precopy_and_staging_beside_the_capture_keep_the_replica_exact(
    base_config: KemariConfig,
    paths: PathsConfig,  # noqa: F811
) -> None:
    cfg = with_overrides(
        base_config,
        paths={"run_dir": str(paths.run_dir)},
        replication={"stage_during_capture": True, "precopy_period_ms": 25},
    )
    precopied, staged, early = asyncio.run(_check_exact(cfg, paths))
    assert early, "the window did not stage beside the capture"
    assert precopied > 0 and staged > 0, (precopied, staged)
