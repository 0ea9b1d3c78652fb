"""``ocf:kemari:vm``: Pacemaker manages a Kemari-protected VM as a promotable clone.

Promoted is the host running the VM (the primary agent), unpromoted the host holding
its replica (the standby agent). Pacemaker runs the agent as
``/usr/lib/ocf/resource.d/kemari/vm ACTION`` with its parameters in
``OCF_RESKEY_*``; :func:`run` is that call, without printing or exiting (the thin entry
point is :mod:`kemari_suite.cli.ocf`). docs/pacemaker.md has the resource definition.

What each action does, with the ``kemari`` command it stands for::

    start         kemari standby -c CONFIG, detached; its pid in <run_dir>/ocf-<vm>.pid;
                  waits until the control socket answers
    stop          the control socket's "stop" (what `kemari status` talks to); waits for
                  the process to end; SIGKILL to its process group after the timeout
    monitor       kemari status --json; the table below; sets the promotion score
    promote       already the primary: nothing.  standby holding a current checkpoint:
                  after the peer's demote the VM is already here (the demote was a
                  switchover); otherwise, once no checkpoint has arrived for a heartbeat
                  timeout, kemari failover --yes (never --accept-data-loss).
                  waiting, never synchronised, with bootstrap=true: stop the standby and
                  kemari protect -c CONFIG (a cold boot). Anything else is refused
    demote        protected primary: kemari switchover (the VM moves to the peer, this
                  host becomes its standby). fenced or stopped primary (no guest
                  here): restart as the standby. Unprotected or held: refused
    notify        logged; with release_solo_on_peer_stop=true, after the peer's instance
                  stopped while this primary holds output: kemari release --solo
    validate-all  the parameters, then kemari check -c CONFIG (or --vm VMDEF --host HOST)

What monitor reports for each ``kemari status`` (role, state)::

    no answer, no agent process                 7 OCF_NOT_RUNNING   score deleted
    no answer, agent process alive              1 OCF_ERR_GENERIC   score unchanged
    primary starting syncing protected
            unprotected held                    8 RUNNING_PROMOTED  PROMOTED_SCORE
    primary fenced stopped (no guest here)      9 FAILED_PROMOTED   score deleted
    primary switched-over (becoming standby)    0 OCF_SUCCESS       score deleted
    secondary standby, a committed checkpoint   0 OCF_SUCCESS       STANDBY_SCORE
    secondary waiting (never synchronised)      0 OCF_SUCCESS       deleted (bootstrap:
                                                                    BOOTSTRAP_SCORE)
    secondary receiving stopped                 0 OCF_SUCCESS       score deleted
    secondary failing-over active               8 RUNNING_PROMOTED  PROMOTED_SCORE

Only a standby in state ``standby`` gets a score: a standby still resynchronising
(``receiving``) or never synchronised holds no copy to resume; a copy the tiebreaker
knows to be stale is refused by ``kemari failover`` itself, and a diverged disk copy by
the failover. Scores are set with ``crm_attribute --promotion`` (lifetime reboot), as
ocf:linbit:drbd and ocf:pacemaker:Stateful do; outside a cluster (no crm_attribute, or
it fails) the agent logs that and answers all the same.

With ``replication.tiebreaker = "pacemaker"`` (:mod:`kemari_suite.ha.pacemaker`) start
refuses a cluster without fencing (OCF_ERR_CONFIGURED), and the agent records the
cluster's promotion in a grant file that the standby's tiebreaker reads: promote writes
it, so does a ``pre`` notification of a transition that promotes this node (the peer's
demote then hands the VM over here); start, stop and demote remove it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from kemari_suite.config import KemariConfig
from kemari_suite.errors import ConfigError, KemariError
from kemari_suite.ha.ocfhost import AgentProcess, Control, PromotionScore, SocketControl
from kemari_suite.ha.ocfspec import (
    ACTION_TIMEOUTS,
    ACTIONS,
    BOOTSTRAP_SCORE,
    PARAMS,
    PROMOTED_SCORE,
    STANDBY_SCORE,
    OcfRc,
    Params,
    metadata,
    validate,
)
from kemari_suite.ha.pacemaker import PromotionGrant, grant_path, require_fencing

log = logging.getLogger(__name__)

#: Primary states in which the VM runs on this host.
PRIMARY_RUNNING = frozenset({"starting", "syncing", "protected", "unprotected", "held"})
#: Primary states with no guest left on this host (both final).
PRIMARY_DEAD = frozenset({"fenced", "stopped"})
#: Secondary states in which the VM runs here, or is being resumed here.
SECONDARY_PROMOTED = frozenset({"failing-over", "active"})
#: Secondary states of a healthy, unpromoted standby.
SECONDARY_UNPROMOTED = frozenset({"waiting", "receiving", "standby", "stopped"})

#: Seconds kept back from Pacemaker's timeout, to log and answer before it expires.
MARGIN_S = 5.0
#: Poll interval while waiting for the agent.
POLL_S = 0.25
#: How long a grant from a notification lasts: the peer's demote, then our promote.
GRANT_MOVE_S = float(ACTION_TIMEOUTS["demote"] + ACTION_TIMEOUTS["promote"])


@dataclass(frozen=True)
class Observed:
    """What monitor saw: the exit code, the promotion score to set (None: delete it),
    why, and the status it was read from."""

    rc: OcfRc
    score: int | None
    reason: str
    status: dict[str, Any] | None = None

    @property
    def role(self) -> str:
        return str((self.status or {}).get("role", ""))

    @property
    def state(self) -> str:
        return str((self.status or {}).get("state", ""))


def classify(
    status: dict[str, Any] | None, *, process_alive: bool, bootstrap: bool = False
) -> Observed:
    """Monitor's answer for one ``kemari status`` (None: the agent did not answer); see
    the module docstring's table. Pure."""
    if status is None:
        if process_alive:
            return Observed(OcfRc.ERR_GENERIC, None, "agent process alive, control socket silent")
        return Observed(OcfRc.NOT_RUNNING, None, "no agent runs")
    role, state = str(status.get("role")), str(status.get("state"))
    what = f"{role} {state}"
    if role == "primary":
        if state in PRIMARY_RUNNING:
            return Observed(OcfRc.RUNNING_PROMOTED, PROMOTED_SCORE, f"{what}: VM runs here", status)
        if state in PRIMARY_DEAD:
            why = status.get("reason") or "no guest here any more"
            return Observed(OcfRc.FAILED_PROMOTED, None, f"{what}: {why}", status)
        if state == "switched-over":
            return Observed(OcfRc.SUCCESS, None, f"{what}: becoming the standby", status)
    elif role == "secondary":
        if state in SECONDARY_PROMOTED:
            return Observed(OcfRc.RUNNING_PROMOTED, PROMOTED_SCORE, f"{what}: VM here", status)
        committed = int(status.get("last_committed_epoch", -1))
        if state == "standby" and committed >= 0:
            return Observed(
                OcfRc.SUCCESS, STANDBY_SCORE, f"{what}: current copy, epoch {committed}", status
            )
        if state == "waiting" and committed < 0 and bootstrap:
            return Observed(
                OcfRc.SUCCESS, BOOTSTRAP_SCORE, f"{what}: no copy yet, bootstrap allowed", status
            )
        if state in SECONDARY_UNPROMOTED:
            return Observed(OcfRc.SUCCESS, None, f"{what}: no current copy to resume", status)
    return Observed(OcfRc.ERR_GENERIC, None, f"unknown agent state {what!r}", status)


