"""Which guest image an agent boots, and why: the last-build record, image ids, and
:func:`select_image`'s rules. No apt, no QEMU (building is replaced by a fake)."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from kemari_suite.config import ImageConfig, KemariConfig, PathsConfig
from kemari_suite.errors import ConfigError
from kemari_suite.vm import define
from kemari_suite.vm.define import ImageChoice, select_image, vm_spec
from kemari_suite.vm.image import GuestImage
from kemari_suite.vm.lastbuild import (
    LAST_BUILD_FILE,
    image_id_of,
    read_last_build,
    record_last_build,
)
from kemari_suite.vm.qemu import qemu_argv
from kemari_suite.vm.spec import VMPaths
from kemari_suite.vm.vmdef import MachineCatalog, load_vmdef


def _image(cache: Path, key: str) -> GuestImage:
    """A fake ``kemari image build`` image in ``cache/images/<key>/``."""
    out = cache / "images" / key
    out.mkdir(parents=True, exist_ok=True)
    (out / "vmlinuz").write_bytes(b"k-" + key.encode())
    (out / "initrd.img").write_bytes(b"i-" + key.encode())
    (out / "manifest.json").write_text(json.dumps({"key": key, "kernel_version": "6.1-test"}))
    return GuestImage(out / "vmlinuz", out / "initrd.img", "6.1-test", key, True)


class FakeBuilder:
    """Stands in for build_image: the key names the inputs; every call is recorded."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(
        self,
        cache_dir: Path,
        *,
        kernel_package: str = "linux-image-cloud-amd64",
        add: Sequence[str] = (),
        init: str = "",
        progress: Any = None,
    ) -> GuestImage:
        self.calls.append({"kernel_package": kernel_package, "add": tuple(add), "init": init})
        key = "default" if not add and not init else f"custom{len(self.calls)}"
        return _image(Path(cache_dir), key)


@pytest.fixture
def builder(monkeypatch: pytest.MonkeyPatch) -> FakeBuilder:
    fake = FakeBuilder()
    monkeypatch.setattr(define, "build_image", fake)
    return fake


def _cfg(cache: Path, **image: Any) -> KemariConfig:
    return KemariConfig(paths=PathsConfig(cache_dir=cache), image=ImageConfig(**image))


# --------------------------------------------------------------------------- the record


def test_last_build_round_trip(tmp_path: Path) -> None:
    img = _image(tmp_path, "abc123")
    path = record_last_build(tmp_path, img)
    assert path == tmp_path / LAST_BUILD_FILE
    last = read_last_build(tmp_path)
    assert last is not None and last.present
    assert last.image.key == "abc123" and last.image.kernel == img.kernel
    assert last.image.initrd == img.initrd and last.image.kernel_version == "6.1-test"
    assert last.recorded_at.endswith("Z")
    assert not list(tmp_path.glob(".last-build-*"))  # no temporary file left


def test_last_build_absent_or_unreadable(tmp_path: Path) -> None:
    assert read_last_build(tmp_path) is None
    (tmp_path / LAST_BUILD_FILE).write_text("{not json")
    assert read_last_build(tmp_path) is None
    (tmp_path / LAST_BUILD_FILE).write_text(json.dumps({"kernel": "/x"}))
    assert read_last_build(tmp_path) is None


def test_last_build_whose_files_are_gone_is_not_present(tmp_path: Path) -> None:
    img = _image(tmp_path, "gone1")
    record_last_build(tmp_path, img)
    img.initrd.unlink()
    last = read_last_build(tmp_path)
    assert last is not None and not last.present


# --------------------------------------------------------------------------- image ids


def test_image_id_of_a_build_is_its_key(tmp_path: Path) -> None:
    img = _image(tmp_path, "k1")
    assert image_id_of(img.kernel, img.initrd) == "k1"


def test_image_id_of_other_files_is_a_content_digest(tmp_path: Path) -> None:
    k, i = tmp_path / "vmlinuz", tmp_path / "initrd"
    k.write_bytes(b"kernel")
    i.write_bytes(b"initrd")
    first = image_id_of(k, i)
    assert first.startswith("sha256:") and len(first) == len("sha256:") + 24
    assert image_id_of(k, i) == first
    i.write_bytes(b"initrd2")
    assert image_id_of(k, i) != first
    # A manifest whose key is not the folder's name is not a build.
    (tmp_path / "manifest.json").write_text(json.dumps({"key": "other"}))
    assert image_id_of(k, i).startswith("sha256:")


def test_image_id_of_firmware_and_missing(tmp_path: Path) -> None:
    assert image_id_of(None, None) == "firmware"
    assert image_id_of(tmp_path / "nope", None) == f"missing:{tmp_path / 'nope'}"


# --------------------------------------------------------------------------- select_image


