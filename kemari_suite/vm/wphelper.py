"""The write-protect helper of the uffd-wp tracker: built, probed, put on QEMU's command line.

The helper (``helpers/kemari_wp.c``, shipped in the package) is a small shared object
loaded into stock QEMU. Inside QEMU's process it serves a Unix socket; asked to, it
registers the guest RAM mapping with a userfaultfd in asynchronous write-protect mode.
The agent then finds written pages, and write-protects them again, with the
``PAGEMAP_SCAN`` ioctl on ``/proc/<qemu>/pagemap``
(:mod:`kemari_suite.checkpoint.uffdwp`). See DESIGN.md, "Dirty pages".

Two ways into QEMU, probed once per QEMU binary and helper build (the answer is cached)::

    -plugin kemari_wp.so,sock=PATH              a TCG plugin (also loaded under KVM)
    LD_PRELOAD=kemari_wp.so KEMARI_WP_SOCK=PATH  where QEMU's plugin API refuses it

Kernel support (Linux 6.7 or newer: ``UFFD_FEATURE_WP_ASYNC`` and ``PAGEMAP_SCAN``) is
probed in this process by :func:`probe_kernel`, without QEMU.

Build and cache (``make setup`` builds it; any later use builds it if missing)::

    cache_dir/helpers/kemari_wp-<key>.so       key: hash of the source and the flags
    cache_dir/helpers/probe-<key>.json         how this QEMU loads it, and why
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from kemari_suite.config import KemariConfig, PathsConfig
from kemari_suite.errors import SetupError
from kemari_suite.vm.buildkit import Progress, need_tool
from kemari_suite.vm.spec import QEMU_BINARY, VMSpec

SOURCE = Path(__file__).with_name("helpers") / "kemari_wp.c"
CFLAGS = ("-O2", "-Wall", "-Wno-format-truncation", "-shared", "-fPIC", "-pthread", "-s")

#: ``_IOWR('f', 16, struct pm_scan_arg)``: the struct is 12 u64 fields (96 bytes).
PAGEMAP_SCAN = (3 << 30) | (96 << 16) | (ord("f") << 8) | 16
#: userfaultfd's ``UFFDIO_API`` (``_IOWR(0xAA, 0x3F, struct uffdio_api)``, 24 bytes).
UFFDIO_API = (3 << 30) | (24 << 16) | (0xAA << 8) | 0x3F
UFFD_API = 0xAA
UFFD_FEATURE_WP_HUGETLBFS_SHMEM = 1 << 12
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
UFFD_FEATURE_WP_ASYNC = 1 << 15
WANTED_FEATURES = (
    UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_HUGETLBFS_SHMEM | UFFD_FEATURE_WP_UNPOPULATED
)
_SYS_USERFAULTFD = 323  # x86_64
_UFFD_USER_MODE_ONLY = 1


@dataclass(frozen=True)
class WpHelper:
    """A built helper and how this QEMU loads it."""

    path: Path
    #: "plugin" (``-plugin``) or "preload" (``LD_PRELOAD``).
    mode: str
    #: One line: why this mode.
    reason: str


def _key() -> str:
    h = hashlib.sha256(SOURCE.read_bytes())
    h.update(" ".join(CFLAGS).encode())
    return h.hexdigest()[:16]


def helper_dir(cache_dir: Path) -> Path:
    return cache_dir / "helpers"


def build_helper(
    cache_dir: Path, note: Progress | None = None, *, defines: tuple[str, ...] = ()
) -> Path:
    """The helper's shared object, compiled with gcc unless this source is built already.

    ``defines`` (``NAME=VALUE``, passed as ``-D``) build a variant, cached apart.

    Raises:
        SetupError: gcc is missing or the compile failed (its output quoted).
    """
    variant = "-" + hashlib.sha256(" ".join(defines).encode()).hexdigest()[:8] if defines else ""
    out = helper_dir(cache_dir) / f"kemari_wp-{_key()}{variant}.so"
    if out.is_file():
        return out
    gcc = need_tool("gcc", "gcc")
    out.parent.mkdir(parents=True, exist_ok=True)
    if note is not None:
        note(f"compiling {SOURCE.name}")
    fd, tmp = tempfile.mkstemp(prefix=".kemari_wp-", suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        done = subprocess.run(
            [gcc, *CFLAGS, *(f"-D{d}" for d in defines), "-o", tmp, str(SOURCE)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise SetupError("uffd-wp helper", f"gcc failed: {done.stderr.strip()[-2000:]}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


# --------------------------------------------------------------------------- kernel


class _UffdioApi(ctypes.Structure):
    _fields_ = [
        ("api", ctypes.c_uint64),
        ("features", ctypes.c_uint64),
        ("ioctls", ctypes.c_uint64),
    ]


class PmScanArg(ctypes.Structure):
    """``struct pm_scan_arg`` of ``<linux/fs.h>``."""

    _fields_ = [
        (name, ctypes.c_uint64)
        for name in (
            "size",
            "flags",
            "start",
            "end",
            "walk_end",
            "vec",
            "vec_len",
            "max_pages",
            "category_inverted",
            "category_mask",
            "category_anyof_mask",
            "return_mask",
        )
    ]


def probe_kernel() -> tuple[bool, str]:
    """Can this kernel run the uffd-wp tracker? Returns ``(ok, reason)``.

    Checks, in this process: ``PAGEMAP_SCAN`` on /proc/self/pagemap (an empty range),
    and a userfaultfd offering asynchronous write-protect on shared memory.
    """
    release = os.uname().release
    try:
        fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        return False, f"cannot open /proc/self/pagemap: {err}"
    try:
        fcntl.ioctl(fd, PAGEMAP_SCAN, PmScanArg(size=ctypes.sizeof(PmScanArg)))
    except OSError as err:
        why = "no PAGEMAP_SCAN ioctl" if err.errno in (errno.ENOTTY, errno.EINVAL) else str(err)
        return False, f"kernel {release}: {why} (needs Linux 6.7 or newer)"
    finally:
        os.close(fd)
    libc = ctypes.CDLL(None, use_errno=True)
    ufd = -1
    for flags in (
        os.O_CLOEXEC | os.O_NONBLOCK,
        os.O_CLOEXEC | os.O_NONBLOCK | _UFFD_USER_MODE_ONLY,
    ):
        ufd = libc.syscall(_SYS_USERFAULTFD, flags)
        if ufd >= 0:
            break
    if ufd < 0:
        return False, f"kernel {release}: userfaultfd: {os.strerror(ctypes.get_errno())}"
    try:
        api = _UffdioApi(api=UFFD_API, features=WANTED_FEATURES)
        try:
            fcntl.ioctl(ufd, UFFDIO_API, api)
        except OSError as err:
            return False, f"kernel {release}: userfaultfd lacks asynchronous write-protect ({err})"
        missing = WANTED_FEATURES & ~api.features
        if missing:
            return False, f"kernel {release}: userfaultfd lacks features {missing:#x}"
    finally:
        os.close(ufd)
    return True, f"kernel {release} has PAGEMAP_SCAN and asynchronous userfaultfd write-protect"


# --------------------------------------------------------------------------- QEMU


def _answers(sock_path: Path, proc: subprocess.Popen[bytes], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(2)
                s.connect(str(sock_path))
                s.sendall(b"PING\n")
                return s.recv(16).startswith(b"OK")
        except OSError:
            time.sleep(0.05)
    return False


def _try_mode(helper: Path, mode: str, qemu: str, timeout: float) -> tuple[bool, str]:
    with tempfile.TemporaryDirectory(prefix="kwp-") as tmp:
        sock = Path(tmp) / "wp.sock"
        argv = [qemu, "-M", "none", "-display", "none", "-nodefaults", "-S"]
        env = dict(os.environ)
        if mode == "plugin":
            argv += ["-plugin", f"{helper},sock={sock}"]
        else:
            env.update(LD_PRELOAD=str(helper), KEMARI_WP_SOCK=str(sock))
        proc = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            ok = _answers(sock, proc, timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
            out = proc.communicate()[0].decode(errors="replace").strip()
        last = out.splitlines()[-1] if out else "no answer on its socket"
        return ok, last


def probe_loading(
    helper: Path, cache_dir: Path, *, qemu: str = QEMU_BINARY, timeout: float = 20
) -> tuple[str | None, str]:
    """How ``qemu`` loads ``helper``: ``("plugin" | "preload" | None, reason)``.

    Starts ``qemu -M none`` with the helper each way until one answers on its socket.
    The answer is cached per QEMU binary (path, size, mtime) and helper.
    """
    binary = shutil.which(qemu)
    if binary is None:
        return None, f"{qemu} not found"
    st = os.stat(binary)
    tag = hashlib.sha256(f"{binary}:{st.st_size}:{st.st_mtime_ns}:{helper.name}".encode())
    cache = helper_dir(cache_dir) / f"probe-{tag.hexdigest()[:16]}.json"
    try:
        got = json.loads(cache.read_text())
        return got["mode"], got["reason"]
    except (OSError, ValueError, KeyError):
        pass
    ok, plugin_said = _try_mode(helper, "plugin", binary, timeout)
    if ok:
        mode: str | None = "plugin"
        reason = f"{binary} loads it as a plugin (-plugin)"
    else:
        ok, preload_said = _try_mode(helper, "preload", binary, timeout)
        mode = "preload" if ok else None
        reason = (
            f"{binary} refused the plugin ({plugin_said}); loaded with LD_PRELOAD"
            if ok
            else f"{binary} loads it neither as a plugin ({plugin_said}) "
            f"nor with LD_PRELOAD ({preload_said})"
        )
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"mode": mode, "reason": reason}))
    return mode, reason


def prepare(cache_dir: Path, note: Progress | None = None) -> tuple[WpHelper | None, str]:
    """The helper for this host's QEMU, or None with the reason the tracker cannot run.

    Builds the helper if needed; probes the kernel and how QEMU loads it.
    """
    ok, why = probe_kernel()
    if not ok:
        return None, why
    try:
        path = build_helper(cache_dir, note)
    except SetupError as err:
        return None, str(err)
    mode, how = probe_loading(path, cache_dir)
    if mode is None:
        return None, how
    return WpHelper(path, mode, f"{why}; {how}"), f"{why}; {how}"


def attach(cfg: KemariConfig, spec: VMSpec, note: Progress | None = None) -> VMSpec:
    """``spec`` with the helper loaded when the configured tracker may use it
    (``auto`` or ``uffd-wp``), and the reason it is or is not."""
    kind = cfg.replication.tracker
    if kind not in ("auto", "uffd-wp"):
        return spec.replace(wp_helper=None, wp_helper_reason=f"replication.tracker = {kind!r}")
    helper, why = prepare(cfg.paths.cache_dir, note)
    if helper is None:
        return spec.replace(wp_helper=None, wp_helper_reason=why)
    return spec.replace(wp_helper=helper.path, wp_helper_mode=helper.mode, wp_helper_reason=why)


def main() -> None:
    """``python -m kemari_suite.vm.wphelper``: build the helper (the setup runs it)."""
    path = build_helper(PathsConfig().cache_dir, print)
    print(f"uffd-wp helper: {path}")


if __name__ == "__main__":
    main()


__all__ = [
    "PAGEMAP_SCAN",
    "PmScanArg",
    "WpHelper",
    "attach",
    "build_helper",
    "prepare",
    "probe_kernel",
    "probe_loading",
]
