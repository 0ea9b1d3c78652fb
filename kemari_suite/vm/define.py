"""From a configuration to a VM: the guest image to boot and the QEMU spec.

Both hosts derive the spec from the same configuration, so a failover start runs the
very machine that was replicated.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from kemari_suite.config import KemariConfig
from kemari_suite.errors import ConfigError
from kemari_suite.vm.image import GuestImage, build_image, kernel_cmdline
from kemari_suite.vm.spec import VMSpec, choose_accel


def ensure_image(cfg: KemariConfig, progress: Callable[[str], None] | None = None) -> GuestImage:
    """The guest image of ``cfg``: prebuilt paths from the config, or built (cached).

    Raises:
        ConfigError: a configured kernel or initrd path does not exist.
        ImageError: building failed.
    """
    ic = cfg.image
    if ic.kernel or ic.initrd:
        for key, value in (("image.kernel", ic.kernel), ("image.initrd", ic.initrd)):
            if not value or not Path(value).is_file():
                raise ConfigError(f"{value!r} is not a file", key=key)
        return GuestImage(
            kernel=Path(ic.kernel), initrd=Path(ic.initrd), kernel_version="?", key="", cached=True
        )
    return build_image(
        cfg.paths.cache_dir,
        kernel_package=ic.kernel_package,
        add=ic.add,
        init=ic.init,
        progress=progress,
    )


def vm_spec(cfg: KemariConfig, image: GuestImage, *, blockdev: str | None = None) -> VMSpec:
    """The QEMU spec for the VM of ``cfg``."""
    v = cfg.vm
    accel, _why = choose_accel(v.accel)
    append = kernel_cmdline(ip=v.ip or None, run=v.run or None, extra=v.append)
    return VMSpec(
        name=v.name,
        kernel=image.kernel,
        initrd=image.initrd,
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
    )