def test_empty_image_section_boots_the_last_build(tmp_path: Path, builder: FakeBuilder) -> None:
    built = _image(tmp_path, "withX")  # `kemari image build --add X`
    record_last_build(tmp_path, built)
    choice = select_image(_cfg(tmp_path))
    assert choice.source == "last-build" and choice.image_id == "withX"
    assert choice.image.initrd == built.initrd
    assert "withX" in choice.reason and "[image] is empty" in choice.reason
    assert builder.calls == []  # nothing rebuilt
    assert not choice.differs_from_last_build


def test_empty_image_section_without_a_record_builds_and_says_so(
    tmp_path: Path, builder: FakeBuilder
) -> None:
    choice = select_image(_cfg(tmp_path))
    assert choice.source == "built" and choice.image_id == "default"
    assert "no `kemari image build` output is recorded" in choice.reason
    assert len(builder.calls) == 1


def test_empty_image_section_with_a_vanished_build_builds_and_says_so(
    tmp_path: Path, builder: FakeBuilder
) -> None:
    img = _image(tmp_path, "old")
    record_last_build(tmp_path, img)
    img.kernel.unlink()
    choice = select_image(_cfg(tmp_path))
    assert choice.source == "built"
    assert "(old) is gone" in choice.reason


def test_own_image_section_builds_and_names_the_other_image(
    tmp_path: Path, builder: FakeBuilder
) -> None:
    record_last_build(tmp_path, _image(tmp_path, "withX"))
    choice = select_image(_cfg(tmp_path, init="counter 100"))
    assert choice.source == "built" and choice.image_id != "withX"
    assert choice.differs_from_last_build
    assert "init='counter 100'" in choice.reason
    assert "withX" in choice.reason and "does not boot" in choice.reason
    assert builder.calls == [
        {"kernel_package": "linux-image-cloud-amd64", "add": (), "init": "counter 100"}
    ]


def test_own_image_section_equal_to_the_last_build_is_not_flagged(
    tmp_path: Path, builder: FakeBuilder
) -> None:
    record_last_build(tmp_path, _image(tmp_path, "custom1"))
    choice = select_image(_cfg(tmp_path, init="counter 100"))
    assert choice.image_id == "custom1" and not choice.differs_from_last_build
    assert "does not boot" not in choice.reason


def test_configured_kernel_and_initrd(tmp_path: Path, builder: FakeBuilder) -> None:
    k, i = tmp_path / "vmlinuz", tmp_path / "initrd"
    k.write_bytes(b"k")
    i.write_bytes(b"i")
    record_last_build(tmp_path, _image(tmp_path, "withX"))
    choice = select_image(_cfg(tmp_path, kernel=str(k), initrd=str(i)))
    assert choice.source == "configured" and choice.image_id.startswith("sha256:")
    assert choice.image.kernel == k and builder.calls == []
    with pytest.raises(ConfigError) as info:
        select_image(_cfg(tmp_path, kernel=str(k), initrd=str(tmp_path / "nope")))
    assert info.value.key == "image.initrd"


def test_vm_spec_carries_the_choice_and_not_into_argv(tmp_path: Path) -> None:
    img = _image(tmp_path, "k9")
    cfg = _cfg(tmp_path)
    choice = ImageChoice(img, "last-build", "because", "k9")
    spec = vm_spec(cfg, choice)
    assert (spec.image_id, spec.image_source, spec.image_reason) == ("k9", "last-build", "because")
    assert spec.kernel == img.kernel and spec.initrd == img.initrd
    plain = vm_spec(cfg, img)
    assert (plain.image_id, plain.image_source) == ("k9", "")
    paths = VMPaths.for_vm("x", tmp_path / "run", tmp_path / "shm")
    assert qemu_argv(spec, paths) == qemu_argv(plain, paths)


# --------------------------------------------------------------------------- VM definitions

MACHINES = MachineCatalog.parse(
    "Supported machines are:\npc-i440fx-7.2        Standard PC (i440FX + PIIX, 1996)\n"
)


def test_vm_definition_spec_names_its_image(tmp_path: Path) -> None:
    img = _image(tmp_path, "defkey")
    text = textwrap.dedent(
        f"""\
        name = "web1"
        machine = "pc-i440fx-7.2"
        memory_mib = 128
        accel = "tcg"

        [boot]
        kernel = "{img.kernel}"
        initrd = "{img.initrd}"

        [replication]
        key = "k"

        [hosts.a]
        address = "10.0.0.1"

        [hosts.b]
        address = "10.0.0.2"
        """
    )
    path = tmp_path / "vm.toml"
    path.write_text(text)
    defn = load_vmdef(path, machines=lambda: MACHINES)
    spec = defn.for_host("a", resolve_accel=lambda _r: ("tcg", "test")).spec
    assert spec.image_source == "vm-definition" and spec.image_id == "defkey"
    assert str(img.kernel) in spec.image_reason
