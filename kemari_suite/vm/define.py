"""From a configuration to a VM: the guest image to boot and the QEMU spec.

Both hosts derive the spec from the same configuration, so a failover start runs the
very machine that was replicated.

Which image an agent boots (:func:`select_image`), in this order:

1. ``image.kernel`` and ``image.initrd`` set: those files ("configured");
2. ``[image]`` empty (every key at its default): the last ``kemari image build`` output
   ("last-build", see :mod:`kemari_suite.vm.lastbuild`); if none is recorded, or its
   files are gone, the default image is built (cached) and the reason says so;
3. otherwise the image of the config's ``[image]`` (add, init, kernel package) is built
   (cached) ("built"); when the last ``kemari image build`` output is a different
   image, the reason says so, naming both.

A VM definition brings its own kernel and initrd ("vm-definition",
:meth:`kemari_suite.vm.vmtree.VMDefinition.for_host`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kemari_suite.config import ImageConfig, KemariConfig
from kemari_suite.errors import ConfigError
from kemari_suite.vm.image import GuestImage, build_image, kernel_cmdline
from kemari_suite.vm.lastbuild import image_id_of, read_last_build, record_last_build
from kemari_suite.vm.spec import VMSpec, choose_accel

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ImageChoice:
    """The image an agent boots, where it came from, and why."""

    image: GuestImage
    #: "built", "last-build" or "configured" (see the module docstring).
    source: str
    #: One line for the agent's log and status.
    reason: str
    #: The id shown by ``kemari status`` (see :func:`~kemari_suite.vm.lastbuild.image_id_of`).
    image_id: str
    #: True when the last ``kemari image build`` output is another image than this one
    #: (the operator built one thing and the agent boots another).
    differs_from_last_build: bool = False


def _prebuilt(ic: ImageConfig) -> GuestImage:
    for key, value in (("image.kernel", ic.kernel), ("image.initrd", ic.initrd)):
        if not value or not Path(value).is_file():
            raise ConfigError(f"{value!r} is not a file", key=key)
    return GuestImage(
        kernel=Path(ic.kernel), initrd=Path(ic.initrd), kernel_version="?", key="", cached=True
    )


def ensure_image(cfg: KemariConfig, progress: Progress | None = None) -> GuestImage:
    """The image of ``cfg``'s ``[image]``: prebuilt paths, or built from it (cached).

    This is the image of the config itself (benchmarks, tests and the demo want exactly
    that); an agent boots :func:`select_image`'s choice instead.

    Raises:
        ConfigError: a configured kernel or initrd path does not exist.
        ImageError: building failed.
    """
    ic = cfg.image
    if ic.kernel or ic.initrd:
        return _prebuilt(ic)
    return build_image(
        cfg.paths.cache_dir,
        kernel_package=ic.kernel_package,
        add=ic.add,
        init=ic.init,
        progress=progress,
    )


def _describe(ic: ImageConfig) -> str:
    parts = []
    if ic.kernel_package != ImageConfig.kernel_package:
        parts.append(f"kernel_package={ic.kernel_package}")
    if ic.add:
        parts.append("add=" + ",".join(ic.add))
    if ic.init:
        parts.append(f"init={ic.init!r}")
    return ", ".join(parts) or "defaults"


def select_image(cfg: KemariConfig, progress: Progress | None = None) -> ImageChoice:
    """The image an agent with config ``cfg`` boots, and why (see the module docstring).

    Raises:
        ConfigError: a configured kernel or initrd path does not exist.
        ImageError: building failed.
    """
    ic = cfg.image
    cache = cfg.paths.cache_dir
    if ic.kernel or ic.initrd:
        img = _prebuilt(ic)
        return ImageChoice(
            img,
            "configured",
            f"image.kernel {ic.kernel} and image.initrd {ic.initrd} are set",
            image_id_of(img.kernel, img.initrd),
        )
    last = read_last_build(cache)
    if ic == ImageConfig():
        if last is not None and last.present:
            return ImageChoice(
                last.image,
                "last-build",
                f"[image] is empty: the last `kemari image build` output "
                f"({last.image.key}, recorded {last.recorded_at})",
                last.image.key,
            )
        img = ensure_image(cfg, progress)
        why = (
            f"the last `kemari image build` output ({last.image.key}) is gone from {cache}"
            if last is not None
            else f"no `kemari image build` output is recorded in {cache}"
        )
        return ImageChoice(
            img, "built", f"[image] is empty and {why}: built the default image", img.key
        )
    img = ensure_image(cfg, progress)
    reason = f"built from this config's [image] ({_describe(ic)})"
    differs = last is not None and last.image.key != img.key
    if last is not None and differs:
        reason += (
            f"; the last `kemari image build` output is another image ({last.image.key}, "
            f"recorded {last.recorded_at}), which this agent does not boot"
        )
    return ImageChoice(img, "built", reason, img.key, differs_from_last_build=differs)


def vm_spec(
    cfg: KemariConfig, image: GuestImage | ImageChoice, *, blockdev: str | None = None
) -> VMSpec:
    """The QEMU spec for the VM of ``cfg``, booting ``image`` (an :class:`ImageChoice`
    also fills the spec's ``image_*`` fields)."""
    v = cfg.vm
    accel, _why = choose_accel(v.accel)
    append = kernel_cmdline(ip=v.ip or None, run=v.run or None, extra=v.append)
    if isinstance(image, ImageChoice):
        img, source, reason, image_id = image.image, image.source, image.reason, image.image_id
    else:
        img, source, reason, image_id = image, "", "", image.key
    return VMSpec(
        name=v.name,
        kernel=img.kernel,
        initrd=img.initrd,
        append=append,
        memory_mib=v.memory_mib,
        vcpus=v.vcpus,
        machine=v.machine,
        accel=accel,
        netdev=v.netdev or None,
        mac=v.mac,
        blockdev=blockdev,
        netns=v.netns or None,
        display=v.display,
        # The same on both hosts: the failover start runs under the same filter and user.
        sandbox=v.sandbox,
        runas=v.runas,
        image_id=image_id,
        image_source=source,
        image_reason=reason,
    )


__all__ = [
    "ImageChoice",
    "ensure_image",
    "record_last_build",
    "select_image",
    "vm_spec",
]