# ---- the actions -----------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """An action's exit code and what it prints on stdout (meta-data only)."""

    rc: OcfRc
    stdout: str = ""


class Refused(KemariError):
    """An action the agent refuses to take, and why (the action exits ``rc``)."""

    def __init__(self, reason: str, rc: OcfRc = OcfRc.ERR_GENERIC) -> None:
        super().__init__(reason)
        self.reason = reason
        self.rc = rc


class VmResource:
    """The actions on one host's instance; see the module docstring."""

    def __init__(
        self,
        params: Params,
        cfg: KemariConfig,
        env: Mapping[str, str],
        *,
        control: Control,
        process: AgentProcess,
        score: PromotionScore,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.params = params
        self.cfg = cfg
        self.env = env
        self.control = control
        self.process = process
        self.score = score
        self.clock = clock
        self.sleep = sleep
        self.action = ""

    # ---- helpers ---------------------------------------------------------------------

    @property
    def under_pacemaker(self) -> bool:
        return self.cfg.replication.tiebreaker == "pacemaker"

    def grant(self, why: str, seconds: float) -> None:
        """Record that Pacemaker promotes this node (``tiebreaker = "pacemaker"``)."""
        if self.under_pacemaker:
            node = self.env.get("OCF_RESKEY_CRM_meta_on_node", "") or socket.gethostname()
            PromotionGrant(node, time.time() + seconds, why).write(grant_path(self.cfg))
            log.info("promotion grant for %s: %s", node, why)

    def revoke(self) -> None:
        if self.under_pacemaker:
            PromotionGrant.clear(grant_path(self.cfg))

    def budget(self) -> float:
        """Seconds this action may take: Pacemaker's timeout less a margin."""
        raw = self.env.get("OCF_RESKEY_CRM_meta_timeout", "")
        try:
            total = int(raw) / 1000
        except ValueError:
            total = float(ACTION_TIMEOUTS.get(self.action, 60))
        return max(1.0, total - MARGIN_S)

    def observe(self) -> Observed:
        return classify(
            self.control.status(),
            process_alive=self.process.alive(),
            bootstrap=self.params.bootstrap,
        )

    def wait_for(
        self, done: Callable[[Observed], bool], timeout: float, *, gone_ok: bool = False
    ) -> Observed:
        """Poll until ``done(observed)`` or ``timeout``; returns the last observation.

        Raises:
            Refused: the agent went away (unless ``gone_ok``).
        """
        deadline = self.clock() + timeout
        while True:
            obs = self.observe()
            log.debug("waiting: %s (%s)", obs.reason, obs.rc.name)
            if done(obs) or self.clock() >= deadline:
                return obs
            if obs.rc is OcfRc.NOT_RUNNING and not gone_ok:
                raise Refused(f"the agent ended: {self.process.log_tail().strip()[-300:]}")
            self.sleep(POLL_S)

    def _spawn(self, command: str) -> None:
        argv = [self.params.kemari, command, *self.params.agent_args()]
        try:
            pid = self.process.spawn(argv)
        except OSError as err:
            raise Refused(f"cannot run {argv[0]}: {err}", OcfRc.ERR_INSTALLED) from err
        log.info("started %s (pid %d), output in %s", " ".join(argv), pid, self.process.logfile)

    def _end_agent(self, timeout: float) -> None:
        """Stop the agent (control "stop", then SIGKILL) and wait for it to be gone.

        Raises:
            Refused: it still runs.
        """
        with contextlib.suppress(KemariError):
            self.control.request("stop", timeout=10.0)
        deadline = self.clock() + max(1.0, timeout - 5.0)
        while self.clock() < deadline:
            if self.control.status() is None and not self.process.alive():
                break
            self.sleep(POLL_S)
        else:
            log.warning("the agent did not stop in time: SIGKILL")
            self.process.kill()
            end = self.clock() + 5.0
            while self.process.alive() and self.clock() < end:
                self.sleep(POLL_S)
        if self.process.alive() or self.control.status() is not None:
            raise Refused("the agent still runs after stop and SIGKILL")
        self.process.forget()

    # ---- actions ---------------------------------------------------------------------

    def monitor(self) -> OcfRc:
        obs = self.observe()
        if obs.rc in (OcfRc.SUCCESS, OcfRc.RUNNING_PROMOTED, OcfRc.NOT_RUNNING):
            self.score.set(obs.score)
        elif obs.rc is OcfRc.FAILED_PROMOTED:
            self.score.set(None)
        log.debug("monitor: %s -> %s", obs.reason, obs.rc.name)
        if obs.rc not in (OcfRc.SUCCESS, OcfRc.RUNNING_PROMOTED, OcfRc.NOT_RUNNING):
            log.error("monitor: %s", obs.reason)
        return obs.rc

    def start(self) -> OcfRc:
        self.revoke()
        if self.under_pacemaker:
            try:
                require_fencing()
            except ConfigError as err:
                raise Refused(str(err), OcfRc.ERR_CONFIGURED) from err
        obs = self.observe()
        if obs.rc in (OcfRc.SUCCESS, OcfRc.RUNNING_PROMOTED):
            log.info("start: already running (%s)", obs.reason)
            self.score.set(obs.score)
            return OcfRc.SUCCESS
        if obs.rc is OcfRc.NOT_RUNNING:
            self._spawn("standby")
        obs = self.wait_for(lambda o: o.status is not None, self.budget())
        if obs.status is None:
            raise Refused(f"the standby agent did not answer: {obs.reason}")
        self.score.set(obs.score)
        log.info("start: %s", obs.reason)
        return OcfRc.SUCCESS

    def stop(self) -> OcfRc:
        self.score.set(None)
        self.revoke()
        if self.control.status() is None and not self.process.alive():
            self.process.forget()
            return OcfRc.SUCCESS
        self._end_agent(self.budget())
        log.info("stop: the agent ended")
        return OcfRc.SUCCESS

    def promote(self) -> OcfRc:
        self.grant("promote", self.budget() + MARGIN_S)
        obs = self.observe()
        if obs.rc is OcfRc.RUNNING_PROMOTED:
            return self._promoted(obs)
        if obs.rc is OcfRc.NOT_RUNNING:
            return OcfRc.NOT_RUNNING
        if obs.rc is not OcfRc.SUCCESS:
            raise Refused(f"not promoting: {obs.reason}")
        st = obs.status or {}
        committed = int(st.get("last_committed_epoch", -1))
        if obs.role == "secondary" and obs.state == "standby" and committed >= 0:
            return self._fail_over(obs)
        if obs.role == "secondary" and obs.state == "waiting" and committed < 0:
            if not self.params.bootstrap:
                raise Refused(
                    "this standby never received a checkpoint: nothing to resume, and "
                    "bootstrap=false forbids a cold boot"
                )
            return self._cold_start()
        raise Refused(f"not promoting: {obs.reason}")

    def _promoted(self, obs: Observed) -> OcfRc:
        """Wait until the VM runs here, then set the promoted score."""

        def settled(o: Observed) -> bool:
            # The VM runs here (a failover's ACTIVE, or the primary role after it), or
            # the attempt ended (anything but an unpromoted standby on its way).
            if o.rc is OcfRc.RUNNING_PROMOTED:
                return o.role == "primary" or o.state == "active"
            if o.status is None and o.rc is OcfRc.ERR_GENERIC:
                return False  # a primary just spawned: its control socket is not up yet
            return o.rc is not OcfRc.SUCCESS

        obs = self.wait_for(settled, self.budget())
        if obs.rc is not OcfRc.RUNNING_PROMOTED:
            raise Refused(f"promotion did not complete: {obs.reason}")
        self.score.set(PROMOTED_SCORE)
        log.info("promote: %s", obs.reason)
        return OcfRc.SUCCESS

    def _fail_over(self, obs: Observed) -> OcfRc:
        """Resume the VM here, once the primary has been silent for a heartbeat timeout:
        a standby still receiving checkpoints has a live primary, and a failover then
        runs the guest twice."""
        first = int((obs.status or {}).get("last_committed_epoch", -1))
        quiet_s = self.cfg.replication.heartbeat_timeout_ms / 1000 + 1.0
        deadline = self.clock() + quiet_s
        while self.clock() < deadline:
            now = self.observe()
            if now.rc is OcfRc.RUNNING_PROMOTED:
                return self._promoted(now)  # a switchover handed the VM here
            if now.status is None or now.state != "standby":
                raise Refused(f"not failing over: {now.reason}")
            epoch = int(now.status.get("last_committed_epoch", -1))
            if epoch > first:
                raise Refused(
                    f"checkpoints still arrive (epoch {first} -> {epoch}): the primary is "
                    "alive and was not demoted; refusing a failover that would run the "
                    "guest twice"
                )
            self.sleep(POLL_S)
        log.info("promote: no checkpoint for %.1f s: kemari failover", quiet_s)
        try:
            self.control.request("failover", timeout=self.budget(), accept_data_loss=False)
        except KemariError as err:
            raise Refused(f"failover refused: {err}") from err
        return self._promoted(self.observe())

    def _cold_start(self) -> OcfRc:
        log.warning("promote: bootstrap: no copy anywhere here, booting the VM from cold")
        self._end_agent(min(30.0, self.budget() / 3))
        self._spawn("protect")
        return self._promoted(self.observe())

    def demote(self) -> OcfRc:
        self.revoke()
        obs = self.observe()
        if obs.rc is OcfRc.NOT_RUNNING:
            return OcfRc.NOT_RUNNING
        if obs.rc is OcfRc.SUCCESS:
            self.score.set(obs.score)
            return OcfRc.SUCCESS
        if obs.rc is OcfRc.FAILED_PROMOTED:
            # No guest here: the agent is done; stand by again.
            log.info("demote: %s: restarting as the standby", obs.reason)
            self._end_agent(self.budget() / 2)
            return self.start()
        if obs.rc is not OcfRc.RUNNING_PROMOTED:
            raise Refused(f"not demoting: {obs.reason}")
        if obs.state in ("starting", "syncing", "failing-over", "active"):
            obs = self.wait_for(
                lambda o: o.state not in ("starting", "syncing", "failing-over", "active"),
                self.budget() / 2,
            )
        if not (obs.role == "primary" and obs.state == "protected"):
            raise Refused(
                f"not demoting: {obs.reason}; with no current standby a demote would lose "
                "the running guest (stop the resource to shut it down)"
            )
        log.info("demote: kemari switchover")
        try:
            res = self.control.request("switchover", timeout=self.budget())
        except KemariError as err:
            raise Refused(f"switchover failed: {err}") from err
        log.info("demote: the VM runs on the peer from epoch %s", (res or {}).get("epoch"))
        obs = self.wait_for(lambda o: o.role == "secondary", self.budget() / 2, gone_ok=True)
        self.score.set(None)
        if obs.role != "secondary":
            raise Refused(f"switched over, but this host is not the standby: {obs.reason}")
        return OcfRc.SUCCESS

    def _handed_over_here(self, me: str) -> bool:
        """This transition promotes this node and demotes a peer that stays up (a move,
        not a failover: a lost peer's instance is stopped too, after fencing)."""
        names = {
            k: set(self.env.get(f"OCF_RESKEY_CRM_meta_notify_{k}_uname", "").split())
            for k in ("promote", "demote", "stop")
        }
        demoted = names["demote"] - {me}
        return me in names["promote"] and bool(demoted) and not demoted & names["stop"]

    def notify(self) -> OcfRc:
        kind = self.env.get("OCF_RESKEY_CRM_meta_notify_type", "")
        op = self.env.get("OCF_RESKEY_CRM_meta_notify_operation", "")
        log.info("notify: %s-%s", kind, op)
        me = self.env.get("OCF_RESKEY_CRM_meta_on_node", "") or socket.gethostname()
        if kind == "pre" and self._handed_over_here(me):
            # A planned move: the peer's demote hands the VM over before our promote.
            self.grant(f"pre-{op} notification: the peer hands over to this node", GRANT_MOVE_S)
        if not (self.params.release_solo_on_peer_stop and kind == "post" and op == "stop"):
            return OcfRc.SUCCESS
        stopped = self.env.get("OCF_RESKEY_CRM_meta_notify_stop_uname", "").split()
        obs = self.observe()
        if stopped and me not in stopped and obs.role == "primary" and obs.state == "held":
            try:
                self.control.request("release", timeout=60.0, solo=True)
                log.warning("notify: the peer's instance stopped: released held output")
            except KemariError as err:
                log.error("notify: kemari release --solo failed: %s", err)
        return OcfRc.SUCCESS


# ---- the entry --------------------------------------------------------------------------


def run(action: str, env: Mapping[str, str] | None = None) -> Outcome:
    """Run one OCF action with the ``OCF_RESKEY_*`` of ``env`` (default: os.environ).

    Never raises for what it can answer with an exit code; logs through ``logging``.
    """
    env = os.environ if env is None else env
    if action == "meta-data":
        return Outcome(OcfRc.SUCCESS, metadata())
    if action not in ACTIONS:
        log.error("unknown action %r (known: %s)", action, ", ".join(ACTIONS))
        return Outcome(OcfRc.ERR_UNIMPLEMENTED)
    try:
        params = Params.from_env(env)
    except ConfigError as err:
        log.error("%s: bad parameters: %s", action, err)
        return Outcome(OcfRc.ERR_CONFIGURED)
    if action == "validate-all":
        rc, why = validate(params)
        (log.info if rc is OcfRc.SUCCESS else log.error)("validate-all: %s", why)
        return Outcome(rc)
    try:
        cfg, sock = params.load()
    except ConfigError as err:
        probe = env.get("OCF_RESKEY_CRM_meta_interval", "0") == "0"
        if action in ("stop", "monitor") and (action == "stop" or probe):
            # A host without the file cannot run the agent: stopped, as probes expect.
            log.warning("%s: %s: reporting not running", action, err)
            return Outcome(OcfRc.SUCCESS if action == "stop" else OcfRc.NOT_RUNNING)
        log.error("%s: %s", action, err)
        return Outcome(OcfRc.ERR_INSTALLED if not params.source.exists() else OcfRc.ERR_CONFIGURED)
    if action in ("start", "promote"):
        rc, why = validate(params, run_check=action == "start")
        if rc is not OcfRc.SUCCESS:
            log.error("%s: %s", action, why)
            return Outcome(rc)
    res = VmResource(
        params,
        cfg,
        env,
        control=SocketControl(sock),
        process=AgentProcess.for_config(cfg),
        score=PromotionScore(env),
    )
    res.action = action
    try:
        rc = {
            "start": res.start,
            "stop": res.stop,
            "monitor": res.monitor,
            "promote": res.promote,
            "demote": res.demote,
            "notify": res.notify,
        }[action]()
    except Refused as err:
        log.error("%s: %s", action, err.reason)
        return Outcome(err.rc)
    except KemariError as err:
        log.error("%s: %s", action, err)
        return Outcome(OcfRc.ERR_GENERIC)
    return Outcome(rc)


__all__ = [
    "ACTIONS",
    "BOOTSTRAP_SCORE",
    "PARAMS",
    "PROMOTED_SCORE",
    "STANDBY_SCORE",
    "AgentProcess",
    "Control",
    "Observed",
    "OcfRc",
    "Outcome",
    "Params",
    "PromotionScore",
    "Refused",
    "SocketControl",
    "VmResource",
    "classify",
    "metadata",
    "run",
    "validate",
]
