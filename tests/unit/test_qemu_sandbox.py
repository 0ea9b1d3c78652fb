"""QEMU runs under its seccomp filter (``-sandbox``) unless ``vm.sandbox`` is off, and as
``vm.runas`` when set (without the privilege-change filter QEMU needs for that)."""

from __future__ import annotations

import dataclasses
import os
import pwd
from pathlib import Path

import pytest

from kemari_suite.config import KemariConfig, VMConfig
from kemari_suite.vm.define import vm_spec
from kemari_suite.vm.image import GuestImage
from kemari_suite.vm.qemu import _give_run_dir
from kemari_suite.vm.spec import SANDBOX, SANDBOX_RUNAS, VMPaths, VMSpec, qemu_argv

PATHS = VMPaths.for_vm("g", Path("/r"), Path("/s"))


def _opt(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def test_sandbox_is_on_by_default_and_denies_spawn_and_privileges() -> None:
    argv = qemu_argv(VMSpec(name="g", kernel=None, initrd=None), PATHS)
    sb = _opt(argv, "-sandbox")
    assert sb == SANDBOX
    assert sb is not None and sb.startswith("on,")
    for opt in ("obsolete=deny", "elevateprivileges=deny", "spawn=deny", "resourcecontrol=deny"):
        assert opt in sb.split(",")
    assert "-runas" not in argv
    # The config's default is the same.
    assert VMConfig().sandbox is True and KemariConfig().vm.runas == ""


def test_sandbox_off() -> None:
    argv = qemu_argv(VMSpec(name="g", kernel=None, initrd=None, sandbox=False), PATHS)
    assert "-sandbox" not in argv


def test_runas_keeps_the_filter_but_lets_qemu_change_its_user() -> None:
    argv = qemu_argv(VMSpec(name="g", kernel=None, initrd=None, runas="kemari-qemu"), PATHS)
    assert _opt(argv, "-runas") == "kemari-qemu"
    sb = _opt(argv, "-sandbox")
    assert sb == SANDBOX_RUNAS and "elevateprivileges" not in sb and "spawn=deny" in sb


def test_failover_line_still_differs_only_in_incoming() -> None:
    spec = VMSpec(name="g", kernel=None, initrd=None, runas="u")
    a, b = qemu_argv(spec, PATHS), qemu_argv(spec.replace(incoming=True), PATHS)
    assert b[: len(a)] == a and b[len(a) :] == ["-S", "-incoming", "defer"]


def test_the_config_reaches_the_spec() -> None:
    img = GuestImage(kernel=Path("/k"), initrd=Path("/i"), kernel_version="?", key="x", cached=True)
    assert vm_spec(KemariConfig(), img).sandbox is True
    cfg = KemariConfig(vm=dataclasses.replace(VMConfig(), sandbox=False, runas="kq"))
    spec = vm_spec(cfg, img)
    assert (spec.sandbox, spec.runas) == (False, "kq")
    argv = qemu_argv(spec, PATHS)
    assert "-sandbox" not in argv and _opt(argv, "-runas") == "kq"


def test_runas_refuses_a_run_root_the_user_cannot_pass(tmp_path: Path) -> None:
    closed = tmp_path / "closed"
    run_dir = closed / "kemari-g"
    run_dir.mkdir(parents=True)
    os.chmod(closed, 0o700)
    user = pwd.getpwnam("nobody")
    if os.getuid() == user.pw_uid:
        pytest.skip("runs as nobody")
    with pytest.raises(PermissionError, match=f"cannot pass through {closed} .*chmod o\\+x"):
        _give_run_dir(run_dir, "nobody")
    with pytest.raises(KeyError):
        _give_run_dir(run_dir, "no-such-user-kemari")
