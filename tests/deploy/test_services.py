"""``fl-imaging-deploy service``: the systemd units' content (absolute paths, the command parsed
back by our own parser, restart policy, hardening), ``systemd-analyze verify`` on them, the
site's container definition, and a SuperNode service restarted as systemd would (the stand-in
supervisor of unit_supervisor.py) after a child of it was killed by PID.
"""

from __future__ import annotations

import json
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cli_runs import started_cli
from deployment_fixtures import command_env
from unit_supervisor import UnitSupervisor, exec_words, read_unit

from fl_imaging.cli.deploy import _parser, main
from fl_imaging.deploy.certs import make_ca, make_server_certificate, make_site_key
from fl_imaging.deploy.local import LocalFederation
from fl_imaging.deploy.processes import CLIENTAPP_READY, descendants, stop_all
from fl_imaging.deploy.services import (
    REJOIN_WAIT_S,
    ServiceError,
    ServiceSpec,
    exec_quote,
)
from fl_imaging.he.keys import write_key_file
from fl_imaging.review.results import read_metrics

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(sys.prefix)
#: Flower's commands are not always in this venv's bin (a worktree's venv); the units' PATH
#: then names where they are.
FLOWER_ON_PATH = shutil.which("flower-supernode") or (VENV / "bin" / "flower-supernode").is_file()
needs_flower = pytest.mark.skipif(not FLOWER_ON_PATH, reason="flower-supernode is not installed")


def _service_user() -> str:
    """An existing ordinary account (a unit may not run as root)."""
    for entry in pwd.getpwall():
        if entry.pw_uid != 0 and entry.pw_name != "nobody":
            return entry.pw_name
    pytest.skip("no ordinary account on this machine")


def _site_files(root: Path) -> dict[str, Path]:
    """A hospital's files under ``root``: the CA certificate, its key pair, a roster with its
    public key, a policy and its site folder (``hospital a``: a name with a space)."""
    certs = root / "certs"
    make_ca(certs)
    key = make_site_key(root / "keys", "hospital-a")
    roster = root / "roster"
    roster.mkdir()
    shutil.copy(key.public, roster / "hospital-a.pub")
    policy = root / "site.yaml"
    policy.write_text("secure_aggregation:\n  required: true\n")
    data = root / "data" / "hospital a"
    data.mkdir(parents=True)
    write_key_file(root / "consortium.he-key")  # checked like the other site files (tenseal: dev)
    return {
        "ca": certs / "ca.crt",
        "key": key.private,
        "roster": roster,
        "policy": policy,
        "data": data,
    }


#: Every flag of ``supernode`` with a value other than its default (relative paths).
SUPERNODE_FLAGS = [
    "--superlink", "10.0.0.5:9093", "--ca", "certs/ca.crt", "--key", "keys/hospital-a.key",
    "--data-dir", "data/hospital a", "--site-name", "hospital-a", "--state", "node%state",
    "--roster", "roster", "--policy", "site.yaml", "--he-key", "consortium.he-key",
    "--port", "9101", "--isolation", "subprocess",
    "--task", "classification", "--num-classes", "3", "--class-names", "a,b,c",
    "--modalities", "t1,t2",
    "--skip-check", "--rejoin-wait", "120", "--quiet",
]  # fmt: skip


def _absolute(values: dict[str, object], cwd: Path) -> dict[str, object]:
    """``values`` with every path made absolute from ``cwd``."""

    def fix(v: object) -> object:
        if isinstance(v, Path):
            return (cwd / v).resolve()
        if isinstance(v, list):
            return [fix(i) for i in v]
        return v

    return {k: fix(v) for k, v in values.items()}


