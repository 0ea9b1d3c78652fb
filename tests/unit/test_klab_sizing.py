"""The kernel lab's sizing run: the L1's config and command line (pure)."""

from __future__ import annotations

import tomllib
from pathlib import Path

from kemari_suite.config import load
from kemari_suite.klab.sizing import CONFIG, OUT, l1_config, sizing_command


def test_the_l1_config_names_the_copied_guest_and_probes_the_accelerator(tmp_path: Path) -> None:
    text = l1_config("/var/lib/klab-guest/vmlinuz", "/var/lib/klab-guest/initrd.img")
    data = tomllib.loads(text)
    assert data["image"] == {
        "kernel": "/var/lib/klab-guest/vmlinuz",
        "initrd": "/var/lib/klab-guest/initrd.img",
    }
    assert data["vm"]["accel"] == "auto"
    path = tmp_path / "c.toml"
    path.write_text(text)
    cfg = load(path)  # the engine's own loader accepts it
    assert str(cfg.paths.cache_dir) == "/var/cache/kemari"


def test_the_command_runs_only_the_trackers_part() -> None:
    cmd = sizing_command("/work/main", [128, 1024], 15)
    assert "bench sizing -c " + CONFIG in cmd
    assert "--sizes '' --vm-sizes ''" in cmd
    assert "--tracker-sizes 128,1024 --tracker-samples 15" in cmd
    assert f"--out {OUT}" in cmd and "PYTHONPATH=" in cmd
