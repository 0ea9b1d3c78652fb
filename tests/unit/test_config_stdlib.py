"""Loading a config needs only the standard library: a host venv installed without the
wheel's dependencies (as the deploy test does) must still read its kemari.toml."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

PROBE = """
import sys
sys.modules["tomli_w"] = None  # as if the package were not installed
import kemari_suite.config as c
cfg = c.load(sys.argv[1])
print(cfg.vm.name)
"""


def test_config_loads_without_tomli_w(tmp_path: Path) -> None:
    toml = tmp_path / "k.toml"
    toml.write_text('[vm]\nname = "web1"\n')
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(toml)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "web1"