def test_a_supernode_unit_runs_the_same_role_with_absolute_paths_and_restarts_always(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _site_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    user = _service_user()
    assert main(["service", "--user", user, "supernode", *SUPERNODE_FLAGS, "--out", "units"]) == 0
    assert "systemctl enable --now fl-imaging-supernode-hospital-a" in capsys.readouterr().out
    unit_file = tmp_path / "units" / "fl-imaging-supernode-hospital-a.service"
    unit = read_unit(unit_file)
    service = unit["Service"]
    command = exec_words(service["ExecStart"][0])
    assert command[0] == str((VENV / "bin" / "fl-imaging-deploy").resolve())
    # Parsed back by our own parser, it is the role the admin typed, every path absolute.
    back = vars(_parser().parse_args(command[1:]))
    typed = _absolute(vars(_parser().parse_args(["supernode", *SUPERNODE_FLAGS])), tmp_path)
    assert back == typed
    paths = [w for w in command[1:] if "/" in w and ":" not in w]
    assert paths and all(Path(w).is_absolute() for w in paths), paths
    state = tmp_path / "node%state"
    assert state.is_dir()  # created: ReadWritePaths= must exist when the unit starts
    assert service["User"] == [user]
    assert service["WorkingDirectory"] == [str(state).replace("%", "%%")]
    assert service["Restart"] == ["always"] and service["RestartSec"] == ["10"]
    assert service["KillMode"] == ["mixed"]
    assert exec_words(service["ReadWritePaths"][0]) == [str(state)]
    read_only = exec_words(service["ReadOnlyPaths"][0])
    assert f"-{tmp_path / 'data' / 'hospital a'}" in read_only
    assert f"-{tmp_path / 'keys' / 'hospital-a.key'}" in read_only
    assert service["ProtectSystem"] == ["strict"] and service["NoNewPrivileges"] == ["yes"]
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]
    text = unit_file.read_text()
    assert "journalctl -u fl-imaging-supernode-hospital-a" in text
    assert str(state / "supernode.log") in text and str(state / "clientapp.log") in text


def test_every_supernode_flag_is_carried_into_the_unit() -> None:
    """A flag added to ``supernode`` and left out of SUPERNODE_FLAGS fails here: the unit test
    above then checks it too."""
    parsed = vars(_parser().parse_args(["supernode", *SUPERNODE_FLAGS]))
    defaults = vars(
        _parser().parse_args(
            ["supernode", "--superlink", "x:1", "--ca", "c", "--key", "k", "--data-dir", "d"]
        )
    )
    same = {k for k in parsed if parsed[k] == defaults[k] and k not in ("command", "run", "check")}
    assert same <= {"superlink", "ca", "key", "data_dir"}, same


def test_a_restarted_supernode_waits_for_the_superlink_to_let_the_old_connection_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _site_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    flags = SUPERNODE_FLAGS[: SUPERNODE_FLAGS.index("--rejoin-wait")]
    assert main(["service", "supernode", *flags, "--user", _service_user()]) == 0
    command = exec_words(read_unit_text(capsys.readouterr().out)["Service"]["ExecStart"][0])
    assert float(command[command.index("--rejoin-wait") + 1]) == REJOIN_WAIT_S


def read_unit_text(text: str) -> dict[str, dict[str, list[str]]]:
    """:func:`read_unit` of a unit printed to stdout."""
    with tempfile.NamedTemporaryFile("w", suffix=".service") as handle:
        handle.write(text)
        handle.flush()
        return read_unit(Path(handle.name))


def test_a_superlink_unit_keeps_its_database_under_the_state_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    make_ca(tmp_path / "certs")
    make_server_certificate(tmp_path / "certs", tmp_path / "certs", ["10.0.0.5"])
    runs = tmp_path / "runs"
    runs.mkdir()
    monkeypatch.chdir(tmp_path)
    user = _service_user()
    flags = ["--certs", "certs", "--state", "link", "--port", "9093", "--database", "sl.db"]
    assert main(["service", "superlink", *flags, "--user", user, "--writable", "runs"]) == 0
    service = read_unit_text(capsys.readouterr().out)["Service"]
    command = exec_words(service["ExecStart"][0])
    back = _parser().parse_args(command[1:])
    assert back.database == tmp_path / "link" / "sl.db" and back.certs == tmp_path / "certs"
    assert exec_words(service["ReadWritePaths"][0]) == [str(tmp_path / "link"), str(runs)]
    assert service["Restart"] == ["always"]


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--user", "root"], "would run as root"),
        (["--user", "no-such-user-here"], "no user 'no-such-user-here'"),
        (["--register", "keys/hospital-a.pub", "--database", "sl.db"], "Public key already in use"),
        (["--register", "keys/missing.pub"], "--register keys/missing.pub"),
        (["--venv", "no-venv"], "give --venv the virtual environment"),
        (["--writable", "no-folder"], "(--writable) is not a folder"),
    ],
)
def test_a_unit_that_could_not_run_is_refused_with_what_to_fix(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    flags: list[str],
    words: str,
) -> None:
    make_ca(tmp_path / "certs")
    make_server_certificate(tmp_path / "certs", tmp_path / "certs", [])
    make_site_key(tmp_path / "keys", "hospital-a")
    monkeypatch.chdir(tmp_path)
    user = [] if "--user" in flags else ["--user", _service_user()]
    assert main(["service", "superlink", "--certs", "certs", *user, *flags]) == 2
    assert words in capsys.readouterr().err


