"""The lab's ready-to-run configs, the lab registry, and careful output: no root, no
namespaces (the configs are rendered for a lab that need not be up)."""

from __future__ import annotations

import json
import shlex
import stat
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kemari_suite.config import ImageConfig, KemariConfig, PathsConfig, load, with_overrides
from kemari_suite.lab import configs as labconfigs
from kemari_suite.lab import layout, registry
from kemari_suite.lab.configs import PairOptions
from kemari_suite.lab.pair import LabPair
from kemari_suite.protocol.keys import load_replication_key

LAB = "q7"


@pytest.fixture
def base(tmp_path: Path) -> KemariConfig:
    paths = PathsConfig(
        cache_dir=tmp_path / "cache", run_dir=tmp_path / "run", shm_dir=tmp_path / "shm"
    )
    return KemariConfig(paths=paths)


@pytest.fixture
def registry_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    where = tmp_path / "registry"
    monkeypatch.setattr(registry, "REGISTRY_DIR", where)
    return where


def _write(base: KemariConfig, directory: Path, **opts: object) -> labconfigs.LabConfigs:
    return labconfigs.write(layout(LAB), base, PairOptions(**opts), directory, key="k" * 64)  # type: ignore[arg-type]


def test_each_role_gets_its_own_folders_and_the_files_load(
    base: KemariConfig, tmp_path: Path
) -> None:
    written = _write(base, tmp_path / "cfg", tapped_net=True)
    assert list(written.configs) == ["witness", "secondary", "primary"]
    cfgs = {role: load(path) for role, path in written.configs.items()}
    run_dirs = {c.paths.run_dir for c in cfgs.values()}
    shm_dirs = {c.paths.shm_dir for c in cfgs.values()}
    assert len(run_dirs) == 3 and len(shm_dirs) == 3
    assert cfgs["primary"].paths.run_dir == base.paths.run_dir / f"kemari-{LAB}-pri"
    assert cfgs["secondary"].paths.shm_dir == base.paths.shm_dir / f"kemari-{LAB}-sec"
    for path in written.configs.values():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, "the files hold the key"


def test_hosts_listen_on_their_own_address_and_know_the_other(
    base: KemariConfig, tmp_path: Path
) -> None:
    lay = layout(LAB)
    written = _write(base, tmp_path / "cfg", tapped_net=True)
    pri, sec = load(written.configs["primary"]), load(written.configs["secondary"])
    assert pri.replication.listen == f"{lay.repl_primary_ip}:7410"
    assert pri.replication.peer == sec.replication.listen
    assert sec.replication.peer == pri.replication.listen
    assert pri.replication.witness == sec.replication.witness == f"{lay.lan_client_ip}:7411"
    # One replication key for both hosts; the witness has its own pair key, never it.
    assert load_replication_key(pri) == load_replication_key(sec)
    wit = load(written.configs["witness"])
    assert wit.replication.key == wit.replication.key_file == ""
    assert pri.replication.witness_key_file == str(written.witness_key_file)
    assert written.witness_key_file.parent == wit.witness.keys_dir
    assert (pri.vm.netns, sec.vm.netns) == (lay.ns_primary, lay.ns_secondary)
    assert pri.vm.ip == sec.vm.ip == f"{lay.guest_ip}/24"


def test_output_commit_puts_the_nic_behind_the_proxy(base: KemariConfig, tmp_path: Path) -> None:
    lay = layout(LAB)
    tapped = load(_write(base, tmp_path / "a", tapped_net=True).configs["secondary"])
    assert tapped.vm.netdev == "" and tapped.tap.host_tap == lay.tap_secondary
    plain = load(_write(base, tmp_path / "b", tapped_net=False).configs["secondary"])
    assert plain.tap.host_tap == "" and f"ifname={lay.tap_secondary}" in plain.vm.netdev
    # A plain TAP is accepted only because the config says so, explicitly.
    assert plain.vm.unprotected_output and not tapped.vm.unprotected_output


def test_the_witness_config_is_the_key_and_the_timeout(base: KemariConfig, tmp_path: Path) -> None:
    written = _write(base, tmp_path / "cfg", heartbeat_timeout_ms=5000)
    text = written.configs["witness"].read_text()
    assert "[vm]" not in text and "[image]" not in text
    assert load(written.configs["witness"]).replication.heartbeat_timeout_ms == 5000


