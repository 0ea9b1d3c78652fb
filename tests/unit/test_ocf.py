"""``ocf:kemari:vm``'s logic: monitor's answer for every agent state, the promotion
scores, meta-data, validate-all with the real ``kemari check``, and promote/demote
decisions against a scripted control socket (no agent, no cluster)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from kemari_suite.checkpoint.states import PrimaryState
from kemari_suite.config import load
from kemari_suite.errors import ConfigError, KemariError
from kemari_suite.ha import ocf
from kemari_suite.ha.ocf import OcfRc, classify
from kemari_suite.ha.pacemaker import PromotionGrant, grant_path
from kemari_suite.replica.states import SecondaryState

DTD = Path("/usr/share/resource-agents/ra-api-1.dtd")

PRIMARY_RC = {
    PrimaryState.STARTING: OcfRc.RUNNING_PROMOTED,
    PrimaryState.SYNCING: OcfRc.RUNNING_PROMOTED,
    PrimaryState.PROTECTED: OcfRc.RUNNING_PROMOTED,
    PrimaryState.UNPROTECTED: OcfRc.RUNNING_PROMOTED,
    PrimaryState.HELD: OcfRc.RUNNING_PROMOTED,
    PrimaryState.FENCED: OcfRc.FAILED_PROMOTED,
    PrimaryState.SWITCHED: OcfRc.SUCCESS,
    PrimaryState.STOPPED: OcfRc.FAILED_PROMOTED,
}
SECONDARY_RC = {
    SecondaryState.WAITING: OcfRc.SUCCESS,
    SecondaryState.RECEIVING: OcfRc.SUCCESS,
    SecondaryState.STANDBY: OcfRc.SUCCESS,
    SecondaryState.FAILING_OVER: OcfRc.RUNNING_PROMOTED,
    SecondaryState.ACTIVE: OcfRc.RUNNING_PROMOTED,
    SecondaryState.STOPPED: OcfRc.SUCCESS,
}


def status(role: str, state: str, committed: int = 5) -> dict[str, Any]:
    return {"role": role, "state": state, "last_committed_epoch": committed, "reason": ""}


# ---- monitor: every state of both agents ------------------------------------------------


def test_every_agent_state_has_an_answer() -> None:
    # A new state in either lifecycle must be placed in the table (and here).
    assert set(PRIMARY_RC) == set(PrimaryState)
    assert set(SECONDARY_RC) == set(SecondaryState)


@pytest.mark.parametrize("state", list(PrimaryState), ids=lambda s: s.value)
def test_primary_states(state: PrimaryState) -> None:
    obs = classify(status("primary", state.value), process_alive=True)
    assert obs.rc is PRIMARY_RC[state], obs.reason
    want = ocf.PROMOTED_SCORE if obs.rc is OcfRc.RUNNING_PROMOTED else None
    assert obs.score == want


@pytest.mark.parametrize("state", list(SecondaryState), ids=lambda s: s.value)
def test_secondary_states(state: SecondaryState) -> None:
    committed = -1 if state is SecondaryState.WAITING else 5
    obs = classify(status("secondary", state.value, committed), process_alive=True)
    assert obs.rc is SECONDARY_RC[state], obs.reason


def test_not_running_and_silent() -> None:
    assert classify(None, process_alive=False).rc is OcfRc.NOT_RUNNING
    silent = classify(None, process_alive=True)
    assert silent.rc is OcfRc.ERR_GENERIC
    assert "silent" in silent.reason
    assert classify(status("witness", "x"), process_alive=True).rc is OcfRc.ERR_GENERIC


def test_scores_only_for_a_current_copy() -> None:
    def score(role: str, state: str, committed: int, bootstrap: bool = False) -> int | None:
        st = status(role, state, committed)
        return classify(st, process_alive=True, bootstrap=bootstrap).score

    assert score("secondary", "standby", 7) == ocf.STANDBY_SCORE
    # Resynchronising: its committed epoch is older than the primary's run.
    assert score("secondary", "receiving", 7) is None
    assert score("secondary", "waiting", -1) is None
    assert score("secondary", "waiting", -1, bootstrap=True) == ocf.BOOTSTRAP_SCORE
    assert score("secondary", "stopped", 7) is None
    assert score("primary", "protected", 7) == ocf.PROMOTED_SCORE
    assert score("primary", "fenced", 7) is None
    assert ocf.PROMOTED_SCORE > ocf.STANDBY_SCORE > ocf.BOOTSTRAP_SCORE > 0


# ---- meta-data ---------------------------------------------------------------------------


def test_metadata_lists_every_action_and_parameter() -> None:
    out = ocf.run("meta-data", {})
    assert out.rc is OcfRc.SUCCESS
    root = ET.fromstring(out.stdout)
    assert root.tag == "resource-agent"
    assert root.get("name") == "vm"
    assert root.findtext("version") == "1.1"
    actions = [a.get("name") for a in root.iter("action")]
    assert set(actions) == set(ocf.ACTIONS)
    for a in root.iter("action"):
        assert a.get("timeout", "").endswith("s")
    roles = {a.get("role") for a in root.iter("action") if a.get("name") == "monitor"}
    assert roles == {"Promoted", "Unpromoted"}
    params = {p.get("name"): p for p in root.iter("parameter")}
    assert set(params) == {p.name for p in ocf.PARAMS}
    for p in ocf.PARAMS:
        content = params[p.name].find("content")
        assert content is not None
        assert content.get("type") == p.kind
        assert content.get("default") == p.default


@pytest.mark.skipif(
    shutil.which("xmllint") is None or not DTD.exists(), reason="needs xmllint and resource-agents"
)
def test_metadata_is_valid_against_the_dtd(tmp_path: Path) -> None:
    doc = tmp_path / "vm.xml"
    doc.write_text(ocf.metadata())
    proc = subprocess.run(
        ["xmllint", "--noout", "--dtdvalid", str(DTD), str(doc)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


# ---- validate-all, with the real kemari check --------------------------------------------


def kemari() -> str:
    return str(Path(sys.executable).parent / "kemari")


def write_config(tmp_path: Path, extra: str = "") -> Path:
    key = tmp_path / "key"
    key.write_text("k" * 48 + "\n")
    key.chmod(0o600)
    cfg = tmp_path / "kemari.toml"
    cfg.write_text(
        f"""[vm]
