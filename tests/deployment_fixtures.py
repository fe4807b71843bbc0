"""One federation of real Flower processes on 127.0.0.1 for the whole test session, and one run
on it that several tests read (a pytest plugin: ``pytest_plugins`` in conftest.py, so that
every test file shares the same processes; stopped by PID at the end of the session).

Starting the federation (demo data, a TLS SuperLink with SuperNode authentication, one
SuperNode and its warm ClientApp process per site) takes 10-15 s on 2 cores, a run on it
25-50 s: test_deployment_runs.py and test_cross_site_deployment.py used to start one each and
run twice what one run shows.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cli_runs import run_cli
from runtime_intruder import Answer, acquire_plain

from fl_imaging.data.demo import make_demo_data
from fl_imaging.deploy.local import LocalFederation, start_local
from fl_imaging.deploy.processes import flower_env

#: The overrides of :func:`deployed_run`: every site's models scored at every site and each
#: site's contribution, after a fine-tuning epoch.
EVALUATED = ("engine.cross_site=true", "engine.contributions=true", "engine.finetune_epochs=1")


def command_env(folder: Path) -> dict[str, str]:
    """The environment of an ``fl-imaging`` run against the federation, Flower's and the
    user's files in ``folder``."""
    return flower_env(folder / "flwr-home", {"HOME": str(folder)})


@pytest.fixture(scope="session")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    """3 demo sites (24^3, 6 cases and 2 held-out test cases each), a SuperLink with TLS and
    SuperNode authentication and one SuperNode per site on 127.0.0.1; every process is stopped
    by PID at the end of the session."""
    root = tmp_path_factory.mktemp("deploy")
    sites = make_demo_data(
        root / "data",
        num_sites=3,
        cases_per_site=6,
        shape=(24, 24, 24),
        dicom_sites=(),
        test_cases=2,
    )
    fed = start_local(sites, root / "state", check=False)
    try:
        yield fed
    finally:
        procs = fed.processes
        fed.stop()
        assert not any(p.alive() for p in procs)


class Intruder(threading.Thread):
    """A local process without the SuperNodes' secrets that asks each site's Runtime API for
    ClientApp tasks every half second until stopped; keeps every answer."""

    def __init__(self, addresses: list[str]) -> None:
        super().__init__(daemon=True)
        self.addresses = addresses
        self.answers: list[tuple[str, Answer | Exception]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.5):
            for address in self.addresses:
                try:
                    self.answers.append((address, acquire_plain(address)))
                except Exception as err:  # noted: the test fails on it
                    self.answers.append((address, err))


@dataclass
class DeployedRun:
    """What :func:`deployed_run` left: its folder, the command's output, what the intruder
    got, the Runtime API addresses it tried, and each site's log text (SuperNode and ClientApp
    processes) up to the end of the run."""

    folder: Path
    output: str
    intruder_answers: list[tuple[str, Answer | Exception]]
    addresses: list[str]
    site_logs: dict[str, str]

    @property
    def run_id(self) -> int:
        """The Flower run id, from the command's line ``run N started on the SuperLink``
        (in its main.log)."""
        text = (self.folder / "main.log").read_text()
        match = re.search(r"run (\d+) started on the SuperLink", text)
        assert match, self.output[-2000:]
        return int(match.group(1))


@pytest.fixture(scope="session")
def deployed_run(
    federation: LocalFederation, tmp_path_factory: pytest.TempPathFactory
) -> DeployedRun:
    """``fl-imaging experiment=quick`` with :data:`EVALUATED` on :func:`federation` (2 rounds,
    the test round, the cross-site matrix and contributions), once for the session, while an
    :class:`Intruder` asks every site's Runtime API for tasks."""
    folder = tmp_path_factory.mktemp("deployed-run")
    addresses = [f"127.0.0.1:{spec.runtime_port}" for spec in federation.specs.values()]
    intruder = Intruder(addresses)
    intruder.start()
    try:
        args = federation.fl_imaging_args("experiment=quick", *EVALUATED)
        proc = run_cli(
            "fl-imaging",
            *args,
            f"hydra.run.dir={folder / 'run'}",
            cwd=folder,
            env=command_env(folder),
        )
    finally:
        intruder.done.set()
        intruder.join(timeout=30)
    logs = {
        name: "".join(p.log_text() for p in procs)
        for name, procs in federation.site_processes.items()
    }
    return DeployedRun(folder / "run", proc.stdout + proc.stderr, intruder.answers, addresses, logs)
