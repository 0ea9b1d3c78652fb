"""The last ``kemari image build`` output, and the id of any guest image.

``kemari image build`` records what it built in ``cache_dir/last-build.json``::

    {"key": "<image key>", "kernel": "...", "initrd": "...", "kernel_version": "...",
     "recorded_at": "2026-01-01T00:00:00Z"}

An agent whose config leaves ``[image]`` empty boots that image
(:func:`kemari_suite.vm.define.select_image`). Only the command records it: the agents,
benchmarks and tests that build images for themselves leave the record alone, so what
an operator built is what their agents boot.

:func:`image_id_of` names the image behind any kernel and initrd: the build key when
they are a ``kemari image build`` image (``images/<key>/`` with its manifest), else
"sha256:" and a digest of both files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from kemari_suite.errors import ImageError
from kemari_suite.vm.image import GuestImage

LAST_BUILD_FILE = "last-build.json"


@dataclass(frozen=True)
class LastBuild:
    """The recorded output of the last ``kemari image build``."""

    image: GuestImage
    #: When it was recorded (UTC, ISO 8601).
    recorded_at: str

    @property
    def present(self) -> bool:
        """Whether its kernel and initrd are still in the cache."""
        return self.image.kernel.is_file() and self.image.initrd.is_file()


def record_last_build(cache_dir: Path, image: GuestImage) -> Path:
    """Record ``image`` as the last ``kemari image build`` output (atomically).

    Raises:
        ImageError: the record could not be written.
    """
    path = Path(cache_dir) / LAST_BUILD_FILE
    data = {
        "key": image.key,
        "kernel": str(image.kernel),
        "initrd": str(image.initrd),
        "kernel_version": image.kernel_version,
        "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".last-build-")
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(data, indent=2) + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as err:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise ImageError("record", f"cannot write {path}: {err}") from err
    return path


def read_last_build(cache_dir: Path) -> LastBuild | None:
    """The recorded last build, or None when nothing (readable) is recorded.

    The record is returned even when its files are gone (see :attr:`LastBuild.present`),
    so that the caller can say so.
    """
    path = Path(cache_dir) / LAST_BUILD_FILE
    try:
        data = json.loads(path.read_text())
        image = GuestImage(
            kernel=Path(data["kernel"]),
            initrd=Path(data["initrd"]),
            kernel_version=str(data.get("kernel_version", "?")),
            key=str(data["key"]),
            cached=True,
        )
        return LastBuild(image=image, recorded_at=str(data.get("recorded_at", "?")))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _build_key(kernel: Path, initrd: Path | None) -> str | None:
    """The key of a ``kemari image build`` image whose files these are, else None."""
    folder = kernel.parent
    if initrd is not None and initrd.parent != folder:
        return None
    try:
        key = json.loads((folder / "manifest.json").read_text())["key"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return str(key) if key == folder.name else None


def image_id_of(kernel: Path | None, initrd: Path | None) -> str:
    """The id of the image made of ``kernel`` and ``initrd``.

    A build key for a ``kemari image build`` image; else "sha256:" and 24 hex digits over
    both files' contents; "firmware" when there is no kernel (the disk boots itself);
    "missing:<path>" when a file cannot be read.
    """
    if kernel is None:
        return "firmware"
    key = _build_key(kernel, initrd)
    if key is not None:
        return key
    h = hashlib.sha256()
    for tag, path in (("kernel", kernel), ("initrd", initrd)):
        if path is None:
            continue
        h.update(tag.encode())
        try:
            with path.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        except OSError:
            return f"missing:{path}"
    return "sha256:" + h.hexdigest()[:24]


__all__ = [
    "LAST_BUILD_FILE",
    "LastBuild",
    "image_id_of",
    "read_last_build",
    "record_last_build",
]