name = "ocfvm"
memory_mib = 64
[paths]
run_dir = "{tmp_path / "run"}"
shm_dir = "{tmp_path / "shm"}"
[replication]
key_file = "{key}"
listen = "127.0.0.1:17400"
peer = "127.0.0.1:17401"
{extra}
"""
    )
    return cfg


def env_for(cfg: Path | str, **extra: str) -> dict[str, str]:
    env = {"OCF_RESKEY_config": str(cfg), "OCF_RESKEY_kemari": kemari()}
    env.update({f"OCF_RESKEY_{k}": v for k, v in extra.items()})
    return env


def test_validate_good_config(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    assert ocf.run("validate-all", env_for(cfg)).rc is OcfRc.SUCCESS
    assert ocf.run("validate-all", env_for(cfg, name="ocfvm")).rc is OcfRc.SUCCESS


def test_validate_config_kemari_check_refuses(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, 'mode = "sometimes"')
    assert ocf.run("validate-all", env_for(cfg)).rc is OcfRc.ERR_CONFIGURED


def test_validate_unsafe_key_file(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    (tmp_path / "key").chmod(0o644)
    assert ocf.run("validate-all", env_for(cfg)).rc is OcfRc.ERR_CONFIGURED


def test_validate_missing_file_and_command(tmp_path: Path) -> None:
    missing = env_for(tmp_path / "nope.toml")
    assert ocf.run("validate-all", missing).rc is OcfRc.ERR_INSTALLED
    cfg = write_config(tmp_path)
    no_cmd = env_for(cfg, kemari=str(tmp_path / "no-kemari"))
    assert ocf.run("validate-all", no_cmd).rc is OcfRc.ERR_INSTALLED


def test_validate_another_vms_config(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    assert ocf.run("validate-all", env_for(cfg, name="other")).rc is OcfRc.ERR_ARGS


def test_validate_bad_parameters(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    assert ocf.run("validate-all", env_for(cfg, bootstrap="maybe")).rc is OcfRc.ERR_CONFIGURED
    both = env_for(cfg, vmdef=str(cfg))
    assert ocf.run("validate-all", both).rc is OcfRc.ERR_CONFIGURED
    assert ocf.run("validate-all", {"OCF_RESKEY_config": ""}).rc is OcfRc.ERR_CONFIGURED


def test_unknown_action() -> None:
    assert ocf.run("migrate_to", {}).rc is OcfRc.ERR_UNIMPLEMENTED


def test_probe_without_the_file_is_not_running(tmp_path: Path) -> None:
    env = env_for(tmp_path / "nope.toml", CRM_meta_interval="0")
    assert ocf.run("monitor", env).rc is OcfRc.NOT_RUNNING
    assert ocf.run("stop", env).rc is OcfRc.SUCCESS


# ---- the promotion score -----------------------------------------------------------------


def fake_crm_attribute(tmp_path: Path, rc: int) -> tuple[str, Path]:
    calls = tmp_path / "calls"
    script = tmp_path / "crm_attribute"
    script.write_text(f'#!/bin/sh\necho "$@" >> {calls}\necho nope >&2\nexit {rc}\n')
    script.chmod(0o755)
    return str(script), calls


def test_promotion_score_calls(tmp_path: Path) -> None:
    binary, calls = fake_crm_attribute(tmp_path, 0)
    score = ocf.PromotionScore({"OCF_RESOURCE_INSTANCE": "vm:0"}, binary=binary)
    score.set(100)
    score.set(None)
    score.set(0)
    assert calls.read_text().splitlines() == [
        "--promotion -l reboot -v 100",
        "--promotion -l reboot -D",
        "--promotion -l reboot -D",
    ]


def test_promotion_score_outside_a_cluster(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    binary, _ = fake_crm_attribute(tmp_path, 102)
    ocf.PromotionScore({}, binary=binary).set(100)  # no exception
    ocf.PromotionScore({}, binary=None).set(100)
    assert "exited 102" in caplog.text
    assert "no crm_attribute" in caplog.text


# ---- actions against a scripted control socket -------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s


class FakeControl:
    """A control socket whose status follows a script: ``statuses`` are answered in
    turn (the last one repeats); requests are recorded and may change the status."""

    def __init__(self, *statuses: dict[str, Any] | None) -> None:
        self.statuses = list(statuses)
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.on_request: dict[str, list[dict[str, Any] | None]] = {}
        self.fail: dict[str, str] = {}

    def status(self) -> dict[str, Any] | None:
        if len(self.statuses) > 1:
            return self.statuses.pop(0)
        return self.statuses[0]

    def request(self, cmd: str, *, timeout: float, **args: Any) -> Any:
        self.requests.append((cmd, args))
        if cmd in self.fail:
            raise KemariError(self.fail[cmd])
        if cmd in self.on_request:
            self.statuses = self.on_request[cmd]
        return {"epoch": 9}


class FakeProcess(ocf.AgentProcess):
    def __init__(self, control: FakeControl) -> None:
        super().__init__(Path("/nonexistent/pid"), Path("/nonexistent/log"))
        self.control = control
        self.spawned: list[list[str]] = []

    def alive(self) -> bool:
        return self.control.statuses[0] is not None

    def spawn(self, argv: list[str]) -> int:
        self.spawned.append(argv)
        return 1


def resource(
    tmp_path: Path, control: FakeControl, *, cfg_extra: str = "", **params: str
) -> tuple[ocf.VmResource, FakeProcess, list[int | None]]:
    cfg_path = write_config(tmp_path, cfg_extra)
    p = ocf.Params.from_env(env_for(cfg_path, **params))
    scores: list[int | None] = []

    class Score(ocf.PromotionScore):
        def set(self, score: int | None) -> None:
            scores.append(score)

    clock = Clock()
    proc = FakeProcess(control)
    res = ocf.VmResource(
        p,
        load(cfg_path),
        {"OCF_RESKEY_CRM_meta_timeout": "60000"},
        control=control,
        process=proc,
        score=Score({}),
        clock=clock.now,
        sleep=clock.sleep,
    )
    return res, proc, scores


def test_monitor_sets_the_score(tmp_path: Path) -> None:
    ctl = FakeControl(status("secondary", "standby", 3))
    res, _, scores = resource(tmp_path, ctl)
    assert res.monitor() is OcfRc.SUCCESS
    ctl.statuses = [status("primary", "protected")]
    assert res.monitor() is OcfRc.RUNNING_PROMOTED
    ctl.statuses = [None]
    assert res.monitor() is OcfRc.NOT_RUNNING
    assert scores == [ocf.STANDBY_SCORE, ocf.PROMOTED_SCORE, None]


def test_promote_fails_over_once_the_primary_is_silent(tmp_path: Path) -> None:
    ctl = FakeControl(status("secondary", "standby", 4))
    ctl.on_request["failover"] = [status("secondary", "active", 4), status("primary", "held")]
    res, _, scores = resource(tmp_path, ctl)
    assert res.promote() is OcfRc.SUCCESS
    assert ctl.requests == [("failover", {"accept_data_loss": False})]
    assert scores[-1] == ocf.PROMOTED_SCORE


def test_promote_refuses_while_checkpoints_arrive(tmp_path: Path) -> None:
    ctl = FakeControl(
        status("secondary", "standby", 4),
        status("secondary", "standby", 4),
        status("secondary", "standby", 5),
    )
    res, _, _ = resource(tmp_path, ctl)
    with pytest.raises(ocf.Refused, match=r"primary is\s+alive"):
        res.promote()
    assert ctl.requests == []


def test_promote_after_the_peers_switchover(tmp_path: Path) -> None:
    # The peer's demote handed the VM here: the agent is already the primary.
    ctl = FakeControl(status("primary", "syncing"))
    res, _, _ = resource(tmp_path, ctl)
    assert res.promote() is OcfRc.SUCCESS
    assert ctl.requests == []


def test_promote_refuses_a_stale_copy(tmp_path: Path) -> None:
    ctl = FakeControl(status("secondary", "standby", 4))
    ctl.fail["failover"] = "the holder ran solo: this copy is stale"
    res, _, _ = resource(tmp_path, ctl)
    with pytest.raises(ocf.Refused, match="stale"):
        res.promote()
    assert ctl.requests == [("failover", {"accept_data_loss": False})]


def test_promote_without_a_copy(tmp_path: Path) -> None:
    ctl = FakeControl(status("secondary", "waiting", -1))
    res, proc, _ = resource(tmp_path, ctl)
    with pytest.raises(ocf.Refused, match="bootstrap=false"):
        res.promote()
    ctl = FakeControl(status("secondary", "receiving", 3))
    res, proc, _ = resource(tmp_path, ctl)
    with pytest.raises(ocf.Refused, match="no current copy"):
        res.promote()
    assert proc.spawned == []


def test_promote_bootstrap_cold_boots(tmp_path: Path) -> None:
    ctl = FakeControl(status("secondary", "waiting", -1))
    ctl.on_request["stop"] = [None]
    res, proc, _ = resource(tmp_path, ctl, bootstrap="true")

    def spawn(argv: list[str]) -> int:
        proc.spawned.append(argv)
        ctl.statuses = [status("primary", "starting"), status("primary", "held")]
        return 1

    proc.spawn = spawn  # type: ignore[method-assign]
    assert res.promote() is OcfRc.SUCCESS
    assert [a[1] for a in proc.spawned] == ["protect"]


def test_promote_bootstrap_waits_for_the_new_primarys_socket(tmp_path: Path) -> None:
    # Under a real cluster: the primary just spawned runs but does not answer yet.
    ctl = FakeControl(status("secondary", "waiting", -1))
    ctl.on_request["stop"] = [None]
    res, proc, _ = resource(tmp_path, ctl, bootstrap="true")
    alive = {"now": True}
    proc.alive = lambda: alive["now"]  # type: ignore[method-assign]

    def spawn(argv: list[str]) -> int:
        proc.spawned.append(argv)
        ctl.statuses = [None, None, None, status("primary", "starting"), status("primary", "held")]
        return 1

    def end_agent(timeout: float) -> None:
        ctl.statuses = [None]

    proc.spawn = spawn  # type: ignore[method-assign]
    res._end_agent = end_agent  # type: ignore[method-assign]
    assert res.promote() is OcfRc.SUCCESS


def test_demote_switches_over(tmp_path: Path) -> None:
    ctl = FakeControl(status("primary", "protected"))
    ctl.on_request["switchover"] = [
        status("primary", "switched-over"),
        status("secondary", "waiting", -1),
    ]
    res, _, _ = resource(tmp_path, ctl)
    assert res.demote() is OcfRc.SUCCESS
    assert [c for c, _ in ctl.requests] == ["switchover"]


@pytest.mark.parametrize("state", ["unprotected", "held"])
def test_demote_refuses_to_lose_the_guest(tmp_path: Path, state: str) -> None:
    ctl = FakeControl(status("primary", state))
    res, _, _ = resource(tmp_path, ctl)
    with pytest.raises(ocf.Refused, match="lose"):
        res.demote()
    assert ctl.requests == []


def test_demote_and_promote_of_a_stopped_instance(tmp_path: Path) -> None:
    # As ocf:pacemaker:Stateful: OCF_NOT_RUNNING.
    res, _, _ = resource(tmp_path, FakeControl(None))
    assert res.demote() is OcfRc.NOT_RUNNING
    assert res.promote() is OcfRc.NOT_RUNNING


def test_stop_ends_the_agent(tmp_path: Path) -> None:
    ctl = FakeControl(status("secondary", "standby", 2))
    ctl.on_request["stop"] = [None]
    res, _, scores = resource(tmp_path, ctl)
    assert res.stop() is OcfRc.SUCCESS
    assert [c for c, _ in ctl.requests] == ["stop"]
    assert scores == [None]
    assert res.stop() is OcfRc.SUCCESS  # stopping a stopped resource
    assert len(ctl.requests) == 1


def test_notify_releases_only_when_asked(tmp_path: Path) -> None:
    env = {
        "OCF_RESKEY_CRM_meta_notify_type": "post",
        "OCF_RESKEY_CRM_meta_notify_operation": "stop",
        "OCF_RESKEY_CRM_meta_notify_stop_uname": "peer",
        "OCF_RESKEY_CRM_meta_on_node": "me",
    }
    ctl = FakeControl(status("primary", "held"))
    res, _, _ = resource(tmp_path, ctl)
    res.env = env
    assert res.notify() is OcfRc.SUCCESS
    assert ctl.requests == []
    res, _, _ = resource(tmp_path, ctl, release_solo_on_peer_stop="true")
    res.env = env
    assert res.notify() is OcfRc.SUCCESS
    assert ctl.requests == [("release", {"solo": True})]


# ---- tiebreaker = "pacemaker": the promotion grant -----------------------------------------

PACEMAKER = 'tiebreaker = "pacemaker"'


def test_promote_records_the_clusters_grant(tmp_path: Path) -> None:
    ctl = FakeControl(status("secondary", "standby", 4))
    ctl.on_request["failover"] = [status("secondary", "active", 4)]
    res, _, _ = resource(tmp_path, ctl, cfg_extra=PACEMAKER)
    assert res.promote() is OcfRc.SUCCESS
    grant = PromotionGrant.read(grant_path(res.cfg))
    assert grant is not None and grant.why == "promote"
    ctl.statuses = [status("primary", "protected")]
    ctl.on_request["switchover"] = [status("secondary", "waiting", -1)]
    assert res.demote() is OcfRc.SUCCESS
    assert PromotionGrant.read(grant_path(res.cfg)) is None


def test_no_grant_without_the_pacemaker_tiebreaker(tmp_path: Path) -> None:
    ctl = FakeControl(status("secondary", "standby", 4))
    ctl.on_request["failover"] = [status("secondary", "active", 4)]
    res, _, _ = resource(tmp_path, ctl)
    assert res.promote() is OcfRc.SUCCESS
    assert not grant_path(res.cfg).exists()


@pytest.mark.parametrize(
    ("demote", "stop", "granted"),
    [("peer", "", True), ("peer", "peer", False), ("", "", False)],
    ids=["move", "failover-after-fencing", "no-demote"],
)
def test_notify_grants_only_a_move(tmp_path: Path, demote: str, stop: str, granted: bool) -> None:
    ctl = FakeControl(status("secondary", "standby", 4))
    res, _, _ = resource(tmp_path, ctl, cfg_extra=PACEMAKER)
    res.env = {
        "OCF_RESKEY_CRM_meta_notify_type": "pre",
        "OCF_RESKEY_CRM_meta_notify_operation": "demote",
        "OCF_RESKEY_CRM_meta_notify_promote_uname": "me",
        "OCF_RESKEY_CRM_meta_notify_demote_uname": demote,
        "OCF_RESKEY_CRM_meta_notify_stop_uname": stop,
        "OCF_RESKEY_CRM_meta_on_node": "me",
    }
    assert res.notify() is OcfRc.SUCCESS
    assert (PromotionGrant.read(grant_path(res.cfg)) is not None) is granted


def test_start_refuses_a_cluster_without_fencing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_fencing() -> None:
        raise ConfigError("the cluster has no fencing device", key="replication.tiebreaker")

    monkeypatch.setattr(ocf, "require_fencing", no_fencing)
    ctl = FakeControl(None)
    res, proc, _ = resource(tmp_path, ctl, cfg_extra=PACEMAKER)
    with pytest.raises(ocf.Refused, match="no fencing device") as err:
        res.start()
    assert err.value.rc is OcfRc.ERR_CONFIGURED
    assert proc.spawned == []


def test_entry_point_prints_metadata() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "kemari_suite.cli.ocf", "meta-data"],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "OCF_RESOURCE_INSTANCE": "t"},
    )
    assert proc.returncode == 0
    assert ET.fromstring(proc.stdout).get("name") == "vm"
    proc = subprocess.run(
        [sys.executable, "-m", "kemari_suite.cli.ocf"], capture_output=True, check=False
    )
    assert proc.returncode == OcfRc.ERR_UNIMPLEMENTED
