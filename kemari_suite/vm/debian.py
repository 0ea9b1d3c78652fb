"""A real Debian guest for tests: bookworm minbase + nginx on a raw ext4 disk image.

The image is the guest's whole disk (``/dev/vda``, no partition table). It boots with
the project's usual kernel and initramfs (:func:`kemari_suite.vm.image.build_image`):
the initramfs loads the virtio modules, configures eth0, mounts ``/dev/vda`` and
``switch_root``\\ s into it (``kemari.root=``, see guest/init.sh), where
``/sbin/kemari-init`` (:data:`KEMARI_INIT`) starts nginx::

    initramfs /init  -- kemari.root=/dev/vda -->  switch_root  -->  /sbin/kemari-init
        modules, eth0, "KEMARI-BOOTED"                             nginx (2 workers)
                                                                   "KEMARI-SERVICE-READY"

The service (:data:`NGINX_CONF`), on port 80::

    PUT    /records/<name>   store a record in /srv/records/<name> (201 new, 204 replaced)
    GET    /records/<name>   read it back; GET /records/ lists them (JSON)
    DELETE /records/<name>
    GET    /health           200 "ok"
    PUT    /control/stop     stop nginx, sync, remount / read-only, power off

Ctrl-Alt-Del (QMP ``send-key``) does the same stop without the network. A 201/204 means
the record is in the guest's page cache; with ``rootflags="sync"`` it is on the disk too.

Build and cache::

    cache_dir/debian/<key>/disk.img        raw ext4, sparse
    cache_dir/debian/<key>/manifest.json   inputs, package versions, sizes, timings

``key`` hashes the suite, the mirror, the package list, the image size, every file this
module writes into the image and :data:`BUILD_FORMAT`. Package versions are not part of
it: a point release does not rebuild the image (bump BUILD_FORMAT to force one).

:func:`offline_check` checks a (copy of a) disk image after a run: ``e2fsck -fn`` and
the records' content read with ``debugfs``, without mounting anything.

The guest's files and console markers are in :mod:`kemari_suite.vm.debianfiles`, the
offline check in :mod:`kemari_suite.vm.debiancheck`; both are re-exported here.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kemari_suite.errors import ImageError, SetupError
from kemari_suite.vm.buildkit import (
    Progress,
    ext4_image,
    locked,
    need_tool,
    publish_build,
    run_step,
    tail,
)
from kemari_suite.vm.debiancheck import OfflineCheck, offline_check, read_file
from kemari_suite.vm.debianfiles import (
    CLEAN_PATHS,
    FAILED_MARKER,
    HTTP_PORT,
    IMAGE_FILES,
    KEMARI_INIT,
    NGINX_CONF,
    POLICY_RC_D,
    READY_MARKER,
    RECORDS_DIR,
    ROOT_DEVICE,
    SERVICE_DIRS,
    STOPPED_MARKER,
)
from kemari_suite.vm.image import kernel_cmdline

#: Bump when the build steps change in a way the hashed inputs do not show.
BUILD_FORMAT = 1

SUITE = "bookworm"
#: Debian's ``nginx`` package holds the binary (nginx-light/-core are dependency
#: packages in bookworm); it is built --with-http_dav_module, which the build verifies.
DEFAULT_PACKAGES: tuple[str, ...] = ("nginx",)
DEFAULT_SIZE_MIB = 768
#: Used when no bookworm source can be read from the host's apt configuration.
FALLBACK_MIRROR = "http://deb.debian.org/debian"


@dataclass(frozen=True)
class DebianImage:
    """A built Debian disk image. Boot a *copy* of ``path``: the cached one is shared."""

    path: Path
    key: str
    size_mib: int
    #: True if this call found the image already built and did no work.
    cached: bool
    #: manifest.json: inputs, installed package versions, sizes, build time.
    manifest: Mapping[str, Any] = field(default_factory=dict)


def image_key(
    *,
    suite: str,
    mirror: str,
    packages: Sequence[str],
    size_mib: int,
    files: Sequence[tuple[str, str, int]] = IMAGE_FILES,
    build_format: int = BUILD_FORMAT,
) -> str:
    """The cache key of a Debian image: a hex digest over all of its inputs (pure)."""
    h = hashlib.sha256()

    def put(tag: str, value: bytes) -> None:
        h.update(tag.encode())
        h.update(len(value).to_bytes(8, "little"))
        h.update(value)

    put("format", str(build_format).encode())
    put("suite", suite.encode())
    put("mirror", mirror.encode())
    for pkg in packages:
        put("package", pkg.encode())
    put("size", str(size_mib).encode())
    for path, content, mode in files:
        put("file", path.encode())
        put("mode", str(mode).encode())
        put("content", content.encode())
    for path in SERVICE_DIRS:
        put("service-dir", path.encode())
    for path in CLEAN_PATHS:
        put("clean", path.encode())
    return h.hexdigest()[:24]


# --------------------------------------------------------------------------- mirror


def _suite_matches(suite: str, wanted: str) -> bool:
    return suite == wanted or suite.rstrip("/") == wanted


def mirror_from_sources(
    wanted_suite: str = SUITE,
    list_files: Sequence[Path] | None = None,
) -> str | None:
    """The first ``deb`` URI of the host's apt sources that serves ``wanted_suite``.

    Reads one-line sources (``/etc/apt/sources.list``, ``sources.list.d/*.list``) and
    deb822 ones (``sources.list.d/*.sources``); None if no entry serves the suite. Only
    the base suite counts ("bookworm", not "bookworm-security"): debootstrap needs the
    archive that holds the release.
    """
    if list_files is None:
        d = Path("/etc/apt/sources.list.d")
        list_files = [Path("/etc/apt/sources.list")]
        if d.is_dir():
            list_files += sorted(d.glob("*.list")) + sorted(d.glob("*.sources"))
    for path in list_files:
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.suffix == ".sources":
            found = _mirror_deb822(text, wanted_suite)
        else:
            found = _mirror_one_line(text, wanted_suite)
        if found:
            return found
    return None


def _mirror_one_line(text: str, wanted: str) -> str | None:
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if len(words) < 3 or words[0] != "deb":
            continue
        rest = words[1:]
        if rest[0].startswith("["):  # options: "[arch=amd64 signed-by=...]"
            while rest and not rest[0].endswith("]"):
                rest = rest[1:]
            rest = rest[1:]
        if len(rest) >= 2 and _suite_matches(rest[1], wanted):
            return rest[0].rstrip("/")
    return None


def _mirror_deb822(text: str, wanted: str) -> str | None:
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line or line[0] in " \t":
                continue
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.strip()
        if fields.get("enabled", "yes").lower() == "no":
            continue
        if "deb" not in fields.get("types", "").split():
            continue
        if any(_suite_matches(s, wanted) for s in fields.get("suites", "").split()):
            uris = fields.get("uris", "").split()
            if uris:
                return uris[0].rstrip("/")
    return None


def default_mirror() -> str:
    """$KEMARI_DEBIAN_MIRROR, else the host's bookworm source, else deb.debian.org."""
    return (
        os.environ.get("KEMARI_DEBIAN_MIRROR") or mirror_from_sources() or FALLBACK_MIRROR
    ).rstrip("/")


_CHROOT_ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "DEBIAN_FRONTEND": "noninteractive",
    "LC_ALL": "C",
    "HOME": "/root",
}


def _chroot(root: Path, argv: Sequence[str], step: str) -> str:
    return run_step(["chroot", str(root), *argv], step, env=_CHROOT_ENV)


def _mount_points() -> list[str]:
    """Mount points of this mount namespace (octal escapes decoded)."""
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return []
    points = []
    for line in lines:
        parts = line.split()
        if len(parts) >= 2:
            points.append(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), parts[1]))
    return points


def _unmount_below(path: Path) -> list[str]:
    """Unmount everything mounted at or below ``path`` (deepest first); what stays."""
    prefix = str(path.resolve())
    for point in sorted(
        (p for p in _mount_points() if p == prefix or p.startswith(prefix + "/")),
        key=len,
        reverse=True,
    ):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)
    return [p for p in _mount_points() if p == prefix or p.startswith(prefix + "/")]


def _remove_tree(path: Path) -> None:
    """rmtree, but never into a mounted filesystem (a leftover /proc in a chroot).

    Raises ImageError if something below ``path`` cannot be unmounted.
    """
    if not path.exists():
        return
    left = _unmount_below(path)
    if left:
        raise ImageError("cleanup", f"cannot unmount {', '.join(left)}; not removing {path}")
    shutil.rmtree(path, ignore_errors=True)


def _sweep_stale(folder: Path) -> None:
    """Remove temporary build directories of killed builds (called with the lock held)."""
    for entry in folder.iterdir():
        if entry.name.startswith(".") and entry.is_dir():
            try:
                _remove_tree(entry)
            except ImageError:
                pass  # Left for an operator: better than deleting through a mount.


# --------------------------------------------------------------------------- build


def _cached(out: Path) -> DebianImage | None:
    disk, manifest = out / "disk.img", out / "manifest.json"
    if not (disk.is_file() and manifest.is_file()):
        return None
    try:
        data = json.loads(manifest.read_text())
        return DebianImage(disk, str(data["key"]), int(data["size_mib"]), True, data)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write(root: Path, path: str, content: str, mode: int) -> None:
    target = root / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink():
        target.unlink()  # e.g. /etc/resolv.conf: never write through a link to the host
    target.write_text(content)
    target.chmod(mode)


def _www_data_ids(root: Path) -> tuple[int, int]:
    """uid and gid of www-data in the image's /etc/passwd. Raises ImageError."""
    for line in (root / "etc" / "passwd").read_text().splitlines():
        parts = line.split(":")
        if len(parts) > 3 and parts[0] == "www-data":
            return int(parts[2]), int(parts[3])
    raise ImageError("configure", "no www-data user in the image (is nginx installed?)")


def _install(root: Path, packages: Sequence[str], note: Progress) -> None:
    policy = root / "usr" / "sbin" / "policy-rc.d"
    _write(root, "/usr/sbin/policy-rc.d", POLICY_RC_D, 0o755)
    proc = root / "proc"
    run_step(["mount", "-t", "proc", "proc", str(proc)], "mount proc")
    try:
        note("apt-get update in the chroot")
        _chroot(root, ["apt-get", "update", "-q"], "apt-get update")
        note(f"installing {' '.join(packages)}")
        _chroot(
            root,
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages],
            "apt-get install",
        )
        _chroot(root, ["apt-get", "clean"], "apt-get clean")
    finally:
        subprocess.run(["umount", str(proc)], capture_output=True, check=False)
        policy.unlink(missing_ok=True)
    if _unmount_below(proc):
        raise ImageError("umount proc", f"{proc} is still mounted")


def _verify_nginx(root: Path) -> str:
    """nginx -V of the image; raises ImageError unless it has the WebDAV module."""
    done = subprocess.run(
        ["chroot", str(root), "nginx", "-V"],
        capture_output=True,
        text=True,
        check=False,
        env=_CHROOT_ENV,
    )
    info = done.stderr + done.stdout  # nginx -V prints to stderr
    if done.returncode != 0:
        raise ImageError("verify", f"nginx -V exited {done.returncode}:\n{tail(info)}")
    if "--with-http_dav_module" not in info:
        raise ImageError("verify", "the image's nginx lacks --with-http_dav_module (PUT)")
    first = info.strip().splitlines()[0] if info.strip() else "nginx"
    return first.split(":", 1)[-1].strip()


def _package_versions(root: Path) -> dict[str, str]:
    out = _chroot(root, ["dpkg-query", "-W", "-f", "${Package} ${Version}\n"], "dpkg-query")
    versions = {}
    for line in out.splitlines():
        name, _, version = line.partition(" ")
        versions[name] = version
    return versions


def _tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def build_debian_image(
    cache_dir: Path,
    *,
    size_mib: int = DEFAULT_SIZE_MIB,
    packages: Sequence[str] = DEFAULT_PACKAGES,
    mirror: str | None = None,
    progress: Progress | None = None,
) -> DebianImage:
    """Build (or find in the cache) the Debian + nginx disk image.

    ``mirror`` defaults to :func:`default_mirror`. The build runs debootstrap
    (--variant=minbase), apt-get install in a chroot (nothing starts: policy-rc.d),
    writes :data:`IMAGE_FILES`, cleans caches and makes the filesystem with
    ``mkfs.ext4 -d`` straight from the directory tree: no loop device, no mount.
    It takes the cache's Debian lock, builds in a temporary directory and renames it
    into ``cache_dir/debian/<key>/``; a second call returns at once with cached=True.

    Raises:
        SetupError: not root, or debootstrap / mkfs.ext4 / chroot is missing.
        ImageError: a build step failed (``step`` names it, the message ends with the
            tail of its stderr), nginx lacks WebDAV, or the cache is not writable.
    """

    def note(msg: str) -> None:
        if progress is not None:
            progress(msg)

    if size_mib < 64:
        raise ImageError("size", f"{size_mib} MiB is too small for a Debian system")
    if not packages:
        raise ImageError("packages", "no service packages given")
    cache_dir = Path(cache_dir)
    mirror = (mirror or default_mirror()).rstrip("/")
    packages = tuple(packages)
    key = image_key(suite=SUITE, mirror=mirror, packages=packages, size_mib=size_mib)
    folder = cache_dir / "debian"
    out = folder / key
    hit = _cached(out)
    if hit is not None:
        note(f"debian image {key} is cached")
        return hit

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ImageError("cache", f"cannot create {folder}: {err}") from err

    with locked(folder / ".build.lock"):
        hit = _cached(out)  # built by another process while we waited for the lock
        if hit is not None:
            note(f"debian image {key} is cached")
            return hit
        if os.geteuid() != 0:
            raise SetupError("debootstrap", "building the Debian image needs root (chroot)")
        debootstrap = need_tool("debootstrap", "debootstrap")
        mkfs = need_tool("mkfs.ext4", "e2fsprogs")
        need_tool("chroot", "coreutils")
        _sweep_stale(folder)

        t0 = time.monotonic()
        tmp = Path(tempfile.mkdtemp(dir=folder, prefix=f".{key}-"))
        root = tmp / "rootfs"
        try:
            tmp.chmod(0o755)  # mkdtemp makes it 0700; QEMU may run as another user
            note(f"debootstrap --variant=minbase {SUITE} from {mirror}")
            run_step(
                [debootstrap, "--variant=minbase", SUITE, str(root), mirror],
                "debootstrap",
                env={**os.environ, "LC_ALL": "C"},
            )
            t_bootstrap = time.monotonic() - t0
            _install(root, packages, note)
            nginx_version = _verify_nginx(root)
            versions = _package_versions(root)

            note("writing the service configuration")
            for path, content, mode in IMAGE_FILES:
                _write(root, path, content, mode)
            uid, gid = _www_data_ids(root)
            for path in SERVICE_DIRS:
                d = root / path.lstrip("/")
                d.mkdir(parents=True, exist_ok=True)
                os.chown(d, uid, gid)
            for path in CLEAN_PATHS:
                target = root / path.lstrip("/")
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
            rootfs_bytes = _tree_bytes(root)

            note(f"mkfs.ext4 -d: {rootfs_bytes >> 20} MiB of files into {size_mib} MiB")
            disk = tmp / "disk.img"
            ext4_image(mkfs, root, disk, size_mib, "kemari-root")
            _remove_tree(root)
            build_s = time.monotonic() - t0
            manifest: dict[str, Any] = {
                "key": key,
                "format": BUILD_FORMAT,
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "suite": SUITE,
                "mirror": mirror,
                "packages": list(packages),
                "size_mib": size_mib,
                "nginx": nginx_version,
                "installed": versions,
                "rootfs_bytes": rootfs_bytes,
                "disk_allocated_bytes": disk.stat().st_blocks * 512,
                "debootstrap_seconds": round(t_bootstrap, 1),
                "build_seconds": round(build_s, 1),
                "files": {p: hashlib.sha256(c.encode()).hexdigest() for p, c, _ in IMAGE_FILES},
            }
            publish_build(tmp, out, manifest, _cached)
        except OSError as err:
            raise ImageError("write", f"{out}: {err}") from err
        finally:
            _remove_tree(tmp)
        note(f"debian image {key} built in {build_s:.0f} s: {out / 'disk.img'}")
        return DebianImage(out / "disk.img", key, size_mib, False, manifest)


def debian_cmdline(
    *,
    ip: str | None = None,
    gw: str | None = None,
    root: str = ROOT_DEVICE,
    rootflags: str | None = None,
    extra: str = "",
) -> str:
    """The kernel command line that boots the initramfs into the Debian disk.

    ``rootflags`` are ext4 mount options (e.g. "sync": a 201 then means on disk).
    Raises ImageError as :func:`kemari_suite.vm.image.kernel_cmdline` does.
    """
    return kernel_cmdline(
        ip=ip, gw=gw, root=root, rootinit=KEMARI_INIT, rootflags=rootflags, extra=extra
    )


__all__ = [
    "DEFAULT_PACKAGES",
    "DEFAULT_SIZE_MIB",
    "FAILED_MARKER",
    "HTTP_PORT",
    "KEMARI_INIT",
    "NGINX_CONF",
    "READY_MARKER",
    "RECORDS_DIR",
    "ROOT_DEVICE",
    "STOPPED_MARKER",
    "DebianImage",
    "OfflineCheck",
    "build_debian_image",
    "debian_cmdline",
    "default_mirror",
    "image_key",
    "mirror_from_sources",
    "offline_check",
    "read_file",
]
