"""A simulation on an existing Ray cluster (``engine.ray_address``): a head and a second node on
127.0.0.1 with one CPU each, started and stopped by PID here; the run's sites ran on both, and
Ctrl-C stops a run with its files while the cluster stays up."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_runs import run_cli, started_cli
from terminal_signals import sigint_as_in_a_terminal

from fl_imaging.engines.simulation import SimulationError, ray_cluster_cpus
from fl_imaging.review.results import read_metrics

RAY = Path(sys.executable).with_name("ray")
# a site's line in main.log, with the process of the Ray worker it came from
ACTOR = re.compile(r"\[fl_imaging\.client\]\[INFO\]\[pid (\d+) on [^]]*\] - \[site (site-\d+)\]")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _python(code: str, env: dict[str, str]) -> str:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    ).stdout


def _nodes_up(address: str, env: dict[str, str]) -> int:
    code = (
        "import ray\n"
        f"ray.init(address={address!r}, logging_level='ERROR', log_to_driver=False)\n"
        "print('NODES', sum(n['Alive'] for n in ray.nodes()))\n"
    )
    found = re.search(r"NODES (\d+)", _python(code, env))
    return int(found.group(1)) if found else 0


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """Stops ``proc``'s whole process group (a Ray node and its workers): SIGTERM, then
    SIGKILL after 30 s; returns once no process of the group is left."""
    os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while True:
        try:
            os.killpg(proc.pid, signal.SIGKILL if time.monotonic() > deadline else 0)
        except ProcessLookupError:
            break
        proc.poll()
        time.sleep(0.2)
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[str, dict[str, str]]]:
    """A Ray head and a worker node on 127.0.0.1, 1 CPU each, in their own process groups;
    yields the head's address and the environment to reach it; stops both by PID."""
    if not RAY.is_file():
        pytest.skip(f"no `ray` command next to {sys.executable}")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
    folder = Path(tempfile.mkdtemp(prefix="fr-", dir="/tmp"))  # short: Unix socket paths
    address = f"127.0.0.1:{_free_port()}"
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--block"]
    started = []
    try:
        started.append(
            subprocess.Popen(
                [
                    str(RAY),
                    "start",
                    "--head",
                    f"--port={address.split(':')[1]}",
                    "--include-dashboard=false",
                    f"--temp-dir={folder}",
                    *common,
                ],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        )
        deadline = time.monotonic() + 90
        while _nodes_up(address, env) < 1:
            assert time.monotonic() < deadline, "the Ray head did not start"
            time.sleep(2)
        started.append(
            subprocess.Popen(
                [str(RAY), "start", f"--address={address}", *common],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        )
        while _nodes_up(address, env) < 2:
            assert time.monotonic() < deadline, "the second Ray node did not join"
            time.sleep(2)
        yield address, env
    finally:
        for proc in reversed(started):
            _stop_group(proc)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_a_simulation_runs_its_sites_on_both_nodes_of_a_ray_cluster(
    cluster: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    address, env = cluster
    run = run_cli(
        "fl-imaging",
        "experiment=quick",
        "data.num_sites=4",
        "engine.rounds=2",
        f"engine.ray_address={address}",
        f"data.root={tmp_path / 'demo'}",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
        env=env,
    )
    output = run.stdout + run.stderr
    assert f"simulation engine on the Ray cluster at {address} (2 CPUs)" in output
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    assert {r.site for r in rows if r.metric == "train_loss"} == {
        "all",
        "site-1",
        "site-2",
        "site-3",
        "site-4",
    }
    sites_of_pid: dict[int, set[str]] = {}
    for pid, site in ACTOR.findall((tmp_path / "run" / "main.log").read_text()):
        sites_of_pid.setdefault(int(pid), set()).add(site)
    code = (
        "import ray\nfrom ray._private import state\n"
        f"ray.init(address={address!r}, logging_level='ERROR', log_to_driver=False)\n"
        "for a in state.actors().values():\n"
        "    if a.get('ActorClassName') == 'ClientAppActor':\n"
        "        print('ACTOR', a['Pid'], a['Address']['NodeID'])\n"
    )
    node_of_pid = {
        int(pid): node for pid, node in re.findall(r"ACTOR (\d+) (\w+)", _python(code, env))
    }
    nodes = {node_of_pid[pid] for pid in sites_of_pid}
    assert len(nodes) == 2, (sites_of_pid, node_of_pid)  # the sites ran on both nodes
    assert set().union(*sites_of_pid.values()) == {"site-1", "site-2", "site-3", "site-4"}


@pytest.mark.slow
def test_ctrl_c_on_a_cluster_keeps_the_files_and_leaves_the_cluster_running(
    cluster: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    address, env = cluster
    output: list[str] = []
    with started_cli(
        "fl-imaging",
        "experiment=quick",
        "engine.rounds=50",
        f"engine.ray_address={address}",
        f"data.root={tmp_path / 'demo'}",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
        env=env,
        preexec_fn=sigint_as_in_a_terminal,
    ) as proc:
        assert proc.stdout is not None
        deadline = time.monotonic() + 300
        while not any("round 2/50" in line for line in output[-5:]):
            assert time.monotonic() < deadline, "".join(output[-40:])
            line = proc.stdout.readline()
            assert line, "".join(output[-40:])
            output.append(line)
        os.killpg(proc.pid, signal.SIGINT)
        stopped = time.monotonic()
        rest, _ = proc.communicate(timeout=120)
        output.append(rest)
        assert proc.returncode == 130, "".join(output)[-3000:]
        assert time.monotonic() - stopped < 60
    summary = (tmp_path / "run" / "summary.txt").read_text()
    assert "interrupted (Ctrl-C) after round" in summary
    assert "resume=" in "".join(output)
    code = (
        "import ray\nfrom ray._private import state\n"
        f"ray.init(address={address!r}, logging_level='ERROR', log_to_driver=False)\n"
        "print('NODES', sum(n['Alive'] for n in ray.nodes()))\n"
        "print('ACTORS', sum(a['ActorClassName'] == 'ClientAppActor' and a['State'] == 'ALIVE'"
        " for a in state.actors().values()))\n"
    )
    state = _python(code, env)
    assert "NODES 2" in state and "ACTORS 0" in state, (
        state
    )  # the cluster stays, the run's actors went


def test_an_address_where_no_cluster_answers_stops_at_once_naming_it() -> None:
    address = f"127.0.0.1:{_free_port()}"
    started = time.monotonic()
    with pytest.raises(SimulationError, match=rf"engine.ray_address={address}: nothing answers"):
        ray_cluster_cpus(address)
    assert time.monotonic() - started < 15  # not Ray's minutes of retries
