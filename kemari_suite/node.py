"""Entry points of the three long-running processes: primary, secondary, witness.

The CLI (``kemari protect``, ``kemari standby``, ``kemari witness``) calls these; they
configure logging into the run's artifact folder and run until stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from kemari_suite.checkpoint.baseline import SwitchBaseline, arm_at_resume
from kemari_suite.checkpoint.primary import PrimaryAgent
from kemari_suite.checkpoint.states import PrimaryState
from kemari_suite.config import KemariConfig
from kemari_suite.errors import ConfigError
from kemari_suite.ha.tiebreak import node_identity
from kemari_suite.replica.secondary import Handover, KeptRAM, SecondaryAgent
from kemari_suite.replica.states import SecondaryState
from kemari_suite.service.sdnotify import AgentNotifier
from kemari_suite.tap.outputs import check_outputs, unprotected_outputs
from kemari_suite.vm import guestmem, wphelper
from kemari_suite.vm.define import select_image, vm_spec
from kemari_suite.vm.qemu import AsyncVM, VMPaths, VMSpec

if TYPE_CHECKING:
    from kemari_suite.checkpoint.tracker import DirtyTracker
    from kemari_suite.service.prometheus import Exporter

log = logging.getLogger(__name__)

#: Every state of each role, as the exporter lists them (``kemari_state``).
ROLE_STATES = {
    "primary": [s.value for s in PrimaryState],
    "secondary": [s.value for s in SecondaryState],
}


def control_path(cfg: KemariConfig) -> Path:
    """Where the agent of this config listens for control requests."""
    return (
        VMPaths.for_vm(cfg.vm.name, cfg.paths.run_dir, cfg.paths.shm_dir).run_dir / "control.sock"
    )


def artifacts_dir(cfg: KemariConfig, role: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return cfg.paths.run_dir / "artifacts" / f"{cfg.vm.name}-{role}-{stamp}"


def _log_to(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(folder / "agent.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def probe_guest(pages: np.ndarray) -> dict[str, Any]:
    """Read the workloads' progress probes from a RAM image (the replica at failover)."""
    out: dict[str, Any] = {}
    hits = guestmem.locate_probes(pages, guestmem.COUNTER_MAGIC)
    if hits:
        # The counter served over TCP (aux = its port) is the one clients compare with.
        served = [h for h in hits if h.aux]
        out["counter"] = max(h.value for h in (served or hits))
        out["counters"] = {str(h.aux): h.value for h in hits}
    dirty = guestmem.find_memdirty(pages)
    if dirty is not None:
        out["memdirty"] = dirty
    return out


def _log_image(spec: VMSpec, *, warn: bool) -> None:
    """Say which guest image this node boots, and why (a warning with ``warn``: it is
    not the last `kemari image build` output)."""
    log.log(
        logging.WARNING if warn else logging.INFO,
        "guest image %s (%s)%s",
        spec.image_id or "?",
        spec.image_source or "given by the caller",
        f": {spec.image_reason}" if spec.image_reason else "",
    )


def _serve_metrics(cfg: KemariConfig, vm: str) -> Exporter | None:
    """The Prometheus exporter ``[metrics]`` asks for, or None (the default). Imported
    only then: an agent that exports nothing runs without prometheus_client.

    Raises:
        ConfigError: ``metrics.listen`` cannot be served (a bad address, a port in use).
    """
    if not cfg.metrics.listen:
        return None
    from kemari_suite.service import prometheus

    return prometheus.serve(cfg.metrics, vm=vm, states=ROLE_STATES)


def _install_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)


async def run_primary(
    cfg: KemariConfig, *, node_id: str = "", spec: VMSpec | None = None
) -> PrimaryAgent | SecondaryAgent:
    """Boot the VM and protect it until stopped (then, after a switchover, stand by).
    ``node_id`` (this host at the tiebreaker): empty for :func:`node_identity`.

    Raises:
        ConfigError: no peer configured, or an untapped guest output (see
            :func:`run_node`).
        FailoverError: this host lost the tiebreaker and stopped its VM.
    """
    if not cfg.replication.peer:
        raise ConfigError("the secondary's address is not set", key="replication.peer")
    return await run_node(cfg, "primary", node_id=node_id or node_identity(cfg), spec=spec)


async def run_secondary(
    cfg: KemariConfig, *, node_id: str = "", spec: VMSpec | None = None
) -> PrimaryAgent | SecondaryAgent:
    """Hold the replica and fail over when needed; after a failover, keep the VM running;
    after a planned switchover, protect the VM from here."""
    return await run_node(cfg, "secondary", node_id=node_id or node_identity(cfg), spec=spec)


