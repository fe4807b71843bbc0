"""The multi-machine steps of docs/how-to/deploy.md, run as the page has them: the commands of
its first bash block, read from the page, each party in a folder of its own as working directory
with the page's relative paths, on 127.0.0.1 (TLS and SuperNode authentication on). The page
names the only changes: addresses and ports, each SuperNode's free ``--port``, and the data
folder. Every process started is stopped by PID.

A step the page gains later (a command run to its end, in its party's folder) runs without a
change here; a new kind of step gets a branch in :meth:`Deployment.run`.
"""

from __future__ import annotations

import re
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cli_runs import cli_command, run_cli
from deployment_fixtures import command_env

from fl_imaging.data.demo import make_demo_data
from fl_imaging.deploy.processes import (
    ManagedProcess,
    free_port,
    start_process,
    stop_process,
    wait_for_log,
)
from fl_imaging.review.results import read_metrics

PAGE = Path(__file__).resolve().parents[2] / "docs" / "how-to" / "deploy.md"
#: Hospitals whose keys the page registers (superlink --register, then register).
HOSPITALS = ("hospital-a", "hospital-b", "hospital-c")
#: Hospitals that run a SuperNode: the researcher's data.sites.
SERVING = ("hospital-a", "hospital-b")
#: What the long-running roles print once they serve.
READY = {
    "superlink": re.compile(r"SuperLink on \S+ \(TLS, SuperNode authentication\)"),
    "supernode": re.compile(r"SuperNode \S+ connected to"),
}
#: The researcher's line naming the run's id on the SuperLink (the page's RUN_ID).
RUN_STARTED = re.compile(r"run (\d+) started on the SuperLink")
#: A policy each hospital keeps (--policy site.yaml): it accepts the quick run.
POLICY = "accept:\n  tasks: [segmentation]\nmax_rounds: 50\n"


def page_steps(page: Path = PAGE) -> list[tuple[str, list[str]]]:
    """The commands of the page's first bash block, continuation lines joined, each with its
    party (the ``# coordinator`` / ``# each hospital ...`` / ``# researcher`` comment above
    it): (party, arguments) in page order."""
    block = re.search(r"```bash\n(.*?)```", page.read_text(), re.S)
    assert block, f"{page} has no bash block"
    steps: list[tuple[str, list[str]]] = []
    party = ""
    for line in block.group(1).replace("\\\n", " ").splitlines():
        if line.startswith("#"):
            party = line[1:].split("(")[0].strip()
        elif line.strip():
            steps.append((party, shlex.split(line)))
    return steps


def _replace_value(argv: list[str], flag: str, value: str) -> list[str]:
    """``argv`` with the value after ``flag`` set to ``value`` (the flag must be there)."""
    at = argv.index(flag) + 1
    return [*argv[:at], value, *argv[at + 1 :]]


