"""The initramfs's parts: kernel modules in load order, and a newc cpio archive.

:func:`plan_modules` orders the wanted modules (and their dependencies, read from each
module's ``.modinfo``) for insmod; :class:`Archive` collects files, directories, links
and device nodes and writes them as newc cpio, byte for byte the same for the same
input (uid/gid 0, mtime 0), which :func:`gzip_bytes` keeps so.
"""

from __future__ import annotations

import gzip
import io
import lzma
import stat
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

from kemari_suite.errors import ImageError

_MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


# --------------------------------------------------------------------------- modules


def modinfo_depends(ko: bytes) -> list[str]:
    """The ``depends=`` list from a module's .modinfo ELF section.

    Raises ImageError if ``ko`` is not a 64-bit little-endian ELF with a .modinfo section.
    """
    if ko[:4] != b"\x7fELF" or ko[4] != 2 or ko[5] != 1:
        raise ImageError("modules", "not a 64-bit little-endian ELF module")
    (shoff,) = struct.unpack_from("<Q", ko, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", ko, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from(
            "<IIQQQQ", ko, shoff + i * shentsize
        )
        return name, offset, size

    try:
        _, str_off, str_size = section(shstrndx)
        names = ko[str_off : str_off + str_size]
        for i in range(shnum):
            name_off, offset, size = section(i)
            end = names.find(b"\0", name_off)
            if names[name_off:end] == b".modinfo":
                for entry in ko[offset : offset + size].split(b"\0"):
                    if entry.startswith(b"depends="):
                        value = entry[len(b"depends=") :].decode()
                        return [d for d in value.split(",") if d]
                return []
    except (struct.error, UnicodeDecodeError) as err:
        raise ImageError("modules", f"malformed module: {err}") from err
    raise ImageError("modules", "module has no .modinfo section")


def _module_name(path: Path) -> str:
    name = path.name
    for suffix in _MODULE_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name.replace("-", "_")


def _decompress_module(path: Path) -> bytes:
    data = path.read_bytes()
    try:
        if path.name.endswith(".ko.xz"):
            return lzma.decompress(data)
        if path.name.endswith(".ko.gz"):
            return gzip.decompress(data)
        if path.name.endswith(".ko.zst"):
            return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    except (lzma.LZMAError, zstandard.ZstdError, OSError, EOFError) as err:
        raise ImageError("modules", f"cannot decompress {path.name}: {err}") from err
    return data


@dataclass(frozen=True)
class ModulePlan:
    """Which modules go into the initramfs, in load order."""

    #: (module name, uncompressed .ko bytes), dependencies first.
    load: tuple[tuple[str, bytes], ...]
    builtin: tuple[str, ...]
    absent: tuple[str, ...]


def plan_modules(moddir: Path, wanted: Sequence[str]) -> ModulePlan:
    """Order ``wanted`` (and their dependencies) for insmod, from one kernel's modules.

    ``moddir`` is lib/modules/<kver>. Built-in modules (modules.builtin) are skipped,
    and so are wanted modules the kernel does not ship; a missing dependency of a
    shipped module raises ImageError.
    """
    builtin: set[str] = set()
    builtin_file = moddir / "modules.builtin"
    if builtin_file.is_file():
        for line in builtin_file.read_text().splitlines():
            if line.strip():
                builtin.add(_module_name(Path(line.strip())))
    files: dict[str, Path] = {}
    for path in sorted((moddir / "kernel").rglob("*.ko*")):
        if path.name.endswith(_MODULE_SUFFIXES):
            files.setdefault(_module_name(path), path)

    load: list[tuple[str, bytes]] = []
    done: set[str] = set()
    found_builtin: list[str] = []
    absent: list[str] = []

    def visit(name: str, needed_by: str | None, stack: tuple[str, ...]) -> None:
        if name in done:
            return
        if name in stack:
            raise ImageError("modules", f"dependency cycle: {' -> '.join((*stack, name))}")
        if name in builtin:
            done.add(name)
            found_builtin.append(name)
            return
        path = files.get(name)
        if path is None:
            if needed_by is not None:
                raise ImageError("modules", f"{needed_by} needs {name}, not in {moddir}")
            done.add(name)
            absent.append(name)
            return
        ko = _decompress_module(path)
        for dep in modinfo_depends(ko):
            visit(dep, name, (*stack, name))
        done.add(name)
        load.append((name, ko))

    for name in wanted:
        visit(name, None, ())
    return ModulePlan(tuple(load), tuple(found_builtin), tuple(absent))


# --------------------------------------------------------------------------- cpio


@dataclass(frozen=True)
class _Entry:
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


@dataclass
class Archive:
    """An initramfs under construction: absolute paths to files, dirs, links, nodes."""

    entries: dict[str, _Entry] = field(default_factory=dict)

    def _parents(self, path: str) -> None:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            parent = "/".join(parts[:i])
            existing = self.entries.get(parent)
            if existing is None:
                self.entries[parent] = _Entry(stat.S_IFDIR | 0o755)
            elif not stat.S_ISDIR(existing.mode):
                raise ImageError("initramfs", f"/{parent} is a file, cannot hold /{path}")

    def _put(self, path: str, entry: _Entry, replace: bool = True) -> None:
        rel = path.strip("/")
        if not rel:
            raise ImageError("initramfs", f"bad path {path!r}")
        existing = self.entries.get(rel)
        if existing is not None and stat.S_ISDIR(existing.mode) != stat.S_ISDIR(entry.mode):
            raise ImageError("initramfs", f"/{rel}: a directory and a file at the same path")
        if existing is not None and not replace:
            return
        self._parents(rel)
        self.entries[rel] = entry

    def dir(self, path: str, mode: int = 0o755) -> None:
        self._put(path, _Entry(stat.S_IFDIR | mode))

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self._put(path, _Entry(stat.S_IFREG | (mode & 0o7777), data))

    def symlink(self, path: str, target: str, *, replace: bool = True) -> None:
        self._put(path, _Entry(stat.S_IFLNK | 0o777, target.encode()), replace)

    def chardev(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._put(path, _Entry(stat.S_IFCHR | mode, rdev=(major, minor)))

    def newc(self) -> bytes:
        """The archive as newc cpio (uid/gid 0, mtime 0: the same input gives the same bytes)."""
        out = io.BytesIO()

        def record(ino: int, name: str, entry: _Entry) -> None:
            nlink = 2 if stat.S_ISDIR(entry.mode) else 1
            # ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor
            # namesize check
            fields = [ino, entry.mode, 0, 0, nlink, 0, len(entry.data), 0, 0]
            fields += [entry.rdev[0], entry.rdev[1], len(name) + 1, 0]
            out.write(b"070701" + b"".join(b"%08X" % v for v in fields))
            out.write(name.encode() + b"\0")
            out.write(b"\0" * (-out.tell() % 4))
            out.write(entry.data)
            out.write(b"\0" * (-out.tell() % 4))

        # Sorted paths put every directory before its contents.
        for ino, name in enumerate(sorted(self.entries), start=1):
            record(ino, name, self.entries[name])
        record(0, "TRAILER!!!", _Entry(0))
        return out.getvalue()


def gzip_bytes(data: bytes) -> bytes:
    """gzip with mtime 0, so equal input gives equal output."""
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=9, mtime=0) as gz:
        gz.write(data)
    return buf.getvalue()


__all__ = ["Archive", "ModulePlan", "gzip_bytes", "modinfo_depends", "plan_modules"]