def test_image_options_pass_through(base: KemariConfig, tmp_path: Path) -> None:
    image = ImageConfig(add=("/x/prog:/bin/prog",), init="/bin/prog 8000", kernel="/k", initrd="/i")
    written = _write(base, tmp_path / "cfg", image=image, workload="")
    for role in ("primary", "secondary"):
        cfg = load(written.configs[role])
        assert cfg.image == image
        assert cfg.vm.run == "", "an empty vm.run lets the image's init run"
    # Without image options, the base config's [image] goes through.
    custom = with_overrides(base, image={"add": ("/y:/bin/y",), "init": "/bin/y"})
    cfg = load(_write(custom, tmp_path / "cfg2").configs["primary"])
    assert cfg.image.add == ("/y:/bin/y",) and cfg.image.init == "/bin/y"


def test_labpair_and_the_cli_render_the_same_files(base: KemariConfig, tmp_path: Path) -> None:
    opts = PairOptions(tapped_net=True, disk="builtin", reprotect=True)
    pair = LabPair(layout(LAB), base, opts)
    written = labconfigs.write(layout(LAB), base, opts, tmp_path / "cli", key=pair.key)
    for role, path in pair.configs.items():
        ours = path.read_text().replace(str(pair.root), "DIR")
        theirs = written.configs[role].read_text().replace(str(tmp_path / "cli"), "DIR")
        assert ours == theirs, role
    assert (pair.root / "disk-secondary.img").stat().st_size == 16 << 20


def test_launches_in_start_order(base: KemariConfig, tmp_path: Path) -> None:
    lay = layout(LAB)
    written = _write(base, tmp_path / "cfg")
    roles = [(x.role, x.namespace, x.args[0]) for x in written.launches]
    assert roles == [
        ("witness", lay.ns_client, "witness"),
        ("secondary", lay.ns_secondary, "standby"),
        ("primary", lay.ns_primary, "protect"),
    ]
    witness = written.launch("witness")
    assert witness.argv()[-2:] == ["--listen", f"{lay.lan_client_ip}:7411"]
    assert witness.argv(("/opt/k/kemari",))[:5] == [
        "ip",
        "netns",
        "exec",
        lay.ns_client,
        "/opt/k/kemari",
    ]
    assert shlex.split(written.launch("primary").shell()) == written.launch("primary").argv()


def test_every_port_is_listed(base: KemariConfig, tmp_path: Path) -> None:
    lay = layout(LAB)
    counter = {(p.address, p.port) for p in _write(base, tmp_path / "a").ports}
    assert counter == {
        (lay.repl_primary_ip, 7410),
        (lay.repl_secondary_ip, 7410),
        (lay.lan_client_ip, 7411),
        (lay.guest_ip, 7000),
        (lay.lan_primary_ip, 9400),
        (lay.lan_secondary_ip, 9400),
    }
    own = labconfigs.ports(lay, PairOptions(workload=""), guest_ports=(8000,))
    assert (lay.guest_ip, 8000) in {(p.address, p.port) for p in own}
    assert 7000 not in {p.port for p in own}


def test_lab_env_is_shell(base: KemariConfig, tmp_path: Path) -> None:
    lay = layout(LAB)
    written = _write(base, tmp_path / "my dir")
    script = f". {shlex.quote(str(written.env_file))}; echo $NS_CLIENT $GUEST_IP $WITNESS $CONFIGS"
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.split(" ", 3) == [
        lay.ns_client,
        lay.guest_ip,
        f"{lay.lan_client_ip}:7411",
        f"{tmp_path / 'my dir'}\n",
    ]


def test_options_from_config_carry_the_replication_settings() -> None:
    cfg = with_overrides(
        KemariConfig(),
        replication={"mode": "classic", "max_interval_ms": 40, "heartbeat_timeout_ms": 5000},
        tap={"policy": "remus"},
    )
    opts = labconfigs.options_from_config(cfg)
    assert (opts.mode, opts.max_interval_ms, opts.heartbeat_timeout_ms) == ("classic", 40, 5000)
    assert opts.policy == "remus" and opts.tiebreaker == "witness" and opts.image == cfg.image


# --------------------------------------------------------------------------- registry


def test_registry_round_trip(registry_dir: Path, tmp_path: Path) -> None:
    rec = registry.LabRecord("ab", "10g", tmp_path / "run", tmp_path / "shm")
    path = registry.record(rec)
    assert path == registry_dir / "ab.json"
    found = registry.lookup("ab")
    assert found is not None and found.run_dir == tmp_path / "run" and found.created_unix > 0
    registry.note_configs("ab", tmp_path / "cfg")
    assert registry.lookup("ab").configs_dir == tmp_path / "cfg"  # type: ignore[union-attr]
    assert registry.registered() == ["ab"]
    registry.forget("ab")
    registry.forget("ab")
    assert registry.lookup("ab") is None and registry.registered() == []


