"""What the image builders share: host tools, build commands, the build lock and the
publishing of a finished build into the cache.

Both builders (:mod:`kemari_suite.vm.image`, :mod:`kemari_suite.vm.debian`) build in a
temporary directory under the cache's lock and rename it into place with
:func:`publish_build`, so a reader never sees half an image.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import subprocess
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from kemari_suite.errors import ImageError, SetupError

Progress = Callable[[str], None]

#: Lines of a failed command's output quoted in its ImageError.
TAIL_LINES = 25


def need_tool(tool: str, package: str) -> str:
    """The path of ``tool``.

    Raises:
        SetupError: it is not installed (naming the Debian package that has it).
    """
    path = shutil.which(tool)
    if path is None:
        raise SetupError(tool, f"`{tool}` not found (apt-get install {package})")
    return path


def tail(text: str, lines: int = TAIL_LINES) -> str:
    """The last ``lines`` lines of ``text`` ("-" when it is empty)."""
    return "\n".join(text.strip().splitlines()[-lines:]) or "-"


def run_step(
    argv: Sequence[str],
    step: str,
    *,
    timeout: float = 1800,
    env: Mapping[str, str] | None = None,
) -> str:
    """Run a build command; its stdout. Raises ImageError(step) with the stderr's tail."""
    try:
        done = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            errors="replace",
            check=False,
            timeout=timeout,
            env=None if env is None else dict(env),
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise ImageError(step, f"`{' '.join(argv)}` failed: {err}") from err
    if done.returncode != 0:
        # debootstrap and apt report some errors on stdout only.
        detail = tail(done.stderr) if done.stderr.strip() else tail(done.stdout)
        raise ImageError(step, f"`{' '.join(argv)}` exited {done.returncode}:\n{detail}")
    return done.stdout


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created with its folder if missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def publish_build(
    tmp: Path, out: Path, manifest: Mapping[str, object], built: Callable[[Path], object]
) -> None:
    """Write ``manifest.json`` into the finished build ``tmp`` and rename it to ``out``.

    Raises:
        OSError: the rename failed and ``built(out)`` finds no complete build there
            (one of the same key that another process finished first is kept).
    """
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    try:
        tmp.rename(out)
    except OSError:
        # Someone else finished the same key first (outside our lock): use theirs.
        if built(out) is None:
            raise


def ext4_image(mkfs: str, root: Path, disk: Path, size_mib: int, label: str) -> None:
    """A raw ext4 image of ``size_mib`` at ``disk`` holding the tree ``root``
    (``mkfs.ext4 -d``: no loop device, no mount), with apt's empty folders in place.

    Raises:
        ImageError: mkfs.ext4 failed (its output quoted).
    """
    # apt expects these to exist if anyone runs it in the guest.
    (root / "var/lib/apt/lists/partial").mkdir(parents=True, exist_ok=True)
    (root / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)
    with disk.open("wb") as fh:
        fh.truncate(size_mib << 20)
    run_step([mkfs, "-q", "-F", "-t", "ext4", "-L", label, "-d", str(root), str(disk)], "mkfs.ext4")


__all__ = [
    "TAIL_LINES",
    "Progress",
    "ext4_image",
    "locked",
    "need_tool",
    "publish_build",
    "run_step",
    "tail",
]
