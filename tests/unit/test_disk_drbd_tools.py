"""The drbd-utils wrapper: real failing commands, and the command sequences of the backend
checked against drbdadm's own dry run (no root, no kernel module needed)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from kemari_suite.disk.base import DiskBackend, DiskRole
from kemari_suite.disk.drbd import (
    DrbdBackend,
    DrbdConfig,
    DrbdNode,
    DrbdResource,
    DrbdTools,
    render_resource,
)
from kemari_suite.errors import ConfigError, DiskError, DrbdError

SBIN = "/usr/local/sbin:/usr/sbin:/sbin:/usr/bin:/bin"
pytestmark = pytest.mark.skipif(
    shutil.which("drbdadm", path=SBIN) is None,
    reason="drbd-utils not installed (scripts/setup.sh installs it)",
)

CFG = DrbdConfig(
    "kemari0",
    (DrbdNode("alpha", "10.99.0.1", 0), DrbdNode("beta", "10.99.0.2", 1)),
    disk="/dev/vg0/kemari0",
    minor=10,
)


META = ["drbdmeta", "10", "v09", "/dev/vg0/kemari0", "internal"]


def names(cmds: list[list[str]]) -> list[list[str]]:
    return [[Path(c[0]).name, *c[1:]] for c in cmds]


@pytest.fixture
def res_file(tmp_path: Path) -> Path:
    path = tmp_path / "kemari0.res"
    path.write_text(render_resource(CFG))
    return path


def test_bogus_resource_raises_drbderror_with_rc_and_stderr(res_file: Path) -> None:
    tools = DrbdTools()
    with pytest.raises(DrbdError) as info:
        tools.drbdadm_dry_run("bogus", ["drbdadm", "-c", str(res_file), "up", "bogus"], "alpha")
    err = info.value
    assert err.rc == 1
    assert "'bogus' not defined in your config" in err.stderr
    assert err.resource == "bogus"
    assert "up bogus" in err.command
    assert "exited 1" in str(err)


def test_unknown_host_and_missing_file(res_file: Path) -> None:
    tools = DrbdTools()
    with pytest.raises(DrbdError) as info:
        tools.drbdadm_dry_run("kemari0", ["drbdadm", "-c", str(res_file), "up", "kemari0"], "gamma")
    assert info.value.rc == 1
    assert "not defined in your config (for this host)" in info.value.stderr
    with pytest.raises(DrbdError) as info:
        tools.drbdadm_dry_run(
            "kemari0",
            ["drbdadm", "-c", str(res_file.with_name("nope.res")), "up", "kemari0"],
            "alpha",
        )
    assert info.value.rc == 20
    assert "Can not open" in info.value.stderr


def test_unknown_option_is_refused_by_drbdadm(res_file: Path) -> None:
    with pytest.raises(DrbdError) as info:
        DrbdTools().drbdadm_dry_run(
            "kemari0", ["drbdadm", "-c", str(res_file), "primary", "--bogus", "kemari0"], "alpha"
        )
    assert info.value.rc == 1
    assert "unrecognized option '--bogus'" in info.value.stderr


@pytest.mark.skipif(Path("/proc/drbd").exists(), reason="a DRBD kernel module is loaded here")
def test_real_drbdsetup_without_module_raises(res_file: Path) -> None:
    """drbdsetup cannot reach a kernel module here: a real failure with a real exit code."""
    r = DrbdResource(CFG, "alpha", config_path=res_file)
    with pytest.raises(DrbdError) as info:
        r.status()
    assert info.value.rc != 0
    assert info.value.command == "drbdsetup status kemari0 --json"
    assert info.value.stderr.strip()
    with pytest.raises(DrbdError) as info:
        r.events_now()
    assert "events2 kemari0 --now" in info.value.command


def test_missing_tool_is_rc_127() -> None:
    with pytest.raises(DrbdError) as info:
        DrbdTools().run("kemari0", ["drbdadm-that-does-not-exist", "status"])
    assert info.value.rc == 127
    assert "not found" in info.value.stderr


def test_timeout_is_rc_124(tmp_path: Path) -> None:
    # A slow "drbdsetup": the wrapper runs argv[0] as a path when it is one.
    slow = tmp_path / "drbdsetup"
    slow.write_text("#!/bin/sh\nsleep 5\n")
    slow.chmod(0o755)
    with pytest.raises(DrbdError) as info:
        DrbdTools(timeout_s=0.3).run("kemari0", [str(slow), "status"])
    assert info.value.rc == 124


def test_dry_run_backend_records_and_drbdadm_agrees(tmp_path: Path) -> None:
    """The failover sequence, recorded, then expanded by drbdadm's own dry run."""
    tools = DrbdTools(dry_run=True)
    dev = tmp_path / "drbd10"
    dev.write_bytes(bytes(1 << 16))
    conf = tmp_path / "etc" / "kemari0.res"
    backend = DrbdBackend(CFG, "alpha", config_path=conf, tools=tools, device_path=dev)
    assert isinstance(backend, DiskBackend)
    backend.attach()
    backend.promote()
    backend.apply([(4096, b"committed")])
    backend.flush()
    backend.demote()
    st = backend.status()
    backend.close()
    assert st.role is DiskRole.UNKNOWN and st.detail["state"] == "down"  # nothing ran
    assert dev.read_bytes()[4096:4105] == b"committed"
    assert conf.read_text() == render_resource(CFG)
    c = str(conf)
    assert tools.recorded == [
        ("drbdadm", "-c", c, "adjust", "kemari0"),
        ("drbdadm", "-c", c, "primary", "kemari0"),
        ("drbdadm", "-c", c, "secondary", "kemari0"),
        ("drbdsetup", "status", "kemari0", "--json"),
    ]
    real = DrbdTools()
    expanded = {
        argv[3]: names(real.drbdadm_dry_run("kemari0", argv, "alpha"))
        for argv in tools.recorded
        if argv[0] == "drbdadm"
    }
    assert expanded["primary"] == [["drbdsetup", "primary", "kemari0"]]
    assert expanded["secondary"] == [["drbdsetup", "secondary", "kemari0"]]
    # With nothing configured in the kernel (as here), adjust is exactly up.
    up = names(real.drbdadm_dry_run("kemari0", ["drbdadm", "-c", c, "up", "kemari0"], "alpha"))
    assert expanded["adjust"] == up
    assert up[0][:4] == ["drbdsetup", "new-resource", "kemari0", "0"]
    assert ["drbdsetup", "attach", "10", "/dev/vg0/kemari0", "/dev/vg0/kemari0", "internal"] in up
    assert up[-1] == ["drbdsetup", "connect", "kemari0", "1"]
    # Our status command is drbdadm's status command plus --json.
    st_cmd = names(
        real.drbdadm_dry_run("kemari0", ["drbdadm", "-c", c, "status", "kemari0"], "alpha")
    )
    assert st_cmd == [list(tools.recorded[-1][:3])]


