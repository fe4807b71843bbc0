"""fl-imaging as a Flower App: the run config keys (in-process), and the demo run through
Flower's own CLI, ``flwr run . <federation> --run-config ...``, on a local simulation federation
(a real process run: the claim is that Flower's CLI, bundle and run config carry over)."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from fl_imaging.config import ConfigError
from fl_imaging.flower.app_config import overrides_of, resolve_config
from tests.cli_runs import output_tail, stop_group

ROOT = Path(__file__).resolve().parents[2]


def _context(run_config: dict, node_config: dict | None = None) -> Context:
    return Context(
        run_id=7,
        node_id=1,
        node_config=node_config or {},
        state=RecordDict(),
        run_config=run_config,
    )


def test_overrides_and_flat_keys_become_hydra_overrides() -> None:
    assert overrides_of({"overrides": "", "num-server-rounds": 0}) == []
    words = overrides_of(
        {"overrides": "experiment=quick 'data.sites=[a, b]'", "num-server-rounds": 4}
    )
    assert words == ["experiment=quick", "data.sites=[a, b]", "engine.rounds=4"]
    with pytest.raises(ConfigError, match="num-server-rounds"):
        overrides_of({"num-server-rounds": -1})
    with pytest.raises(ConfigError, match="overrides"):
        overrides_of({"overrides": "seed='7"})


def test_run_config_overrides_compose_the_packaged_config(tmp_path: Path) -> None:
    run_config = {
        "overrides": "experiment=quick data=folders seed=5",
        "num-server-rounds": 1,
        "run-dir": str(tmp_path / "run"),
        "fl-imaging-config": "",
    }
    # A SuperNode with its own data folder: nothing to prepare, the config only composed.
    cfg = resolve_config(None, _context(run_config, {"data-dir": str(tmp_path)}))
    assert (cfg.seed, cfg.engine.rounds, cfg.run_dir) == (5, 1, str(tmp_path / "run"))
    assert cfg.data.num_sites == 2  # from experiment=quick
    with pytest.raises(ConfigError, match="seeed"):
        resolve_config(None, _context({**run_config, "overrides": "seeed=1"}, {"data-dir": "x"}))


def _local_superlinks(home: Path) -> list[int]:
    """PIDs of the background SuperLinks that ``flwr run`` started for the Flower home
    ``home`` (their log file is inside it)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(b"flower-superlink" in part for part in cmdline) and any(
            str(home).encode() in part for part in cmdline
        ):
            pids.append(int(entry.name))
    return pids


def _stop(pids: list[int]) -> None:
    """SIGTERM the process groups of ``pids`` (each background SuperLink leads its own: its
    simulation and ServerApp processes go with it); SIGKILL what still runs after 20 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.killpg(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
            time.sleep(0.2)


@pytest.mark.slow
def test_flwr_run_of_the_project_runs_the_demo(tmp_path: Path) -> None:
    flwr = shutil.which("flwr", path=str(Path(sys.executable).parent)) or shutil.which("flwr")
    assert flwr, "flwr (Flower's CLI) is not installed beside this Python"
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n'
        "options.num-supernodes = 2\noptions.backend.client-resources.num-cpus = 1\n"
    )
    run_dir = tmp_path / "run"
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    overrides = f"experiment=quick data.root={tmp_path / 'demo'}"
    command = [
        flwr,
        "run",
        ".",
        "local",
        "--stream",
        "--run-config",
        f"overrides='{overrides}' num-server-rounds=1 run-dir='{run_dir}'",
    ]
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "HOME": str(tmp_path),
        # Ray's socket paths must stay under 108 bytes: a short folder, not tmp_path.
        "RAY_TMPDIR": ray_tmp,
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PATH": f"{Path(flwr).parent}:{os.environ.get('PATH', '')}",
    }
    before = (ROOT / "pyproject.toml").read_bytes()
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        stop_group(proc)
        out, _ = proc.communicate()
        raise AssertionError(f"`flwr run` still ran after 240 s\n{output_tail(out)}") from None
    finally:
        stop_group(proc)
        _stop(_local_superlinks(home))
        shutil.rmtree(ray_tmp, ignore_errors=True)
    (tmp_path / "flwr-run.log").write_text(out)
    assert proc.returncode == 0, output_tail(out)
    assert "Exit Code:" not in out, output_tail(out)  # a failed simulation still exits 0
    assert not _local_superlinks(home), "the local SuperLink still runs"
    assert (ROOT / "pyproject.toml").read_bytes() == before  # Flower left the project alone
    with (run_dir / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    sites = {r["site"] for r in rows if r["metric"] == "dice"}
    assert sites >= {"site-1", "site-2"}, rows[:5]
    assert {r["round"] for r in rows} == {"1"}
    assert (run_dir / "model.pt").is_file()
    # The run folder's config is the one the run config composed.
    assert "rounds: 1" in (run_dir / "config.yaml").read_text()