async def run_node(
    cfg: KemariConfig, role: str, *, node_id: str, spec: VMSpec | None = None
) -> PrimaryAgent | SecondaryAgent:
    """Run this host's agent, changing roles at a planned switchover, until stopped.

    A switchover ends the primary agent with ``outcome == "standby"`` (its VM handed
    to the peer): the node goes on as the standby, with the stopped guest's RAM kept as
    its replica. It ends the secondary agent with a ``handover`` (the resumed VM, its
    taps, and the dirty tracking armed before it resumed): the node goes on as the
    primary, protecting that very VM towards its peer, first with a delta on the kept
    RAM when both prove they hold the same checkpoint
    (:mod:`kemari_suite.checkpoint.baseline`). Returns the last agent.

    Raises:
        ConfigError: a guest output escapes output commit (an untapped NIC, disk, serial
            channel or USB redirection) and was not accepted with ``unprotected_output``;
            nothing has started then. Or ``metrics.listen`` cannot be served (a port
            in use): the VM has not started then either.
    """
    # Refuse untapped output before anything starts (and before an image is built).
    check_outputs(cfg, spec)
    stop = asyncio.Event()
    _install_signals(stop)
    warn = False
    if spec is None:
        # A plain config: the project's own guest image (the last `kemari image build`
        # output when [image] is empty). A VM definition brings its own.
        choice = await asyncio.to_thread(select_image, cfg)
        spec = vm_spec(cfg, choice)
        warn = choice.differs_from_last_build
        check_outputs(cfg, spec)
    # The uffd-wp tracker's helper, on both hosts: the failover start becomes a primary.
    spec = await asyncio.to_thread(wphelper.attach, cfg, spec)
    log.info("uffd-wp helper: %s", spec.wp_helper_reason)
    # Bound before the VM starts (a port in use is a ConfigError), for the node's whole
    # run: a switchover changes the agent, not the scrape target.
    exporter = _serve_metrics(cfg, spec.name)
    notifier = AgentNotifier.from_environ()
    notifier.start(stop)
    try:
        return await _run_roles(
            cfg,
            role,
            node_id=node_id,
            spec=spec,
            warn=warn,
            stop=stop,
            exporter=exporter,
            notifier=notifier,
        )
    finally:
        notifier.close()
        if exporter is not None:
            exporter.close()


async def _run_roles(
    cfg: KemariConfig,
    role: str,
    *,
    node_id: str,
    spec: VMSpec,
    warn: bool,
    stop: asyncio.Event,
    exporter: Exporter | None,
    notifier: AgentNotifier,
) -> PrimaryAgent | SecondaryAgent:
    """:func:`run_node`'s loop: one agent per role, until ``stop`` is set."""
    handover: Handover | None = None
    kept: KeptRAM | None = None

    async def before_cont(vm: AsyncVM) -> DirtyTracker:
        return await arm_at_resume(cfg, vm)

    while True:
        folder = artifacts_dir(cfg, role)
        _log_to(folder)
        _log_image(spec, warn=warn)
        for line in unprotected_outputs(cfg, spec):
            log.warning("unprotected output, accepted by the operator: %s", line)
        agent: PrimaryAgent | SecondaryAgent
        if role == "primary":
            agent = PrimaryAgent(cfg, spec, node_id=node_id, artifacts=folder)
            if exporter is not None:
                exporter.attach(agent, role)
            if handover is not None:
                report = handover.report.__dict__ if handover.report is not None else None
                await agent.adopt(
                    handover.vm,
                    handover.io,
                    handover.epoch,
                    failover=report,
                    guest_events=handover.guest_events,
                    tracker=cast("DirtyTracker | None", handover.tracking),
                    baseline=SwitchBaseline(handover.epoch, handover.lineage, handover.ram_digest),
                )
            else:
                await agent.start_vm()
            handover = None
        else:
            agent = SecondaryAgent(
                cfg,
                spec,
                node_id=node_id,
                artifacts=folder,
                probe=probe_guest,
                kept=kept,
                before_cont=before_cont,
            )
            kept = None
            if exporter is not None:
                exporter.attach(agent, role)
        notifier.attach(agent, role)
        task = asyncio.create_task(agent.run())
        sampler = exporter.sample(agent.status_dict) if exporter is not None else None
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            agent.request_stop()
        stopper.cancel()
        try:
            await task
        finally:
            if sampler is not None:
                sampler.cancel()
        switched = isinstance(agent, PrimaryAgent) and agent.outcome == "standby"
        if stop.is_set():
            if switched:
                # The RAM kept for a standby that will not run.
                agent.vm.paths.ram.unlink(missing_ok=True)
            return agent
        if isinstance(agent, PrimaryAgent) and switched:
            log.info("node %s: switched over, standing by", node_id)
            kept = KeptRAM(agent.vm.paths.ram, agent.switched_epoch, agent.switched_lineage)
            role = "secondary"
            continue
        if isinstance(agent, SecondaryAgent) and agent.handover is not None:
            log.info("node %s: took the VM over, protecting it", node_id)
            handover = agent.handover
            role = "primary"
            continue
        return agent