@pytest.mark.parametrize(
    ("op", "expected"),
    [
        (lambda r: r.create_md(), [[*META, "create-md", "1"]]),
        (lambda r: r.create_md(force=True, max_peers=2), [[*META, "create-md", "2", "--force"]]),
        (lambda r: r.up(), None),
        (lambda r: r.down(), [["drbdsetup", "down", "kemari0"]]),
        (lambda r: r.primary(force=True), [["drbdsetup", "primary", "kemari0", "--force"]]),
        (lambda r: r.connect(discard_my_data=True),
         [["drbdsetup", "connect", "kemari0", "0", "--discard-my-data"]]),
        (lambda r: r.disconnect(), [["drbdsetup", "disconnect", "kemari0", "0"]]),
        (lambda r: r.verify(), [["drbdsetup", "verify", "kemari0", "0", "0"]]),
    ],
)  # fmt: skip
def test_every_drbdadm_operation_against_drbdadm_dry_run(
    res_file: Path, op: object, expected: list[list[str]] | None
) -> None:
    """As seen from beta (node id 1), whose peer is node 0."""
    tools = DrbdTools(dry_run=True)
    r = DrbdResource(CFG, "beta", config_path=res_file, tools=tools)
    op(r)  # type: ignore[operator]
    (argv,) = tools.recorded
    cmds = names(DrbdTools().drbdadm_dry_run("kemari0", argv, "beta"))
    if expected is None:
        assert cmds[0][:4] == ["drbdsetup", "new-resource", "kemari0", "1"]
    else:
        assert cmds == expected


