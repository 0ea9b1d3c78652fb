"""Build a bootable guest (kernel + initramfs) from Debian packages, cached by content.

A guest is Debian's ``linux-image-*-cloud-amd64`` kernel, a busybox-static initramfs,
the virtio modules of the same kernel package, the static workload programs compiled
from ``guest/workloads/*.c`` and the ``/init`` script ``guest/init.sh``::

    cache_dir/
      debs/<pkg>_<version>_<arch>.deb         apt-get download
      pkgs/<pkg>_<version>_<arch>/            dpkg-deb -x
      images/<key>/vmlinuz, initrd.img, manifest.json

``key`` is :func:`image_key` over everything that goes into the image (package versions,
init template, workload sources, gcc version, extra files, init command). A build with
the same inputs returns the existing image at once (``cached=True``); a new image is
built in a temporary directory and renamed into place, under a lock on the cache.

Inside the initramfs::

    /init                      guest/init.sh
    /bin/busybox               from busybox-static, with a symlink per applet
    /bin/counter, ...          one static binary per guest/workloads/*.c
    /lib/modules/<kver>/*.ko   virtio modules, dependencies first, uncompressed
    /etc/kemari/modules        the order in which init loads them
    /etc/kemari/run            the baked-in init command (absent if none)

The kernel command line for it comes from :func:`kernel_cmdline`. The Debian packages
come through :mod:`kemari_suite.vm.apt`, the modules and the cpio archive from
:mod:`kemari_suite.vm.initramfs`; both are re-exported here.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from kemari_suite.errors import ImageError, SetupError
from kemari_suite.vm.apt import (
    APT_STATE_PATHS,
    Apt,
    DebPackage,
    ResolutionMemo,
    apt_state_stamp,
    extract_deb,
    kernel_dependency,
    parse_control,
    resolve_kernel_package,
    resolve_package,
)
from kemari_suite.vm.buildkit import Progress, locked, need_tool, publish_build
from kemari_suite.vm.initramfs import Archive, ModulePlan, gzip_bytes, modinfo_depends, plan_modules

#: Bump when the layout of the initramfs changes in a way the other inputs do not show.
BUILD_FORMAT = 1

BUSYBOX_PACKAGE = "busybox-static"

#: Modules init loads, in this order (each one's dependencies are loaded before it).
#: Built-in ones (modules.builtin) are skipped, so are ones the kernel does not ship.
VIRTIO_MODULES: tuple[str, ...] = (
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
    "failover",
    "net_failover",
    "virtio_net",
)

#: The kernel command line always carries these: serial console, no reboot loop on
#: panic (with QEMU's -no-reboot the VM exits), and options that cut TCG boot time.
BASE_CMDLINE = (
    "console=ttyS0",
    "panic=-1",
    "quiet",
    "edd=off",
    "mitigations=off",
    "no_timer_check",
    "tsc=reliable",
    "8250.nr_uarts=1",
    "i8042.noaux",
    "i8042.nopnp",
    "i8042.dumbkbd",
    "random.trust_cpu=on",
)

#: Bytes kemari.run may carry as they are; everything else is %HH-encoded.
_RUN_SAFE = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._/,:=+-")

#: x86 COMMAND_LINE_SIZE is 2048 including the terminating NUL.
MAX_CMDLINE = 2047


@dataclass(frozen=True)
class GuestImage:
    """A built guest: boot it with ``-kernel kernel -initrd initrd``."""

    kernel: Path
    initrd: Path
    #: The kernel release, e.g. "6.1.0-56-cloud-amd64" (the lib/modules directory).
    kernel_version: str
    #: The content hash naming images/<key>/.
    key: str
    #: True if this call found the image already built and did no work.
    cached: bool


@dataclass(frozen=True)
class ExtraFile:
    """A host file copied into the initramfs (``--add SRC:DEST``)."""

    dest: str
    data: bytes
    mode: int


@dataclass(frozen=True)
class ImageInputs:
    """Everything that decides the bytes of an image; :func:`image_key` hashes it."""

    kernel_package: str
    kernel_package_version: str
    busybox_version: str
    gcc_version: str
    init_template: bytes
    #: (file name, content) of every file in guest/workloads, sorted by name.
    workload_sources: tuple[tuple[str, bytes], ...]
    extras: tuple[ExtraFile, ...] = ()
    init_command: str = ""
    modules: tuple[str, ...] = VIRTIO_MODULES
    build_format: int = BUILD_FORMAT


def image_key(inputs: ImageInputs) -> str:
    """The cache key of an image: a hex digest over all of ``inputs``.

    Pure and stable across processes and Python versions: every field is written with
    an explicit tag and length, so no two different inputs share a byte stream.
    """
    h = hashlib.sha256()

    def put(tag: str, value: bytes) -> None:
        h.update(tag.encode())
        h.update(len(value).to_bytes(8, "little"))
        h.update(value)

    put("format", str(inputs.build_format).encode())
    put("kernel", inputs.kernel_package.encode())
    put("kernel-version", inputs.kernel_package_version.encode())
    put("busybox", inputs.busybox_version.encode())
    put("gcc", inputs.gcc_version.encode())
    put("init-template", inputs.init_template)
    for name, content in sorted(inputs.workload_sources):
        put("workload-name", name.encode())
        put("workload", content)
    for extra in inputs.extras:
        put("extra-dest", extra.dest.encode())
        put("extra-mode", str(extra.mode).encode())
        put("extra", extra.data)
    put("init", inputs.init_command.encode())
    put("modules", ",".join(inputs.modules).encode())
    return h.hexdigest()[:24]


# --------------------------------------------------------------------------- specs


def parse_add(spec: str) -> tuple[Path, str]:
    """Split ``"SRC:DEST"`` into the host file and the absolute path in the initramfs.

    The split is on the last colon (DEST is absolute, so it starts with "/").
    Raises ImageError naming the spec if it is malformed, DEST is not a clean absolute
    path, or SRC is not an existing regular file.
    """
    src, sep, dest = spec.rpartition(":")
    if not sep or not src or not dest:
        raise ImageError("add", f"{spec!r}: expected SRC:DEST")
    if not dest.startswith("/") or dest.endswith("/"):
        raise ImageError("add", f"{spec!r}: DEST must be an absolute file path")
    parts = dest.strip("/").split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ImageError("add", f"{spec!r}: DEST must not contain empty, '.' or '..' parts")
    path = Path(src).expanduser()
    if not path.exists():
        raise ImageError("add", f"{spec!r}: {src} does not exist")
    if not path.is_file():
        raise ImageError("add", f"{spec!r}: {src} is not a regular file")
    return path, "/" + "/".join(parts)


def encode_run(command: str) -> str:
    """Percent-encode a command for ``kemari.run=`` (init decodes it)."""
    return "".join(chr(b) if b in _RUN_SAFE else f"%{b:02X}" for b in command.encode())


#: kemari.root / kemari.rootinit / kemari.rootflags values: init.sh splits the command
#: line on whitespace and passes them to mount and switch_root without decoding.
_ROOT_DEVICE = re.compile(r"^/dev/[A-Za-z0-9._/-]+$")
_ROOT_INIT = re.compile(r"^/[A-Za-z0-9._/-]+$")
_ROOT_FLAGS = re.compile(r"^[A-Za-z0-9_=,.-]+$")


def kernel_cmdline(
    *,
    ip: str | None = None,
    gw: str | None = None,
    run: str | None = None,
    extra: str = "",
    root: str | None = None,
    rootinit: str | None = None,
    rootflags: str | None = None,
) -> str:
    """The guest kernel command line.

    ``ip`` is "A.B.C.D/NN" for eth0, ``gw`` the default gateway, ``run`` a command for
    init to run instead of the baked-in one (percent-encoded here), ``extra`` is appended
    verbatim. ``root`` (a block device such as "/dev/vda") makes init mount that ext4
    filesystem and switch_root into it, running ``rootinit`` there (init's default is
    /sbin/kemari-init) with the mount options ``rootflags`` (default "rw"); see
    kemari_suite/vm/debian.py. Raises ImageError on a malformed address, root device,
    init path or flags, or a command line over 2047 bytes.
    """
    parts = list(BASE_CMDLINE)
    if ip is not None:
        if "/" not in ip:
            raise ImageError("cmdline", f"kemari.ip {ip!r}: expected A.B.C.D/NN")
        try:
            ipaddress.IPv4Interface(ip)
        except ValueError as err:
            raise ImageError("cmdline", f"kemari.ip {ip!r}: {err}") from err
        parts.append(f"kemari.ip={ip}")
    if gw is not None:
        try:
            ipaddress.IPv4Address(gw)
        except ValueError as err:
            raise ImageError("cmdline", f"kemari.gw {gw!r}: {err}") from err
        parts.append(f"kemari.gw={gw}")
    if run:
        parts.append(f"kemari.run={encode_run(run)}")
    for name, value, rx in (
        ("root", root, _ROOT_DEVICE),
        ("rootinit", rootinit, _ROOT_INIT),
        ("rootflags", rootflags, _ROOT_FLAGS),
    ):
        if value is None:
            continue
        if not rx.match(value) or "/../" in f"{value}/":
            raise ImageError("cmdline", f"kemari.{name} {value!r}: not a plain {rx.pattern}")
        parts.append(f"kemari.{name}={value}")
    if (rootinit is not None or rootflags is not None) and root is None:
        raise ImageError("cmdline", "kemari.rootinit and kemari.rootflags need kemari.root")
    if extra.strip():
        parts.append(extra.strip())
    line = " ".join(parts)
    if len(line.encode()) > MAX_CMDLINE:
        raise ImageError("cmdline", f"{len(line.encode())} bytes, the kernel takes {MAX_CMDLINE}")
    return line


# --------------------------------------------------------------------------- guest sources


def guest_dir() -> Path:
    """Where init.sh and workloads/ live: $KEMARI_GUEST_DIR, else the package's guest/.

    They ship inside the package (package data), so a wheel installed on a host builds
    the same images as a checkout.
    """
    env = os.environ.get("KEMARI_GUEST_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "guest"


@dataclass(frozen=True)
class GuestSources:
    init_template: bytes
    #: (file name, content) of every file in workloads/ (.c sources and headers).
    workloads: tuple[tuple[str, bytes], ...]
    workloads_dir: Path


def load_guest_sources(root: Path) -> GuestSources:
    """Read init.sh and workloads/*. Raises ImageError if they are missing."""
    init = root / "init.sh"
    wl = root / "workloads"
    if not init.is_file() or not wl.is_dir():
        raise ImageError("sources", f"{root} lacks init.sh or workloads/ (set KEMARI_GUEST_DIR)")
    files = tuple(
        (p.name, p.read_bytes())
        for p in sorted(wl.iterdir())
        if p.is_file() and p.suffix in (".c", ".h")
    )
    if not any(name.endswith(".c") for name, _ in files):
        raise ImageError("sources", f"no workload sources in {wl}")
    return GuestSources(init.read_bytes(), files, wl)


def gcc_version() -> str:
    """First line of ``gcc --version``. Raises SetupError if gcc is missing."""
    gcc = need_tool("gcc", "gcc")
    done = subprocess.run([gcc, "--version"], capture_output=True, text=True, check=False)
    if done.returncode != 0 or not done.stdout.strip():
        raise SetupError("gcc", f"`gcc --version` failed: {done.stderr.strip()}")
    return done.stdout.splitlines()[0].strip()


def compile_workloads(src_dir: Path, out_dir: Path, note: Progress) -> dict[str, bytes]:
    """``gcc -static -O2`` every src_dir/*.c; returns {program name: binary}.

    Raises ImageError with the compiler's output if one fails (a missing static libc
    means `apt-get install libc6-dev`).
    """
    gcc = need_tool("gcc", "gcc")
    out_dir.mkdir(parents=True, exist_ok=True)
    programs: dict[str, bytes] = {}
    for src in sorted(src_dir.glob("*.c")):
        note(f"compiling {src.name}")
        exe = out_dir / src.stem
        argv = [gcc, "-static", "-O2", "-s", "-Wall", "-I", str(src_dir), "-o", str(exe), str(src)]
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise ImageError("compile", f"{src.name}: {done.stderr.strip()}")
        programs[src.stem] = exe.read_bytes()
    return programs


def busybox_applets(busybox: Path) -> list[str]:
    """Applet paths (``bin/sh``, ``sbin/ip``...) from ``busybox --list-full``.

    Returns [] if the binary cannot run on this host; init then installs the links.
    """
    try:
        done = subprocess.run(
            [str(busybox), "--list-full"], capture_output=True, text=True, check=False, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    if done.returncode != 0:
        return []
    return [line.strip().strip("/") for line in done.stdout.splitlines() if line.strip()]


# --------------------------------------------------------------------------- build


def _sweep_stale(cache_dir: Path) -> None:
    """Remove temporary download/extract/build directories left by a killed build.

    Called with the build lock held: every builder writes only while holding it, so any
    temporary entry present now belongs to a build that is gone.
    """
    for sub in ("debs", "pkgs", "images"):
        folder = cache_dir / sub
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if entry.name.startswith(".") and entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)


def _cached(out: Path) -> GuestImage | None:
    manifest = out / "manifest.json"
    kernel, initrd = out / "vmlinuz", out / "initrd.img"
    if not (manifest.is_file() and kernel.is_file() and initrd.is_file()):
        return None
    try:
        data = json.loads(manifest.read_text())
        return GuestImage(kernel, initrd, str(data["kernel_version"]), str(data["key"]), True)
    except (OSError, ValueError, KeyError):
        return None


def _find_kernel(root: Path) -> tuple[str, Path]:
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise ImageError("kernel", f"expected one boot/vmlinuz-* in {root}, found {len(kernels)}")
    kver = kernels[0].name[len("vmlinuz-") :]
    if not (root / "lib" / "modules" / kver).is_dir():
        raise ImageError("kernel", f"{root} has no lib/modules/{kver}")
    return kver, kernels[0]


def build_image(
    cache_dir: Path,
    *,
    kernel_package: str = "linux-image-cloud-amd64",
    add: Sequence[str] = (),
    init: str = "",
    progress: Callable[[str], None] | None = None,
) -> GuestImage:
    """Build (or find in the cache) the guest kernel and initramfs.

    ``add`` holds "SRC:DEST" specs of host files to copy in (added last, so they may
    replace built-in files); ``init`` is the command init runs (a ``kemari.run=`` on the
    kernel command line overrides it at boot). ``progress`` receives one line per step.
    A cache hit runs no apt command while apt's lists are unchanged (see ResolutionMemo).
    Raises ImageError (unknown or undownloadable package, bad --add spec, compile error,
    unwritable cache) or SetupError (apt, dpkg-deb or gcc missing).
    """

    def note(msg: str) -> None:
        if progress is not None:
            progress(msg)

    cache_dir = Path(cache_dir)
    extras = []
    for spec in add:
        src, dest = parse_add(spec)
        try:
            extras.append(ExtraFile(dest, src.read_bytes(), stat.S_IMODE(src.stat().st_mode)))
        except OSError as err:
            raise ImageError("add", f"{spec!r}: {err}") from err
    sources = load_guest_sources(guest_dir())

    try:
        (cache_dir / "images").mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ImageError("cache", f"cannot create {cache_dir / 'images'}: {err}") from err

    with locked(cache_dir / ".build.lock"):
        _sweep_stale(cache_dir)
        apt = Apt(note)
        memo = ResolutionMemo(cache_dir / "resolved.json", apt_state_stamp())
        kernel_pkg = memo.get(kernel_package)
        busybox_pkg = memo.get(BUSYBOX_PACKAGE)
        if kernel_pkg is None or busybox_pkg is None:
            note(f"resolving {kernel_package} and {BUSYBOX_PACKAGE} with apt-cache")
            kernel_pkg = resolve_kernel_package(apt, kernel_package)
            busybox_pkg = resolve_package(apt, BUSYBOX_PACKAGE)
            stamp = apt_state_stamp()  # after a possible apt-get update
            memo.put(kernel_package, kernel_pkg, stamp)
            memo.put(BUSYBOX_PACKAGE, busybox_pkg, stamp)
        inputs = ImageInputs(
            kernel_package=kernel_pkg.name,
            kernel_package_version=kernel_pkg.version,
            busybox_version=busybox_pkg.version,
            gcc_version=gcc_version(),
            init_template=sources.init_template,
            workload_sources=sources.workloads,
            extras=tuple(extras),
            init_command=init,
        )
        key = image_key(inputs)
        out = cache_dir / "images" / key
        hit = _cached(out)
        if hit is not None:
            note(f"image {key} is cached")
            return hit

        note(f"building image {key} ({kernel_pkg.name} {kernel_pkg.version})")
        pkgs = cache_dir / "pkgs"
        kernel_deb = apt.download(kernel_pkg, cache_dir / "debs")
        kernel_root = extract_deb(kernel_deb, pkgs, kernel_pkg.file_stem, note)
        busybox_deb = apt.download(busybox_pkg, cache_dir / "debs")
        busybox_root = extract_deb(busybox_deb, pkgs, busybox_pkg.file_stem, note)
        kver, vmlinuz = _find_kernel(kernel_root)
        busybox = busybox_root / "bin" / "busybox"
        if not busybox.is_file():
            raise ImageError("busybox", f"{busybox_pkg.name} has no bin/busybox")
        plan = plan_modules(kernel_root / "lib" / "modules" / kver, VIRTIO_MODULES)
        if plan.absent:
            note(f"kernel {kver} ships no {', '.join(plan.absent)}")

        tmp = Path(tempfile.mkdtemp(dir=cache_dir / "images", prefix=f".{key}-"))
        try:
            tmp.chmod(0o755)  # mkdtemp makes it 0700; QEMU may run as another user
            programs = compile_workloads(sources.workloads_dir, tmp / "build", note)
            note("writing initramfs")
            archive = _assemble(inputs, kver, busybox, programs, plan)
            (tmp / "initrd.img").write_bytes(gzip_bytes(archive.newc()))
            shutil.copyfile(vmlinuz, tmp / "vmlinuz")
            shutil.rmtree(tmp / "build")
            manifest = {
                "key": key,
                "format": BUILD_FORMAT,
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "kernel_package": kernel_package,
                "kernel_deb": {"name": kernel_pkg.name, "version": kernel_pkg.version},
                "kernel_version": kver,
                "busybox_version": busybox_pkg.version,
                "gcc_version": inputs.gcc_version,
                "modules": [name for name, _ in plan.load],
                "modules_builtin": list(plan.builtin),
                "modules_absent": list(plan.absent),
                "workloads": sorted(programs),
                "extras": [
                    {"dest": e.dest, "sha256": hashlib.sha256(e.data).hexdigest()} for e in extras
                ],
                "init": init,
            }
            publish_build(tmp, out, manifest, _cached)
        except OSError as err:
            raise ImageError("write", f"{out}: {err}") from err
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        note(f"image {key} built in {out}")
        return GuestImage(out / "vmlinuz", out / "initrd.img", kver, key, False)


def _assemble(
    inputs: ImageInputs,
    kver: str,
    busybox: Path,
    programs: Mapping[str, bytes],
    plan: ModulePlan,
) -> Archive:
    ar = Archive()
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc/kemari", "proc", "sys", "dev", "run"):
        ar.dir(d)
    ar.dir("tmp", 0o1777)
    ar.dir("root", 0o700)
    # The kernel opens /dev/console before init mounts devtmpfs.
    ar.chardev("dev/console", 5, 1)
    ar.chardev("dev/null", 1, 3, 0o666)
    ar.file("bin/busybox", busybox.read_bytes(), 0o755)
    for applet in busybox_applets(busybox):
        if applet not in ("init", "linuxrc", "bin/busybox"):
            ar.symlink(applet, "/bin/busybox", replace=False)
    ar.symlink("bin/sh", "/bin/busybox", replace=False)
    ar.file("init", inputs.init_template, 0o755)
    ar.file("etc/hosts", b"127.0.0.1 localhost\n")
    ar.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    ar.file("etc/group", b"root:x:0:\n")
    order = []
    for name, ko in plan.load:
        ar.file(f"lib/modules/{kver}/{name}.ko", ko)
        order.append(f"{kver}/{name}.ko")
    ar.file("etc/kemari/modules", "".join(f"{m}\n" for m in order).encode())
    if inputs.init_command:
        ar.file("etc/kemari/run", inputs.init_command.encode() + b"\n")
    for name, binary in programs.items():
        ar.file(f"bin/{name}", binary, 0o755)
    for extra in inputs.extras:
        ar.file(extra.dest, extra.data, extra.mode)
    return ar


__all__ = [
    "APT_STATE_PATHS",
    "BASE_CMDLINE",
    "BUILD_FORMAT",
    "BUSYBOX_PACKAGE",
    "MAX_CMDLINE",
    "VIRTIO_MODULES",
    "Apt",
    "Archive",
    "DebPackage",
    "ExtraFile",
    "GuestImage",
    "GuestSources",
    "ImageInputs",
    "ModulePlan",
    "Progress",
    "ResolutionMemo",
    "apt_state_stamp",
    "build_image",
    "busybox_applets",
    "compile_workloads",
    "encode_run",
    "extract_deb",
    "gcc_version",
    "guest_dir",
    "gzip_bytes",
    "image_key",
    "kernel_cmdline",
    "kernel_dependency",
    "load_guest_sources",
    "modinfo_depends",
    "parse_add",
    "parse_control",
    "plan_modules",
    "publish_build",
    "resolve_kernel_package",
    "resolve_package",
]