def test_a_malformed_entry_is_no_entry(registry_dir: Path) -> None:
    registry_dir.mkdir()
    (registry_dir / "zz.json").write_text("{not json")
    (registry_dir / "zy.json").write_text(json.dumps({"lab_id": "zy"}))
    assert registry.lookup("zz") is None and registry.lookup("zy") is None


# --------------------------------------------------------------------------- the CLI


def test_cli_lab_configs_for_a_lab_that_is_not_up(
    tmp_path: Path, registry_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kemari_suite.cli.main import app

    monkeypatch.setenv("KEMARI_RUN", str(tmp_path / "run"))
    monkeypatch.setenv("KEMARI_SHM", str(tmp_path / "shm"))
    prog = tmp_path / "prog"
    prog.write_bytes(b"\x7fELF")
    out_dir = tmp_path / "cfg"
    args = ["lab", "configs", "--id", LAB, "-o", str(out_dir), "--add", f"{prog}:/bin/prog"]
    res = CliRunner().invoke(
        app, [*args, "--init", "/bin/prog 9000", "--guest-port", "9000", "--json"]
    )
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout.strip().splitlines()[-1])
    lay = layout(LAB)
    assert data["configs"]["primary"] == str(out_dir / "primary.toml")
    assert data["commands"]["secondary"].startswith(f"ip netns exec {lay.ns_secondary} ")
    assert {"port": 9000, "address": lay.guest_ip}.items() <= data["ports"][-1].items()
    pri = load(out_dir / "primary.toml")
    assert pri.image.add == (f"{prog}:/bin/prog",) and pri.vm.run == ""
    assert pri.paths.run_dir == tmp_path / "run" / f"kemari-{LAB}-pri"


def test_cli_refuses_half_a_prebuilt_image(tmp_path: Path, registry_dir: Path) -> None:
    from kemari_suite.cli.main import app

    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"")
    res = CliRunner().invoke(
        app, ["lab", "configs", "--id", LAB, "-o", str(tmp_path), "--guest-kernel", str(kernel)]
    )
    assert res.exit_code == 2
    assert "--guest-initrd" in res.output


@pytest.mark.parametrize(
    ("key", "value", "shown"),
    [
        ("failover_ms", 322.48711585998535, "322.5 ms"),
        ("protect_s", 2.971234, "2.97 s"),
        ("pause_ms_p50", None, "-"),
        ("pause_ms_p99", 43.4412, "43.4 ms"),
        ("heartbeat_timeout_ms", 3000, "3000 ms"),
        ("resumed", True, "yes"),
        ("initial_sync_bytes", 45_711_622, "43.6 MiB"),
        ("ratio", 0.123456789, "0.1235"),
        ("checkpoints", 57, "57"),
        ("memory_mib", 128, "128 MiB"),
    ],
)
def test_human_tables_round(key: str, value: object, shown: str) -> None:
    from kemari_suite.cli.main import _human

    assert _human(key, value) == shown


# --------------------------------------------------------------------------- the demo


def test_initial_sync_is_read_from_the_artifacts() -> None:
    from kemari_suite.demo import initial_sync

    events = [
        {"t": 100.0, "event": "state", "state": "syncing"},
        {"t": 100.5, "event": "compat"},
        {"t": 102.97, "event": "state", "state": "protected"},
        {"t": 110.0, "event": "state", "state": "syncing"},
        {"t": 111.0, "event": "state", "state": "protected"},
    ]
    ckpts = [
        {"epoch": 1, "trigger": "initial", "pause_ms": 31.7, "guest_pause_ms": 26.5,
         "bytes_sent": 2_740_830, "precopy_bytes": 42_970_792},
        {"epoch": 2, "trigger": "policy:interval", "pause_ms": 51.4, "bytes_sent": 1},
    ]  # fmt: skip
    seconds, sent, pause = initial_sync(events, ckpts)
    assert seconds == pytest.approx(2.97)
    assert sent == 2_740_830 + 42_970_792 and pause == 26.5
    assert initial_sync([], []) == (None, None, None)


def test_cli_checks_the_configs_it_writes(tmp_path: Path, registry_dir: Path) -> None:
    from kemari_suite.cli.main import app

    res = CliRunner().invoke(
        app, ["lab", "configs", "--id", LAB, "-o", str(tmp_path), "--memory", "8"]
    )
    assert res.exit_code == 2
    assert "vm.memory_mib" in res.output
