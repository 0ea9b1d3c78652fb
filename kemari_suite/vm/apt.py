"""Debian packages for the guest image: resolve a name to a version with apt-cache,
download the .deb once, extract it once.

A kernel meta-package (``linux-image-cloud-amd64``) is followed to the versioned
package that holds the kernel. Resolutions are remembered in the cache
(:class:`ResolutionMemo`) while apt's lists are unchanged, so a cached image is found
without running apt at all.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from kemari_suite.errors import ImageError
from kemari_suite.vm.buildkit import Progress, need_tool


@dataclass(frozen=True)
class DebPackage:
    """One resolved Debian package version."""

    name: str
    version: str
    arch: str

    @property
    def file_stem(self) -> str:
        """``name_version_arch`` as apt names the .deb (":" in versions is "%3a")."""
        return f"{self.name}_{self.version.replace(':', '%3a')}_{self.arch}"


def parse_control(text: str) -> list[dict[str, str]]:
    """Parse ``apt-cache show`` output into one dict per stanza (continuations joined)."""
    stanzas: list[dict[str, str]] = []
    current: dict[str, str] = {}
    last = ""
    for line in text.splitlines():
        if not line.strip():
            if current:
                stanzas.append(current)
            current, last = {}, ""
        elif line[0] in " \t" and last:
            current[last] += "\n" + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            last = key.strip()
            current[last] = value.strip()
    if current:
        stanzas.append(current)
    return stanzas


_VERSIONED_KERNEL = re.compile(r"^linux-image-\d")
_DEP = re.compile(
    r"^\s*(?P<name>[a-z0-9][a-z0-9+.-]*)(?::\w+)?\s*(?:\((?P<op>[<>=]+)\s*(?P<ver>[^)\s]+)\s*\))?"
)


def kernel_dependency(stanza: Mapping[str, str]) -> tuple[str, str | None] | None:
    """The versioned kernel a meta-package depends on: (name, exact version or None).

    Looks through Depends (then Pre-Depends) for the first alternative named
    ``linux-image-<digit>...``; None if there is none.
    """
    for field_name in ("Depends", "Pre-Depends"):
        for clause in stanza.get(field_name, "").split(","):
            for alternative in clause.split("|"):
                m = _DEP.match(alternative)
                if m and _VERSIONED_KERNEL.match(m.group("name")):
                    exact = m.group("ver") if m.group("op") == "=" else None
                    return m.group("name"), exact
    return None


class Apt:
    """apt-cache / apt-get, with one automatic ``apt-get update`` if a lookup finds nothing."""

    def __init__(self, note: Progress) -> None:
        self._note = note
        self._updated = False

    def _run(self, argv: Sequence[str], step: str, cwd: Path | None = None) -> str:
        try:
            done = subprocess.run(
                list(argv), cwd=cwd, capture_output=True, text=True, check=False, timeout=900
            )
        except (OSError, subprocess.TimeoutExpired) as err:
            raise ImageError(step, f"`{' '.join(argv)}` failed: {err}") from err
        if done.returncode != 0:
            raise ImageError(
                step,
                f"`{' '.join(argv)}` exited {done.returncode}: {done.stderr.strip() or '-'}",
            )
        return done.stdout

    def _show_once(self, name: str) -> list[dict[str, str]]:
        apt_cache = need_tool("apt-cache", "apt")
        done = subprocess.run(
            [apt_cache, "show", "--no-all-versions", name],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            return []
        return [s for s in parse_control(done.stdout) if s.get("Package") == name]

    def _update(self) -> None:
        apt_get = need_tool("apt-get", "apt")
        self._note("apt-get update (package not in the local lists)")
        self._updated = True
        self._run([apt_get, "update"], "apt-get update")

    def show(self, name: str) -> dict[str, str]:
        """The candidate stanza of ``name``. Raises ImageError if apt does not know it."""
        stanzas = self._show_once(name)
        if not stanzas and not self._updated:
            try:
                self._update()
            except ImageError as err:
                raise ImageError(
                    "resolve",
                    f"package {name!r} is not in apt's lists and `apt-get update` failed: "
                    f"{err.reason}",
                ) from err
            stanzas = self._show_once(name)
        if not stanzas:
            raise ImageError(
                "resolve",
                f"package {name!r} not found by apt-cache (even after `apt-get update`); "
                "check the name and /etc/apt/sources.list, then run `apt-get update`",
            )
        return stanzas[0]

    def download(self, pkg: DebPackage, debs: Path) -> Path:
        """``apt-get download`` into ``debs`` (once). Raises ImageError naming the package."""
        target = debs / f"{pkg.file_stem}.deb"
        if target.is_file():
            return target
        apt_get = need_tool("apt-get", "apt")
        debs.mkdir(parents=True, exist_ok=True)
        self._note(f"downloading {pkg.name} {pkg.version}")
        argv = [apt_get, "download", f"{pkg.name}={pkg.version}"]
        if os.geteuid() == 0:
            # Root downloads into a directory the _apt user cannot write: say so to apt
            # instead of getting a warning about it.
            argv[1:1] = ["-o", "APT::Sandbox::User=root"]
        with tempfile.TemporaryDirectory(dir=debs, prefix=".dl-") as tmp:
            try:
                self._run(argv, "download", cwd=Path(tmp))
            except ImageError as err:
                raise ImageError(
                    "download",
                    f"could not download {pkg.name}={pkg.version} (run `apt-get update` and "
                    f"check the network): {err.reason}",
                ) from err
            got = sorted(Path(tmp).glob("*.deb"))
            if len(got) != 1:
                raise ImageError("download", f"apt-get download {pkg.name} left {len(got)} files")
            os.replace(got[0], target)
        return target


def resolve_kernel_package(apt: Apt, name: str) -> DebPackage:
    """Follow a kernel meta-package to the versioned package that holds the kernel.

    Raises ImageError if the package is unknown or is neither a versioned kernel nor a
    meta-package depending on one.
    """
    seen: set[str] = set()
    stanza = apt.show(name)
    while not _VERSIONED_KERNEL.match(stanza["Package"]):
        seen.add(stanza["Package"])
        dep = kernel_dependency(stanza)
        if dep is None or dep[0] in seen:
            raise ImageError(
                "resolve", f"{stanza['Package']} neither is nor depends on a linux-image-<version>"
            )
        dep_name, exact = dep
        if exact:
            # Debian's meta-packages pin the exact version: no need to ask apt again.
            return DebPackage(dep_name, exact, stanza.get("Architecture", "amd64"))
        stanza = apt.show(dep_name)
    return DebPackage(stanza["Package"], stanza["Version"], stanza.get("Architecture", "amd64"))


def resolve_package(apt: Apt, name: str) -> DebPackage:
    """The candidate version of ``name``. Raises ImageError if apt does not know it."""
    stanza = apt.show(name)
    return DebPackage(stanza["Package"], stanza["Version"], stanza.get("Architecture", "amd64"))


#: What decides apt's candidate versions: the package lists, sources and pins, dpkg status.
APT_STATE_PATHS = (Path("/var/lib/apt/lists"), Path("/etc/apt"), Path("/var/lib/dpkg/status"))


def apt_state_stamp(paths: Sequence[Path] = APT_STATE_PATHS) -> str:
    """A digest of the names, sizes and mtimes of the files apt resolves versions from."""
    h = hashlib.sha256()
    for root in paths:
        files = sorted(root.rglob("*")) if root.is_dir() else [root]
        for path in files:
            try:
                st = path.stat()
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


class ResolutionMemo:
    """Package resolutions remembered in a JSON file while apt's state is unchanged.

    ``apt-cache`` takes about half a second per call here; with the memo a cached image
    is found without running apt at all.
    """

    def __init__(self, path: Path, stamp: str) -> None:
        self._path = path
        self._stamp = stamp
        self._packages: dict[str, list[str]] = {}
        try:
            data = json.loads(path.read_text())
            if data.get("stamp") == stamp and isinstance(data.get("packages"), dict):
                self._packages = data["packages"]
        except (OSError, ValueError, AttributeError):
            pass

    def get(self, name: str) -> DebPackage | None:
        entry = self._packages.get(name)
        if isinstance(entry, list) and len(entry) == 3 and all(isinstance(x, str) for x in entry):
            return DebPackage(entry[0], entry[1], entry[2])
        return None

    def put(self, name: str, pkg: DebPackage, stamp: str) -> None:
        """Remember ``name`` -> ``pkg`` (best effort: an unwritable memo only costs time)."""
        if stamp != self._stamp:
            self._packages, self._stamp = {}, stamp
        self._packages[name] = [pkg.name, pkg.version, pkg.arch]
        tmp = self._path.with_name(f".{self._path.name}.{os.getpid()}")
        try:
            tmp.write_text(json.dumps({"stamp": stamp, "packages": self._packages}, indent=1))
            os.replace(tmp, self._path)
        except OSError:
            tmp.unlink(missing_ok=True)


def extract_deb(deb: Path, pkgs: Path, stem: str, note: Progress) -> Path:
    """``dpkg-deb -x`` into pkgs/<stem> (once, atomically). Raises ImageError."""
    target = pkgs / stem
    if target.is_dir():
        return target
    note(f"extracting {deb.name}")
    dpkg_deb = need_tool("dpkg-deb", "dpkg")
    pkgs.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=pkgs, prefix=".x-"))
    try:
        done = subprocess.run(
            [dpkg_deb, "-x", str(deb), str(tmp)], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise ImageError("extract", f"dpkg-deb -x {deb.name}: {done.stderr.strip()}")
        try:
            tmp.rename(target)
        except OSError:
            if not target.is_dir():
                raise
    except OSError as err:
        raise ImageError("extract", f"{deb.name}: {err}") from err
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


__all__ = [
    "APT_STATE_PATHS",
    "Apt",
    "DebPackage",
    "ResolutionMemo",
    "apt_state_stamp",
    "extract_deb",
    "kernel_dependency",
    "parse_control",
    "resolve_kernel_package",
    "resolve_package",
]