def test_unit_words_with_spaces_percent_and_dollar_survive_systemd_quoting(tmp_path: Path) -> None:
    odd = '/srv/fl imaging/100% "a" $HOME \\x'
    assert exec_words(exec_quote(odd)) == [odd]
    with pytest.raises(ServiceError, match="line break"):
        exec_quote("a\nb")
    with pytest.raises(ServiceError, match="absolute"):
        ServiceSpec("x", "x", Path("bin/x"), (), "u", tmp_path, (tmp_path,))


SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
@needs_flower
def test_systemd_analyze_verifies_both_units(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = _site_files(tmp_path)
    make_server_certificate(tmp_path / "certs", tmp_path / "certs", [])
    monkeypatch.chdir(tmp_path)
    user = ["--user", _service_user(), "--out", "units"]
    node = ["--superlink", "10.0.0.5:9093", "--ca", str(files["ca"]), "--key", str(files["key"])]
    assert (
        main(
            ["service", "supernode", *user, *node, "--data-dir", "data/hospital a", "--skip-check"]
        )
        == 0
    )
    assert main(["service", "superlink", *user, "--certs", "certs"]) == 0
    units = sorted((tmp_path / "units").glob("*.service"))
    assert len(units) == 2
    done = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", *map(str, units)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # It may only warn that the account is special (e.g. a system account); nothing else.
    problems = [
        line for line in (done.stdout + done.stderr).splitlines()
        if line.strip() and "configured, this is not safe" not in line
    ]  # fmt: skip
    assert done.returncode == 0 and not problems, done.stdout + done.stderr


def _dockerfile() -> list[tuple[str, str]]:
    """The instructions of deploy/site.Dockerfile: (INSTRUCTION, rest), continuation lines
    joined, comments left out."""
    text = (ROOT / "deploy" / "site.Dockerfile").read_text()
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    found = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def test_the_site_image_runs_our_supernode_command_as_a_non_root_user() -> None:
    steps = _dockerfile()
    assert steps[0] == ("FROM", "python:3.11-slim")
    users = [rest for word, rest in steps if word == "USER"]
    assert users and users[-1] not in ("root", "0")
    runs = " ".join(rest for word, rest in steps if word == "RUN")
    pins = re.findall(r"torch==(\S+)", runs)
    assert pins == ["2.13.0"], pins
    assert "--index-url https://download.pytorch.org/whl/cpu torch==2.13.0" in runs
    assert re.search(r"\"flwr\[[a-z,]+\]==1\.41\.\*\"", runs)
    entry = json.loads(next(rest for word, rest in steps if word == "ENTRYPOINT"))
    assert entry[:2] == ["fl-imaging-deploy", "supernode"]
    args = _parser().parse_args([*entry[1:], "--superlink", "10.0.0.5:9093", "--site-name", "a"])
    assert args.data_dir == Path("/site") and args.state == Path("/state")
    assert args.ca.parent == Path("/certs") and args.key.parent == Path("/certs")
    volumes = json.loads(next(rest for word, rest in steps if word == "VOLUME"))
    assert {"/site", "/state"} <= set(volumes)
    # The docs run it with the certificates read-only and a site name of its own.
    docs = (ROOT / "docs" / "how-to" / "services.md").read_text()
    run = re.search(r"docker run .*?fl-imaging-site[^\n]*", docs, re.S)
    assert run and ":/certs:ro" in run.group(0) and "--site-name" in run.group(0)


# --- a SuperNode service restarted by the stand-in supervisor (real processes) --------------


def _children(pid: int, word: str) -> list[int]:
    """Descendants of ``pid`` whose command line holds ``word``."""
    found = []
    for child in descendants(pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if word in cmdline:
            found.append(child)
    return found


def _running(pid: int) -> bool:
    """True while process ``pid`` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait(condition: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout:.0f} s"
        time.sleep(0.2)


@pytest.fixture
def supervised_site(federation: LocalFederation, tmp_path: Path) -> Iterator[UnitSupervisor]:
    """Site 3 of the session's federation taken over by its service: its processes stopped,
    its unit made by ``fl-imaging-deploy service supernode`` with the same key, folders and
    port, run by :class:`UnitSupervisor` until it says connected. Afterwards the service is
    stopped and the site started again as before."""
    name = "site-3"
    spec = federation.specs[name]
    stop_all(federation.site_processes.pop(name))  # SIGTERM: it leaves the SuperLink at once
    flags = [
        "--superlink", spec.superlink, "--ca", spec.ca_cert, "--key", spec.private_key,
        "--data-dir", spec.data_dir, "--state", spec.state_dir, "--port", spec.runtime_port,
        "--roster", spec.roster, "--skip-check",
    ]  # fmt: skip
    units = tmp_path / "units"
    user = ["--user", _service_user(), "--out", units]
    assert main(["service", "supernode", *map(str, user), *map(str, flags)]) == 0
    supervisor = UnitSupervisor(
        units / f"fl-imaging-supernode-{name}.service", tmp_path / "journal"
    )
    supervisor.start()
    try:
        _wait(lambda: "connected to" in supervisor.journal_text(), 120, "the service connected")
        yield supervisor
    finally:
        supervisor.stop()
        federation.start_site(name, timeout=150)


@pytest.mark.slow
@needs_flower
def test_a_killed_clientapp_runner_takes_its_supernode_down_and_the_service_restarts_both(
    supervised_site: UnitSupervisor,
) -> None:
    first = supervised_site.main_pid()
    assert first is not None
    node = _children(first, "flower-supernode")
    runner = _children(first, "warm_clientapp")
    assert len(node) == 1 and len(runner) == 1
    subprocess.run(["kill", "-KILL", str(runner[0])], check=True)
    # No half a site: the role stops its SuperNode and exits with an error, systemd restarts it.
    _wait(lambda: supervised_site.exit_codes, 60, "the service's command exited")
    assert supervised_site.exit_codes[0] != 0
    assert not _running(node[0]), "the SuperNode outlived its runner: half a site"
    _wait(lambda: supervised_site.journal_text().count("connected to") == 2, 120, "it came back")
    second = supervised_site.main_pid()
    assert second not in (None, first) and len(_children(second, "warm_clientapp")) == 1
    assert len(supervised_site.pids) == 2


@pytest.mark.slow
@pytest.mark.extended  # waits for Flower's heartbeat (2 x 30 s) before the site may rejoin
@needs_flower
def test_a_supernode_killed_mid_run_is_restarted_by_its_service_and_trains_again(
    federation: LocalFederation, supervised_site: UnitSupervisor, tmp_path: Path
) -> None:
    victim = "site-3"
    clientapp_log = federation.specs[victim].state_dir / "clientapp.log"
    seen = len(clientapp_log.read_text())
    args = [
        *federation.fl_imaging_args("experiment=quick", "engine.rounds=16", "engine.min_sites=2"),
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    with started_cli("fl-imaging", *args, cwd=tmp_path, env=command_env(tmp_path)) as run:
        deadline = time.monotonic() + 180
        while "round 2 epoch 1" not in clientapp_log.read_text()[seen:]:
            assert time.monotonic() < deadline and run.poll() is None, "round 2 never started"
            time.sleep(0.2)
        pid = supervised_site.main_pid()
        assert pid is not None
        (node,) = _children(pid, "flower-supernode")
        subprocess.run(["kill", "-KILL", str(node)], check=True)  # a crash, by PID
        output, _ = run.communicate(timeout=300)
    assert run.returncode == 0, output[-4000:]
    assert len(supervised_site.pids) >= 2 and supervised_site.exit_codes[0] != 0
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    trained = {(r.round, r.site) for r in rows if r.metric == "train_loss"}
    assert (2, victim) not in trained and {(2, "site-1"), (2, "site-2")} <= trained
    assert any(rnd >= 3 and site == victim for rnd, site in trained), (
        f"the restarted site was not used again: {sorted(trained)}"
    )
    assert CLIENTAPP_READY.search(clientapp_log.read_text()[seen:])
