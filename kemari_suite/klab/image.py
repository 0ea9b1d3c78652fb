"""The L1 host image of the kernel lab: Debian bookworm and Debian's stock cloud kernel.

::

    cache_dir/klab/<key>/disk.img        raw ext4 root filesystem (no partition table), sparse
    cache_dir/klab/<key>/vmlinuz         the kernel, booted with -kernel (no initramfs)
    cache_dir/klab/<key>/manifest.json   inputs, installed versions, sizes, timings

The build follows :mod:`kemari_suite.vm.debian`: ``debootstrap --variant=minbase`` with
the lab's packages (``--include``: debootstrap resolves their dependencies, so no chroot
and no mounted /proc are needed afterwards), the kernel package from
:mod:`kemari_suite.vm.apt` (downloaded and extracted once into ``cache_dir/debs`` and
``cache_dir/pkgs``, shared with the guest images), its modules copied into the rootfs
and indexed with ``depmod -b``, the files of :mod:`kemari_suite.klab.guestfiles`, then
``mkfs.ext4 -d`` straight from the directory tree: no loop device, no mount. The build
runs in a temporary directory under the cache's lock and is renamed into place
(:func:`kemari_suite.vm.buildkit.publish_build`).

``key`` hashes everything that decides the image: suite, mirror, package list, the
kernel package's exact version, the size, every file written and :data:`BUILD_FORMAT`.
Boot a copy-on-write overlay of ``disk.img`` (see :mod:`kemari_suite.klab.host`), never
the cached file itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kemari_suite.errors import ImageError, SetupError
from kemari_suite.klab.guestfiles import image_files
from kemari_suite.vm.apt import (
    Apt,
    DebPackage,
    ResolutionMemo,
    apt_state_stamp,
    extract_deb,
    resolve_kernel_package,
)
from kemari_suite.vm.buildkit import (
    Progress,
    ext4_image,
    locked,
    need_tool,
    publish_build,
    run_step,
)
from kemari_suite.vm.debian import SUITE, default_mirror

#: Bump when the build steps change in a way the hashed inputs do not show.
BUILD_FORMAT = 1
KERNEL_PACKAGE = "linux-image-cloud-amd64"
#: What an L1 host needs: modules, links, DRBD's tools, the agent's python, filesystems.
DEFAULT_PACKAGES: tuple[str, ...] = (
    "kmod",
    "iproute2",
    "drbd-utils",
    "python3",
    "procps",
    "e2fsprogs",
    "util-linux",
    "iputils-ping",
)
DEFAULT_SIZE_MIB = 1536
#: Left out of the image: caches and lists nobody in the L1 reads.
CLEAN_PATHS = ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man")


@dataclass(frozen=True)
class HostImage:
    """A built L1 image: boot ``kernel`` with an overlay of ``disk`` as its NVMe root."""

    disk: Path
    kernel: Path
    #: The kernel release, e.g. "6.1.0-57-cloud-amd64".
    kernel_version: str
    key: str
    #: True if this call found the image already built and did no work.
    cached: bool
    manifest: dict[str, Any] = field(default_factory=dict)


def image_key(
    *,
    suite: str,
    mirror: str,
    packages: Sequence[str],
    kernel: DebPackage,
    size_mib: int,
    files: Sequence[tuple[str, str, int]],
    build_format: int = BUILD_FORMAT,
) -> str:
    """The cache key of an L1 image: a hex digest over all of its inputs (pure)."""
    h = hashlib.sha256()

    def put(tag: str, value: str) -> None:
        data = value.encode()
        h.update(tag.encode() + len(data).to_bytes(8, "little") + data)

    put("format", str(build_format))
    put("suite", suite)
    put("mirror", mirror)
    for pkg in packages:
        put("package", pkg)
    put("kernel", f"{kernel.name}={kernel.version}")
    put("size", str(size_mib))
    for path, content, mode in files:
        put("file", f"{path}\0{mode:o}\0{content}")
    for path in CLEAN_PATHS:
        put("clean", path)
    return h.hexdigest()[:24]


def _cached(out: Path) -> HostImage | None:
    try:
        data = json.loads((out / "manifest.json").read_text())
        if (out / "disk.img").is_file() and (out / "vmlinuz").is_file():
            return HostImage(
                out / "disk.img", out / "vmlinuz", str(data["kernel_version"]), out.name, True, data
            )
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _mounted_below(path: Path) -> list[str]:
    prefix = str(path.resolve())
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return []
    points = [line.split()[1] for line in lines if len(line.split()) > 1]
    return [p for p in points if p == prefix or p.startswith(prefix + "/")]


def _remove_build(path: Path) -> None:
    """Remove a build directory, never through a mount left by a killed debootstrap."""
    if path.exists() and not _mounted_below(path):
        shutil.rmtree(path, ignore_errors=True)


def _find_kernel(kernel_root: Path) -> tuple[str, Path]:
    found = sorted((kernel_root / "boot").glob("vmlinuz-*"))
    if len(found) != 1:
        raise ImageError("kernel", f"expected one boot/vmlinuz-* in {kernel_root}, got {found}")
    return found[0].name.removeprefix("vmlinuz-"), found[0]


def _write_files(root: Path, files: Sequence[tuple[str, str, int]]) -> None:
    for path, content, mode in files:
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink():
            target.unlink()
        target.write_text(content)
        target.chmod(mode)


def _installed(root: Path) -> dict[str, str]:
    out = run_step(
        [
            "dpkg-query",
            f"--admindir={root / 'var/lib/dpkg'}",
            "-W",
            "-f",
            "${Package} ${Version}\n",
        ],
        "dpkg-query",
    )
    return dict(line.split(" ", 1) for line in out.splitlines() if " " in line)


def resolve_kernel(cache_dir: Path, name: str, note: Progress) -> DebPackage:
    """The versioned kernel package behind ``name`` (remembered while apt is unchanged)."""
    memo = ResolutionMemo(cache_dir / "klab" / "resolved.json", apt_state_stamp())
    pkg = memo.get(name)
    if pkg is None:
        note(f"resolving {name} with apt-cache")
        pkg = resolve_kernel_package(Apt(note), name)
        memo.put(name, pkg, apt_state_stamp())
    return pkg


def build_host_image(
    cache_dir: Path,
    *,
    packages: Sequence[str] = DEFAULT_PACKAGES,
    kernel_package: str = KERNEL_PACKAGE,
    size_mib: int = DEFAULT_SIZE_MIB,
    mirror: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> HostImage:
    """Build (or find in the cache) the L1 host image; ``progress`` gets one line per step.

    Raises:
        SetupError: not root, or debootstrap / mkfs.ext4 / depmod / dpkg-deb is missing.
        ImageError: a build step failed (``step`` names it, with the tail of its output),
            the kernel package is unknown, or the cache is not writable.
    """

    def note(msg: str) -> None:
        if progress is not None:
            progress(msg)

    if size_mib < 512:
        raise ImageError("size", f"{size_mib} MiB is too small for an L1 host")
    cache_dir = Path(cache_dir)
    folder = cache_dir / "klab"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ImageError("cache", f"cannot create {folder}: {err}") from err
    mirror = (mirror or default_mirror()).rstrip("/")
    packages = tuple(packages)
    files = image_files()
    with locked(folder / ".build.lock"):
        kernel_pkg = resolve_kernel(cache_dir, kernel_package, note)
        key = image_key(
            suite=SUITE,
            mirror=mirror,
            packages=packages,
            kernel=kernel_pkg,
            size_mib=size_mib,
            files=files,
        )
        out = folder / key
        hit = _cached(out)
        if hit is not None:
            note(f"L1 image {key} is cached")
            return hit
        if os.geteuid() != 0:
            raise SetupError("debootstrap", "building the L1 image needs root")
        debootstrap = need_tool("debootstrap", "debootstrap")
        mkfs = need_tool("mkfs.ext4", "e2fsprogs")
        depmod = need_tool("depmod", "kmod")
        for stale in folder.glob(".*-*"):
            if stale.is_dir():
                _remove_build(stale)

        t0 = time.monotonic()
        apt = Apt(note)
        deb = apt.download(kernel_pkg, cache_dir / "debs")
        kernel_root = extract_deb(deb, cache_dir / "pkgs", kernel_pkg.file_stem, note)
        kver, vmlinuz = _find_kernel(kernel_root)
        tmp = Path(tempfile.mkdtemp(dir=folder, prefix=f".{key}-"))
        root = tmp / "rootfs"
        try:
            tmp.chmod(0o755)
            note(f"debootstrap --variant=minbase {SUITE} from {mirror} (+ {len(packages)} pkgs)")
            run_step(
                [
                    debootstrap,
                    "--variant=minbase",
                    f"--include={','.join(packages)}",
                    SUITE,
                    str(root),
                    mirror,
                ],
                "debootstrap",
                env={**os.environ, "LC_ALL": "C"},
            )
            t_bootstrap = time.monotonic() - t0
            left = _mounted_below(root)
            if left:
                raise ImageError("debootstrap", f"left mounts behind: {', '.join(left)}")
            note(f"copying the modules of {kver} and running depmod")
            modules = root / "usr/lib/modules" / kver
            shutil.copytree(kernel_root / "lib/modules" / kver, modules, symlinks=True)
            run_step([depmod, "-b", str(root), kver], "depmod")
            if not re.search(r"drbd\.ko", (modules / "modules.dep").read_text()):
                raise ImageError("depmod", f"kernel {kver} has no drbd module")
            note("writing the init, the agent and the DRBD files")
            _write_files(root, files)
            for path in CLEAN_PATHS:
                target = root / path
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                    target.mkdir()
            versions = _installed(root)
            note(f"mkfs.ext4 -d into {size_mib} MiB")
            disk = tmp / "disk.img"
            ext4_image(mkfs, root, disk, size_mib, "klab-root")
            shutil.copyfile(vmlinuz, tmp / "vmlinuz")
            _remove_build(root)
            manifest: dict[str, Any] = {
                "key": key,
                "format": BUILD_FORMAT,
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "suite": SUITE,
                "mirror": mirror,
                "packages": list(packages),
                "kernel_deb": {"name": kernel_pkg.name, "version": kernel_pkg.version},
                "kernel_version": kver,
                "size_mib": size_mib,
                "installed": versions,
                "disk_allocated_bytes": disk.stat().st_blocks * 512,
                "debootstrap_seconds": round(t_bootstrap, 1),
                "build_seconds": round(time.monotonic() - t0, 1),
                "files": {p: hashlib.sha256(c.encode()).hexdigest() for p, c, _ in files},
            }
            publish_build(tmp, out, manifest, _cached)
        except OSError as err:
            raise ImageError("write", f"{out}: {err}") from err
        finally:
            _remove_build(tmp)
        note(f"L1 image {key} built in {manifest['build_seconds']:.0f} s: {out}")
        return HostImage(out / "disk.img", out / "vmlinuz", kver, key, False, manifest)


__all__ = [
    "BUILD_FORMAT",
    "CLEAN_PATHS",
    "DEFAULT_PACKAGES",
    "DEFAULT_SIZE_MIB",
    "KERNEL_PACKAGE",
    "HostImage",
    "build_host_image",
    "image_key",
    "resolve_kernel",
]
