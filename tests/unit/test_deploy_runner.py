"""ansible-runner runs as typed results: events, recap, failures and artifact folders."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from kemari_suite.deploy import runner
from kemari_suite.deploy.runner import (
    DeployEvent,
    DeployOptions,
    DeployResult,
    EventKind,
    HostStats,
    RunStatus,
    TaskFailure,
)
from kemari_suite.errors import ConfigError, DeployError


def ev(kind: str, **data: Any) -> dict[str, Any]:
    return {"event": kind, "event_data": data}


def test_collector_turns_events_into_progress_stats_and_failures() -> None:
    seen: list[DeployEvent] = []
    c = runner._Collector(seen.append)
    for e in [
        ev("playbook_on_play_start", play="Provision Kemari host pairs"),
        ev("playbook_on_task_start", task="Create the Kemari directories", role="common"),
        ev("runner_on_ok", host="a", task="Create the Kemari directories", res={"changed": True}),
        ev("runner_on_skipped", host="b", task="Create the Kemari directories"),
        ev(
            "runner_on_unreachable",
            host="b",
            task="Create the Kemari directories",
            role="common",
            res={
                "msg": "All items completed",
                "unreachable": True,
                "results": [
                    {"unreachable": True, "msg": "Failed to connect to the host via ssh: refused"}
                ],
            },
        ),
        ev(
            "runner_on_failed",
            host="a",
            task="Write the DRBD resource",
            role="drbd",
            res={"msg": "failed to validate", "stderr": "line one\nno such node\n"},
        ),
        ev("runner_on_failed", host="a", task="ignored", res={"msg": "x"}, ignore_errors=True),
        ev(
            "playbook_on_stats",
            ok={"a": 3, "b": 1},
            changed={"a": 1},
            failures={"a": 1},
            dark={"b": 1},
            skipped={"b": 1},
        ),
    ]:
        assert c(e) is True
    assert [(s.kind, s.host) for s in seen] == [
        (EventKind.PLAY, None),
        (EventKind.TASK, None),
        (EventKind.CHANGED, "a"),
        (EventKind.SKIPPED, "b"),
        (EventKind.UNREACHABLE, "b"),
        (EventKind.FAILED, "a"),
        (EventKind.RECAP, None),
    ]
    assert seen[1].name == "common : Create the Kemari directories"
    assert c.failures == [
        TaskFailure(
            "b",
            "common : Create the Kemari directories",
            "unreachable: Failed to connect to the host via ssh: refused",
            unreachable=True,
        ),
        TaskFailure("a", "drbd : Write the DRBD resource", "failed to validate | no such node"),
    ]
    assert c.stats == {
        "a": HostStats(ok=3, changed=1, failed=1),
        "b": HostStats(ok=1, unreachable=1, skipped=1),
    }


def result(**kw: Any) -> DeployResult:
    base: dict[str, Any] = {
        "ident": "x",
        "artifact_dir": Path("/runs/x"),
        "status": RunStatus.SUCCESSFUL,
        "rc": 0,
        "check": False,
        "limit": None,
        "duration_s": 1.0,
    }
    return DeployResult(**{**base, **kw})


def test_raise_for_failure_names_host_and_task() -> None:
    ok = result(stats={"a": HostStats(ok=2, changed=1), "b": HostStats(ok=2)})
    assert ok.ok and ok.changed == 1
    ok.raise_for_failure()
    bad = result(
        status=RunStatus.FAILED, rc=2, failures=[TaskFailure("b", "kemari : Install", "no pip")]
    )
    with pytest.raises(DeployError) as info:
        bad.raise_for_failure()
    assert (info.value.host, info.value.task, info.value.reason) == (
        "b",
        "kemari : Install",
        "no pip",
    )
    assert str(info.value) == "host b task 'kemari : Install': no pip"
    early = result(status=RunStatus.FAILED, rc=4, stdout_tail="ERROR! the role 'x' was not found")
    with pytest.raises(DeployError, match=r"rc 4\): ERROR! the role 'x'.*/runs/x"):
        early.raise_for_failure()
    assert json.loads(json.dumps(bad.to_dict()))["failures"][0]["host"] == "b"


def local_pair(tmp_path: Path) -> Path:
    inv = tmp_path / "inv" / "hosts.yml"
    inv.parent.mkdir()
    hosts = {
        "a": {"kemari_role": "primary", "ansible_connection": "local"},
        "b": {"kemari_role": "secondary", "ansible_connection": "local"},
    }
    inv.write_text(yaml.safe_dump({"all": {"children": {"kemari": {"hosts": hosts}}}}))
    return inv


def test_deploy_runs_a_playbook_and_keeps_an_artifact_folder(tmp_path: Path) -> None:
    import sys

    inv = local_pair(tmp_path)
    book = tmp_path / "book.yml"
    book.write_text(
        yaml.safe_dump(
            [
                {
                    "name": "Try",
                    "hosts": "kemari",
                    "gather_facts": False,
                    "tasks": [
                        {"name": "Say hello", "ansible.builtin.debug": {"msg": "{{ greeting }}"}},
                        {
                            "name": "Fail on b",
                            "ansible.builtin.fail": {"msg": "b is broken"},
                            "when": "inventory_hostname == 'b'",
                        },
                    ],
                }
            ]
        )
    )
    seen: list[DeployEvent] = []
    res = runner.deploy(
        DeployOptions(
            inventory=inv,
            playbook=book,
            extravars={"greeting": "hi", "ansible_python_interpreter": sys.executable},
        ),
        progress=seen.append,
    )
    assert res.status is RunStatus.FAILED and not res.ok
    assert res.failures == [TaskFailure("b", "Fail on b", "b is broken")]
    assert res.stats["a"].failed == 0 and res.stats["b"].failed == 1
    assert res.artifact_dir.parent == inv.parent / ".kemari" / "runs"
    summary = json.loads((res.artifact_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["failures"][0]["task"] == "Fail on b"
    assert (res.artifact_dir / "job_events").is_dir() and (res.artifact_dir / "stdout").is_file()
    assert EventKind.RECAP in {e.kind for e in seen}
    # A second run gets its own folder.
    again = runner.deploy(
        DeployOptions(
            inventory=inv,
            playbook=book,
            limit="a",
            artifacts=tmp_path / "runs",
            extravars={"greeting": "again", "ansible_python_interpreter": sys.executable},
        )
    )
    assert again.artifact_dir.parent == tmp_path / "runs" and again.ok


def test_deploy_refuses_a_bad_pair_before_running(tmp_path: Path) -> None:
    inv = local_pair(tmp_path)
    inv.write_text(inv.read_text().replace("secondary", "primary"))
    with pytest.raises(ConfigError, match="both hosts are primary"):
        runner.deploy(DeployOptions(inventory=inv))
    assert not (inv.parent / ".kemari").exists()


def test_a_playbook_that_does_not_parse_is_reported_with_ansibles_words(tmp_path: Path) -> None:
    inv = local_pair(tmp_path)
    book = tmp_path / "broken.yml"
    book.write_text("- name: x\n  hosts: kemari\n  tasks:\n    - no_such_module_here: {}\n")
    res = runner.deploy(DeployOptions(inventory=inv, playbook=book))
    assert res.status is RunStatus.FAILED and not res.failures
    assert "no_such_module_here" in res.stdout_tail
    with pytest.raises(DeployError) as info:
        res.raise_for_failure()
    assert info.value.host == "all" and str(res.artifact_dir) in info.value.reason
