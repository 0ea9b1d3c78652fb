"""Check a Debian guest's disk image after a run, without mounting it: ``e2fsck -fn`` and
the records' content read with ``debugfs``.
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from kemari_suite.errors import ImageError
from kemari_suite.vm.buildkit import need_tool, run_step, tail
from kemari_suite.vm.debianfiles import RECORDS_DIR


@dataclass(frozen=True)
class OfflineCheck:
    """What :func:`offline_check` found in a disk image."""

    image: Path
    #: The filesystem is clean and every expected record is there with its content.
    ok: bool
    fsck_clean: bool
    fsck_returncode: int
    fsck_output: str
    #: The image had an unreplayed journal (a crash); it was replayed on a copy first.
    journal_replayed: bool
    missing: tuple[str, ...] = ()
    mismatched: tuple[str, ...] = ()
    #: Every file found in the records directory, by name.
    records: Mapping[str, bytes] = field(default_factory=dict)


def _needs_recovery(image: Path) -> bool:
    dumpe2fs = need_tool("dumpe2fs", "e2fsprogs")
    out = run_step([dumpe2fs, "-h", str(image)], "offline-check", timeout=120)
    for line in out.splitlines():
        if line.startswith("Filesystem features:"):
            return "needs_recovery" in line.split()
    return False


def read_file(image: Path, path: str) -> bytes | None:
    """One file of an ext4 image via ``debugfs -R cat``; None if it does not exist.

    Raises SetupError (no debugfs) or ImageError (the image cannot be opened).
    """
    debugfs = need_tool("debugfs", "e2fsprogs")
    if not path.startswith("/") or any(c in path for c in " \t\n\"'"):
        raise ImageError("offline-check", f"path {path!r}: absolute, without blanks or quotes")
    done = subprocess.run(
        [debugfs, "-R", f"cat {path}", str(image)], capture_output=True, check=False, timeout=120
    )
    err = done.stderr.decode(errors="replace")
    if "not found" in err or "File not found" in err:
        return None
    if done.returncode != 0 or "Bad magic" in err or "No such file" in err:
        raise ImageError("offline-check", f"debugfs {image}: {tail(err)}")
    return done.stdout


def offline_check(
    image: Path,
    records: Mapping[str, bytes] | None = None,
    *,
    records_dir: str = RECORDS_DIR,
    replay_journal: bool = True,
) -> OfflineCheck:
    """Check a guest disk image that no QEMU is using: ``e2fsck -fn`` and the records.

    ``records`` maps names in ``records_dir`` to their expected content (None: only the
    filesystem is checked, but ``records`` of the result still lists what is there).
    The image is never modified. If it has an unreplayed journal (the guest crashed
    or was killed) and ``replay_journal`` is true, a sparse copy gets the journal
    replayed (``e2fsck -E journal_only``) and is checked instead, as the next mount
    would see it; without the replay, e2fsck and debugfs see the pre-journal state.

    Raises:
        SetupError: e2fsprogs tools are missing.
        ImageError: the image does not exist or is not ext4.
    """
    image = Path(image)
    if not image.is_file():
        raise ImageError("offline-check", f"{image} does not exist")
    e2fsck = need_tool("e2fsck", "e2fsprogs")
    debugfs = need_tool("debugfs", "e2fsprogs")
    with tempfile.TemporaryDirectory(prefix="kemari-offline-") as tmp_name:
        tmp = Path(tmp_name)
        target = image
        replayed = False
        if replay_journal and _needs_recovery(image):
            target = tmp / "replayed.img"
            run_step(["cp", "--sparse=always", str(image), str(target)], "offline-check")
            done = subprocess.run(
                [e2fsck, "-E", "journal_only", "-y", str(target)],
                capture_output=True,
                text=True,
                check=False,
                timeout=600,
            )
            if done.returncode >= 4:
                detail = tail(done.stdout + done.stderr)
                msg = f"journal replay exited {done.returncode}: {detail}"
                raise ImageError("offline-check", msg)
            replayed = True
        fsck = subprocess.run(
            [e2fsck, "-fn", str(target)], capture_output=True, text=True, check=False, timeout=600
        )
        fsck_output = (fsck.stdout + fsck.stderr).strip()
        if fsck.returncode >= 8:
            raise ImageError("offline-check", f"e2fsck {image}: {tail(fsck_output)}")

        dump = tmp / "dump"
        dump.mkdir()
        subprocess.run(
            [debugfs, "-R", f"rdump {records_dir} {dump}", str(target)],
            capture_output=True,
            check=False,
            timeout=600,
        )
        found: dict[str, bytes] = {}
        base = dump / Path(records_dir).name
        if base.is_dir():
            for path in sorted(base.rglob("*")):
                if path.is_file():
                    found[str(path.relative_to(base))] = path.read_bytes()
    expected = records or {}
    missing = tuple(sorted(n for n in expected if n not in found))
    mismatched = tuple(sorted(n for n in expected if n in found and found[n] != expected[n]))
    clean = fsck.returncode == 0
    return OfflineCheck(
        image=image,
        ok=clean and not missing and not mismatched,
        fsck_clean=clean,
        fsck_returncode=fsck.returncode,
        fsck_output=fsck_output,
        journal_replayed=replayed,
        missing=missing,
        mismatched=mismatched,
        records=found,
    )


__all__ = ["OfflineCheck", "offline_check", "read_file"]