def _usage_options(cmd: str) -> set[str]:
    out = subprocess.run(
        [shutil.which("drbdsetup", path=SBIN) or "drbdsetup", "help", cmd],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return set(re.findall(r"\[(--[a-z-]+)", out))


def test_drbdsetup_options_exist_in_its_usage(res_file: Path) -> None:
    """drbdsetup checks the kernel module before its options, so check our spellings
    against ``drbdsetup help CMD`` instead."""
    r = DrbdResource(CFG, "alpha", config_path=res_file, tools=DrbdTools(dry_run=True))
    for argv in (r.status_argv(), r.events_argv(now=True), r.events_argv(now=False)):
        assert argv[0] == "drbdsetup" and argv[2] == "kemari0"
        opts = {a.split("=")[0] for a in argv[3:]}
        assert opts <= _usage_options(argv[1]), argv


def test_stranger_node_is_refused() -> None:
    with pytest.raises(ConfigError, match="not a node"):
        DrbdResource(CFG, "gamma")


def test_apply_when_not_primary_is_refused(tmp_path: Path) -> None:
    backend = DrbdBackend(
        CFG,
        "alpha",
        config_path=tmp_path / "r.res",
        tools=DrbdTools(dry_run=True),
        device_path=tmp_path / "dev",
    )
    with pytest.raises(DiskError, match="not primary"):
        backend.apply([(0, b"x")])


# ---- the whole status/events path through sh, with a scripted drbdsetup ----------------

FIX = Path(__file__).resolve().parent.parent / "fixtures" / "drbd"


def scripted_drbdsetup(tmp_path: Path, body: str) -> DrbdTools:
    script = tmp_path / "drbdsetup"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(0o755)
    return DrbdTools(binaries={"drbdsetup": str(script)})


def test_status_through_a_scripted_drbdsetup(tmp_path: Path) -> None:
    args = tmp_path / "args"
    tools = scripted_drbdsetup(
        tmp_path, f'echo "$@" > {args}\ncat {FIX / "status-secondary-syncing.json"}\n'
    )
    backend = DrbdBackend(CFG, "beta", config_path=tmp_path / "r.res", tools=tools)
    st = backend.status()
    assert args.read_text().split() == ["status", "kemari0", "--json"]
    assert st.role is DiskRole.SECONDARY
    assert st.connected and not st.up_to_date
    assert st.resync_percent == 25.0
    assert st.detail["connections"][0]["peer_role"] == "Primary"


def test_status_of_a_resource_that_is_down(tmp_path: Path) -> None:
    tools = scripted_drbdsetup(tmp_path, 'echo "kemari0: No such resource" >&2\nexit 10\n')
    backend = DrbdBackend(CFG, "beta", config_path=tmp_path / "r.res", tools=tools)
    st = backend.status()
    assert st.role is DiskRole.UNKNOWN and st.detail["state"] == "down"


def test_status_failure_other_than_down_raises(tmp_path: Path) -> None:
    tools = scripted_drbdsetup(tmp_path, 'echo "genl: permission denied" >&2\nexit 20\n')
    r = DrbdResource(CFG, "beta", config_path=tmp_path / "r.res", tools=tools)
    with pytest.raises(DrbdError) as info:
        r.status()
    assert info.value.rc == 20 and "permission denied" in info.value.stderr


def test_watch_follows_events_and_stops_drbdsetup(tmp_path: Path) -> None:
    from kemari_suite.disk.drbdstate import DrbdMonitor, SplitBrain

    pidfile = tmp_path / "pid"
    tools = scripted_drbdsetup(
        tmp_path,
        f"echo $$ > {pidfile}\ncat {FIX / 'events2-split-brain.txt'}\nexec sleep 600\n",
    )
    r = DrbdResource(CFG, "alpha", config_path=tmp_path / "r.res", tools=tools)
    mon = DrbdMonitor("kemari0")
    events = r.watch()
    split = None
    for ev in events:
        split = next((n for n in mon.feed(ev) if isinstance(n, SplitBrain) and n.unresolved), None)
        if split is not None:
            break
    events.close()
    assert split == SplitBrain("kemari0", "beta", 1, 0, unresolved=True)
    pid = int(pidfile.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # drbdsetup (here: its sleep) was terminated and reaped


def test_watch_error_exit_is_a_drbderror(tmp_path: Path) -> None:
    tools = scripted_drbdsetup(tmp_path, 'echo "exists -"\necho "no module" >&2\nexit 20\n')
    r = DrbdResource(CFG, "alpha", config_path=tmp_path / "r.res", tools=tools)
    with pytest.raises(DrbdError) as info:
        list(r.watch())
    assert info.value.rc == 20 and "no module" in info.value.stderr
    assert "events2 kemari0 --statistics" in info.value.command
