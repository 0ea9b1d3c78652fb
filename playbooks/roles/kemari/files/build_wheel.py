#!/usr/bin/env python3
"""Build the kemari wheel from a checkout, once per distinct source tree.

Usage: build_wheel.py SOURCE_DIR OUT_DIR [--no-build-isolation]

Prints one JSON object: ``{"changed": bool, "wheel": PATH, "version": STR}``.

* The sources (``pyproject.toml``, ``README.md``, the ``kemari_suite`` package, minus
  caches) are hashed. When ``OUT_DIR`` already holds the wheel of that hash, nothing is
  built and ``changed`` is false: a second playbook run changes nothing.
* Otherwise they are copied into a private directory and built there with
  ``pip wheel --no-deps`` (never in the checkout: setuptools writes ``build/`` and
  ``*.egg-info`` next to the sources, and two builds at once would race there).
* The copy's version gets a local label with the hash (``0.1.0+src.1a2b3c4d5e6f``), so
  ``pip install`` on a host replaces an older build of the same release, and
  ``pip show kemari-suite`` on a host tells which sources it runs.
* ``SOURCE_DATE_EPOCH`` is fixed, so the same sources give the same wheel bytes.

Standard library only: it runs with the controller's Python before anything of the
suite is known to be importable.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

TOP_FILES = ("pyproject.toml", "README.md", "setup.cfg", "setup.py", "MANIFEST.in", "LICENSE")
PACKAGE = "kemari_suite"
SKIP_DIRS = {"__pycache__", ".mypy_cache", ".pytest_cache", ".ruff_cache"}
SKIP_SUFFIXES = (".pyc", ".pyo", ".so.tmp")
#: 1980-01-01, the earliest time a zip file can record.
EPOCH = "315532800"
_VERSION = re.compile(r'^(version\s*=\s*")([^"+]+)(?:\+[^"]*)?(")', re.MULTILINE)


def source_files(src: Path) -> list[Path]:
    files = [src / name for name in TOP_FILES if (src / name).is_file()]
    for root, dirs, names in os.walk(src / PACKAGE):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info"))
        files.extend(Path(root) / n for n in sorted(names) if not n.endswith(SKIP_SUFFIXES))
    return files


def digest(src: Path, files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        rel = f.relative_to(src).as_posix().encode()
        data = f.read_bytes()
        h.update(len(rel).to_bytes(4, "big") + rel + len(data).to_bytes(8, "big") + data)
    return h.hexdigest()[:12]


def main(argv: list[str]) -> int:
    args = [a for a in argv if not a.startswith("--")]
    if len(args) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    src, out = Path(args[0]).resolve(), Path(args[1]).resolve()
    if not (src / "pyproject.toml").is_file() or not (src / PACKAGE).is_dir():
        print(f"{src} is not a Kemari Suite checkout (no pyproject.toml or {PACKAGE}/)",
              file=sys.stderr)  # fmt: skip
        return 2
    files = source_files(src)
    tag = digest(src, files)
    out.mkdir(parents=True, exist_ok=True)
    have = sorted(out.glob(f"kemari_suite-*+src.{tag}-*.whl"))
    if have:
        print(json.dumps({"changed": False, "wheel": str(have[0]), "tag": tag}))
        return 0
    with tempfile.TemporaryDirectory(prefix=".build-", dir=out) as tmp:
        work = Path(tmp) / "src"
        for f in files:
            dest = work / f.relative_to(src)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dest)
        pyproject = work / "pyproject.toml"
        text, n = _VERSION.subn(rf"\g<1>\g<2>+src.{tag}\g<3>", pyproject.read_text(), count=1)
        if n != 1:
            print('no static `version = "..."` in pyproject.toml', file=sys.stderr)
            return 2
        pyproject.write_text(text)
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "-q"]
        if "--no-build-isolation" in argv:
            cmd.append("--no-build-isolation")
        cmd += ["-w", str(Path(tmp) / "dist"), str(work)]
        env = dict(os.environ, SOURCE_DATE_EPOCH=EPOCH, PIP_DISABLE_PIP_VERSION_CHECK="1")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout + proc.stderr)
            print(f"`{' '.join(cmd)}` exited {proc.returncode}", file=sys.stderr)
            return 1
        (built,) = (Path(tmp) / "dist").glob("*.whl")
        for old in out.glob("kemari_suite-*.whl"):
            old.unlink()
        final = out / built.name
        shutil.move(str(built), final)
    print(json.dumps({"changed": True, "wheel": str(final), "tag": tag}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