@dataclass
class Deployment:
    """The parties' folders under ``root``, the SuperLink's loopback address, and every
    process started (stopped by :meth:`stop`, last first)."""

    root: Path
    data: dict[str, Path]
    address: str = field(default_factory=lambda: f"127.0.0.1:{free_port()}")
    processes: list[ManagedProcess] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)
    #: Started, not yet seen serving: (process, the role's ready line).
    pending: list[tuple[ManagedProcess, re.Pattern[str]]] = field(default_factory=list)

    def folder(self, party: str) -> Path:
        """The working directory of ``party`` (``coordinator``, ``researcher``, a hospital)."""
        path = self.root / party
        path.mkdir(exist_ok=True)
        return path

    def hand_over(self) -> None:
        """The files the page sends by hand: ``ca.crt`` to the hospitals and the researcher,
        each hospital's ``.pub`` to the coordinator's ``keys/`` and every hospital's
        ``roster/``; each hospital's policy."""
        ca = self.root / "coordinator" / "certs" / "ca.crt"
        for name in (*HOSPITALS, "researcher"):
            if ca.is_file():
                shutil.copy(ca, self.folder(name) / "ca.crt")
        for name in HOSPITALS:
            (self.folder(name) / "site.yaml").write_text(POLICY)
            for pub in (self.root / name / "keys").glob("*.pub"):
                for target in [self.folder("coordinator") / "keys"] + [
                    self.folder(other) / "roster" for other in HOSPITALS
                ]:
                    target.mkdir(exist_ok=True)
                    shutil.copy(pub, target / pub.name)

    def localised(self, argv: list[str]) -> list[str]:
        """``argv`` on this machine: the page's address becomes :attr:`address`, the
        SuperLink listens on it, a SuperNode gets a free ``--port`` and its demo folder."""
        host, port = self.address.split(":")
        argv = [arg.replace("10.0.0.5:9093", self.address) for arg in argv]
        if "RUN_ID" in argv:
            started = (RUN_STARTED.search(out) for out in self.outputs.values())
            run_id = next(match[1] for match in started if match)
            argv = [run_id if arg == "RUN_ID" else arg for arg in argv]
        if argv[:2] == ["fl-imaging-deploy", "superlink"]:
            argv = _replace_value(_replace_value(argv, "--host", host), "--port", port)
        if argv[:2] == ["fl-imaging-deploy", "supernode"]:
            site = Path(argv[argv.index("--data-dir") + 1]).name
            argv = _replace_value(argv, "--port", str(free_port()))
            argv = _replace_value(argv, "--data-dir", str(self.data[site]))
        return argv

    def run(self, party: str, argv: list[str]) -> None:
        """Run one step of the page in ``party``'s folder: a role that stays in the foreground
        (superlink, supernode) is started and waited for until it serves; any other command
        runs to its end and must exit 0. Roles started one after the other (the SuperNodes)
        start together; every other step waits until they serve."""
        self.hand_over()
        cwd = self.folder(party)
        argv = self.localised(argv)
        command, args = argv[0], argv[1:]
        role = args[0] if command == "fl-imaging-deploy" else ""
        if not any(pattern is READY.get(role) for _, pattern in self.pending):
            self.wait_until_serving()
        if role in READY:
            name = f"{party} {role}"
            log = cwd / f"{role}.out"
            proc = start_process(name, cli_command(command, *args), log, command_env(cwd), cwd)
            self.processes.append(proc)
            self.pending.append((proc, READY[role]))
        else:
            done = run_cli(command, *args, cwd=cwd, env=command_env(cwd))
            self.outputs[f"{party}: {shlex.join(argv)}"] = done.stdout + done.stderr

    def wait_until_serving(self) -> None:
        """Wait until every role started serves (its ready line; 240 s at most each)."""
        while self.pending:
            proc, pattern = self.pending.pop(0)
            wait_for_log(proc, pattern, timeout=240)

    def stop(self) -> None:
        """Stop every process started, last first, by PID (children too)."""
        for proc in reversed(self.processes):
            stop_process(proc)


@pytest.mark.slow
def test_the_how_to_runs_as_written(tmp_path: Path) -> None:
    steps = page_steps()
    commands = [argv[:2] for _, argv in steps]
    assert ["fl-imaging-deploy", "supernode"] in commands
    assert ["fl-imaging-deploy", "pull"] in commands
    sites = make_demo_data(
        tmp_path / "data", num_sites=2, cases_per_site=6, shape=(24, 24, 24), dicom_sites=()
    )
    data = {
        name: site.rename(site.with_name(name)) for name, site in zip(SERVING, sites, strict=True)
    }
    deployment = Deployment(tmp_path / "parties", data)
    deployment.root.mkdir()
    try:
        for party, argv in steps:
            hospitals = SERVING if argv[:2] == ["fl-imaging-deploy", "supernode"] else HOSPITALS
            if party == "each hospital":  # the page's lines, with each hospital's name
                for name in hospitals:
                    deployment.run(name, [arg.replace("hospital-a", name) for arg in argv])
            else:
                deployment.run(party, argv)
        deployment.wait_until_serving()
    finally:
        procs = list(deployment.processes)
        deployment.stop()
    assert not any(p.alive() for p in procs)
    assert len(procs) == 1 + len(SERVING)
    research = next(out for step, out in deployment.outputs.items() if "researcher" in step)
    assert "finished:completed" in research and "round 2/2" in research
    # the researcher's run folder got the coordinator's files; pull fetched them again, equal
    pulled = next(out for step, out in deployment.outputs.items() if " pull " in step)
    assert "SHA-256 checked" in pulled, pulled
    results = deployment.root / "researcher" / "results"
    for name in ("metrics.csv", "summary.txt", "report.html", "model.pt", "audit.jsonl"):
        copies = [  # bundle/models/model.pt is the bundle's own file
            p for p in deployment.root.rglob(name) if not {"results", "bundle"} & set(p.parts)
        ]
        assert copies and all(p.read_bytes() == (results / name).read_bytes() for p in copies)
    registered = next(out for step, out in deployment.outputs.items() if " register " in step)
    assert "registered" in registered
    metrics = [p for p in tmp_path.rglob("metrics.csv") if "results" not in p.parts]
    assert metrics
    trained = {(r.round, r.site) for r in read_metrics(metrics[0]) if r.metric == "train_loss"}
    assert trained == {(rnd, site) for rnd in (1, 2) for site in (*SERVING, "all")}
    for name in SERVING:  # each site kept its state where the page says, relative to its folder
        state = deployment.root / name / "node-state"
        assert (state / "supernode.log").is_file() and (state / "site-record.jsonl").is_file()
