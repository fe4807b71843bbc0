"""Ray started in the background for a simulation (fl_imaging.engines.local_ray): it runs once
waited for, it is stopped with its folder and processes whatever the run did, and a start that
fails stops the run with Ray's reason."""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import pytest

from fl_imaging.config import EngineConfig
from fl_imaging.engines.local_ray import start_local_ray
from fl_imaging.engines.ray_reaper import descendants
from fl_imaging.engines.simulation import SimulationError, run_simulation_engine

pytestmark = pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads processes from /proc")


RAY_PROCESS = re.compile(r"ray::|raylet|gcs_server|/ray/")


def _ray_processes() -> list[int]:
    """This process's descendants that are Ray's (GCS server, raylet, Ray's agents, workers);
    the watcher of fl_imaging.engines.ray_reaper and other tests' processes are not."""
    found = []
    for pid in descendants(os.getpid()):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if RAY_PROCESS.search(cmdline):
            found.append(pid)
    return found


def _gone_within(seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while (left := _ray_processes()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def test_ray_started_in_the_background_runs_tasks_and_stops_with_its_folder() -> None:
    import ray

    local = start_local_ray(EngineConfig(num_cpus=1))
    try:
        local.wait()
        assert ray.is_initialized()
        assert ray.cluster_resources()["CPU"] == 1
        # Flower's own start: the workers get this process's sys.path
        assert os.pathsep.join(sys.path) in os.environ["PYTHONPATH"]
        assert ray.get(ray.remote(lambda: 21 * 2).remote()) == 42
        assert Path(local.temp_dir).is_dir()
    finally:
        local.stop()
    assert not ray.is_initialized()
    assert not Path(local.temp_dir).exists()
    assert _gone_within(10) == []
    local.stop()  # a second stop does nothing


def test_a_run_stopped_while_ray_still_starts_leaves_nothing_behind() -> None:
    import ray

    local = start_local_ray(EngineConfig(num_cpus=1))
    local.stop()  # at once: waits for the start, then shuts Ray down
    assert not ray.is_initialized()
    assert not Path(local.temp_dir).exists()
    assert _gone_within(10) == []


def test_a_ray_that_cannot_start_stops_the_run_with_its_reason(tmp_path: Path) -> None:
    from fl_imaging.config import RunConfig

    broken = start_local_ray(EngineConfig(num_cpus=-1))  # ray.init refuses negative CPUs
    cfg = RunConfig(run_dir=str(tmp_path / "run"))
    with pytest.raises(SimulationError, match=r"Ray could not start on this machine: ValueError"):
        run_simulation_engine(cfg, ["site-1"], plan=None, local_ray=broken)  # type: ignore[arg-type]
    assert not Path(broken.temp_dir).exists()
    assert _gone_within(10) == []
