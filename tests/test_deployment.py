"""Deployment: certificates and keys, the server's handling of sites that come and go, and real
Flower processes on 127.0.0.1 (SuperLink with TLS and SuperNode authentication, 3 SuperNodes).

The process tests share one local federation (module fixture, stopped by PID in its teardown)
and are marked slow; every wait is bounded.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from flower_fakes import FakeGrid
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from runtime_intruder import AUTHENTICATION_FAILED, Answer, acquire_plain

from fl_imaging.compose import check_overrides
from fl_imaging.config import config_from_yaml
from fl_imaging.data.demo import make_demo_data
from fl_imaging.deploy.certs import (
    CertError,
    make_ca,
    make_server_certificate,
    make_site_key,
    verify_server_certificate,
)
from fl_imaging.deploy.local import LocalFederation, start_local
from fl_imaging.deploy.processes import (
    ManagedProcess,
    ProcessError,
    descendants,
    flower_env,
    free_port,
    start_process,
    stop_process,
)
from fl_imaging.deploy.roles import (
    IN_MEMORY_DATABASE,
    SiteCheckError,
    SuperNodeSpec,
    check_site_folder,
    start_supernode,
    superlink_command,
)
from fl_imaging.engines.deployment import write_app_dir
from fl_imaging.protocol import CONFIG_KEY, SITE_NAME, SITE_RECORD
from fl_imaging.results import read_metrics
from strategies import build_strategy
from strategies.availability import NotEnoughSites, SiteAvailability

# ---------------------------------------------------------------- certificates and keys


def test_server_certificate_lists_its_addresses_and_verifies_against_the_ca(tmp_path: Path) -> None:
    make_ca(tmp_path / "ca")
    server = make_server_certificate(
        tmp_path / "ca", tmp_path / "link", ["10.1.2.3", "superlink.example.org"]
    )
    cert = x509.load_pem_x509_certificate(server.cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    ips = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    assert ips == {"10.1.2.3", "127.0.0.1"}
    assert set(san.get_values_for_type(x509.DNSName)) == {"superlink.example.org", "localhost"}
    for host in ("10.1.2.3", "superlink.example.org", "127.0.0.1"):
        verify_server_certificate(server.ca_cert, server.cert, host)
    with pytest.raises(CertError, match="does not list 10.9.9.9"):
        verify_server_certificate(server.ca_cert, server.cert, "10.9.9.9")
    make_ca(tmp_path / "other")
    with pytest.raises(CertError, match="was not issued by the CA"):
        verify_server_certificate(tmp_path / "other" / "ca.crt", server.cert)
    assert (tmp_path / "link" / "server.key").stat().st_mode & 0o777 == 0o600
    with pytest.raises(CertError, match="--force"):
        make_ca(tmp_path / "ca")


def test_site_key_is_openssh_p384_that_flower_accepts(tmp_path: Path) -> None:
    from flwr.cli.supernode.register import try_load_public_key

    key = make_site_key(tmp_path, "hospital-a")
    public_text = key.public.read_text()
    assert public_text.startswith("ecdsa-sha2-nistp384 ") and public_text.rstrip().endswith(
        " hospital-a"
    )
    public = load_ssh_public_key(public_text.encode())
    assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp384r1"
    assert try_load_public_key(key.public)  # what `flwr supernode register` does with it
    private = load_ssh_private_key(key.private.read_bytes(), None)  # what flower-supernode does
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert private.public_key().public_numbers() == public.public_numbers()
    assert key.private.stat().st_mode & 0o777 == 0o600


def test_superlink_state_is_in_memory_unless_a_database_file_is_given(tmp_path: Path) -> None:
    def database(command: list[str]) -> str:
        return command[command.index("--database") + 1]

    assert database(superlink_command(None, tmp_path, "127.0.0.1", 9093)) == IN_MEMORY_DATABASE
    kept = superlink_command(None, tmp_path, "127.0.0.1", 9093, database=Path("state.db"))
    assert database(kept) == str(tmp_path.resolve() / "state.db")


def test_app_dir_declares_the_config_key_and_carries_the_whole_config(tmp_path: Path) -> None:
    from flwr.cli.config_utils import load_and_validate

    cfg = check_overrides(["experiment=quick", "engine=deployment", "seed=7"])
    app = write_app_dir(tmp_path, cfg)
    config, _ = load_and_validate(app / "pyproject.toml")  # Flower's own check, as flwr run
    components = config["tool"]["flwr"]["app"]["components"]
    assert components == {
        "serverapp": "fl_imaging.flower.server_app:app",
        "clientapp": "fl_imaging.flower.client_app:app",
    }
    with (app / "pyproject.toml").open("rb") as handle:
        text = tomllib.load(handle)["tool"]["flwr"]["app"]["config"][CONFIG_KEY]
    assert config_from_yaml(text) == cfg


# ---------------------------------------------------------------- sites that come and go


def _reply(msg: Message, site: str) -> Message:
    content = RecordDict(
        {
            "arrays": msg.content["arrays"],
            "metrics": MetricRecord({"train_loss": 1.0, "num-examples": 4}),
            SITE_RECORD: ConfigRecord({SITE_NAME: site}),
        }
    )
    return Message(content=content, reply_to=msg)


class ShrinkingGrid(FakeGrid):
    """Sites ``site-<node id>`` (a site record in every reply) that train by sending back the
    weights they received; after ``drop_after`` messages only ``remaining`` nodes stay connected."""

    def __init__(self, nodes: int, drop_after: int = 10**9, remaining: int = 1) -> None:
        super().__init__(
            nodes, lambda node, rnd, sent: sent, lambda node: {"train_loss": 1.0, "num-examples": 4}
        )
        self.messages = 0
        self.drop_after, self.remaining = drop_after, remaining

    def get_node_ids(self) -> Iterable[int]:
        if self.messages >= self.drop_after:
            return self.nodes[: self.remaining]
        return super().get_node_ids()

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        self.messages += len(messages)
        return super().send_and_receive(messages, timeout=timeout)


def _arrays() -> ArrayRecord:
    return ArrayRecord([np.ones(3, dtype=np.float32)])


def test_availability_waits_for_min_sites_then_stops_with_a_clear_message() -> None:
    wrapper = SiteAvailability(
        build_strategy(check_overrides([]).strategy, num_sites=3),
        min_sites=2,
        wait_timeout=0.3,
        round_timeout=5,
        site_names=[],
        failures=list,
        poll_seconds=0.05,
    )
    start = time.monotonic()
    with pytest.raises(NotEnoughSites, match=r"only 1 site\(s\) connected.*engine.min_sites=2"):
        wrapper.configure_train(4, _arrays(), ConfigRecord(), ShrinkingGrid(3, 0, 1))
    assert 0.3 <= time.monotonic() - start < 2.0


@pytest.mark.usefixtures("task_identity")
def test_availability_names_failed_and_silent_sites_and_needs_min_replies() -> None:
    failures: list[tuple[int, str, str]] = []
    names: list[str] = []
    wrapper = SiteAvailability(
        build_strategy(check_overrides([]).strategy, num_sites=3, min_sites=2),
        min_sites=2,
        min_replies=2,
        wait_timeout=1,
        round_timeout=7,
        site_names=names,
        failures=lambda: failures,
    )
    grid = ShrinkingGrid(3)
    sent = list(wrapper.configure_train(1, _arrays(), ConfigRecord(), grid))
    assert sorted(m.metadata.dst_node_id for m in sent) == [1, 2, 3]
    arrays, _ = wrapper.aggregate_train(
        1, [_reply(m, f"site-{m.metadata.dst_node_id}") for m in sent]
    )
    assert arrays is not None and names == ["site-1", "site-2", "site-3"]  # first seen, sorted
    # Round 2: node 2 answers with an error (as the recorder notes it), node 3 never answers.
    sent = list(wrapper.configure_train(2, _arrays(), ConfigRecord(), grid))
    by_node = {m.metadata.dst_node_id: m for m in sent}
    error = Message(Error(code=0, reason="Node Unavailable"), reply_to=by_node[2])
    failures.append((2, "node-2", "Node Unavailable"))
    arrays, metrics = wrapper.aggregate_train(2, [_reply(by_node[1], "site-1"), error])
    assert (arrays, metrics) == (None, None)  # 1 usable reply < engine.min_sites=2
    assert failures[0] == (2, "site-2", "Node Unavailable")
    assert failures[1][:2] == (2, "site-3") and "engine.round_timeout=7" in failures[1][2]


@pytest.mark.usefixtures("task_identity")
def test_run_stops_when_sites_stay_away_and_keeps_the_last_checkpoint(tmp_path: Path) -> None:
    from fl_imaging.flower.checkpoint import load_checkpoint
    from fl_imaging.flower.server_app import run_federation

    overrides = ["experiment=quick", "engine.rounds=3", "engine.min_sites=2", "engine.num_sites=3"]
    cfg = replace(check_overrides([*overrides, "engine.wait_timeout=0.5"]), run_dir=str(tmp_path))
    grid = ShrinkingGrid(3, drop_after=6, remaining=1)  # after round 1 (3 train + 3 evaluate)
    recorder = run_federation(grid, cfg, [])
    summary = (tmp_path / "summary.txt").read_text()
    assert "stopped before round 2: only 1 site(s) connected" in summary
    assert "engine.wait_timeout=0.5" in summary and "resume=RUN_DIR" in summary
    assert load_checkpoint(tmp_path).round == 1
    assert {r.site for r in recorder.rows} == {"site-1", "site-2", "site-3", "all"}


def test_min_sites_sets_flowers_sampling_minimum() -> None:
    base = check_overrides([]).strategy
    inner = build_strategy(base, num_sites=3, min_sites=2).inner  # inside the update checks
    assert (inner.min_available_nodes, inner.min_train_nodes, inner.fraction_train) == (2, 2, 1.0)
    with pytest.raises(ValueError, match="engine.min_sites=4"):
        build_strategy(base, num_sites=3, min_sites=4)


# ---------------------------------------------------------------- processes


def _running(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for its reaper does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_stop_process_stops_children_in_their_own_session(tmp_path: Path) -> None:
    script = (
        "import subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'],"
        " start_new_session=True)\n"
        "time.sleep(120)\n"
    )
    proc = start_process(
        "parent", [sys.executable, "-c", script], tmp_path / "p.log", flower_env(tmp_path)
    )
    try:
        deadline = time.monotonic() + 20
        while not descendants(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        children = descendants(proc.pid)
        assert children
    finally:
        stop_process(proc, grace=5)
    assert not proc.alive()
    assert not any(_running(pid) for pid in children)


def test_a_broken_site_folder_is_refused_before_the_supernode_starts(tmp_path: Path) -> None:
    (site,) = make_demo_data(
        tmp_path / "d", num_sites=1, cases_per_site=2, shape=(8, 8, 8), dicom_sites=()
    )
    next((site / "labels").iterdir()).write_bytes(b"not a nifti")
    with pytest.raises(SiteCheckError, match="found problems; the SuperNode is not started"):
        check_site_folder(site)


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    """3 demo sites (24^3, 6 cases each), a SuperLink with TLS and SuperNode authentication and
    one SuperNode per site on 127.0.0.1; every process is stopped by PID at the end."""
    root = tmp_path_factory.mktemp("deploy")
    sites = make_demo_data(
        root / "data", num_sites=3, cases_per_site=6, shape=(24, 24, 24), dicom_sites=()
    )
    fed = start_local(sites, root / "state", check=False)
    try:
        yield fed
    finally:
        procs = fed.processes
        fed.stop()
        assert not any(p.alive() for p in procs)


def _fl_imaging(fed: LocalFederation, run_dir: Path, *overrides: str) -> list[str]:
    args = fed.fl_imaging_args("experiment=quick", *overrides)
    return [sys.executable, "-m", "fl_imaging.cli", *args, f"hydra.run.dir={run_dir}"]


def _env(tmp: Path) -> dict[str, str]:
    return flower_env(tmp / "flwr-home", {"HOME": str(tmp)})


class _Intruder(threading.Thread):
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


@pytest.mark.slow
def test_three_sites_two_rounds_each_site_reads_only_its_folder(
    federation: LocalFederation, tmp_path: Path
) -> None:
    for started in federation.site_processes.values():  # these rounds run with the secret on
        assert "--superexec-auth-secret-file" in started[0].command
    addresses = [f"127.0.0.1:{spec.runtime_port}" for spec in federation.specs.values()]
    intruder = _Intruder(addresses)
    intruder.start()
    try:
        run = subprocess.run(
            _fl_imaging(federation, tmp_path / "run"),
            capture_output=True,
            text=True,
            env=_env(tmp_path),
            timeout=300,
        )
    finally:
        intruder.done.set()
        intruder.join(timeout=30)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    # Meanwhile, every try of the intruder was refused by Flower's SuperExec authentication.
    assert {address for address, _ in intruder.answers} == set(addresses)
    refused = Answer(401, AUTHENTICATION_FAILED)
    assert all(answer == refused for _, answer in intruder.answers), intruder.answers
    assert "finished:completed" in run.stdout + run.stderr
    out = tmp_path / "run"
    for name in ("metrics.csv", "summary.txt", "model.pt", "curves.png", "config.yaml"):
        assert (out / name).is_file(), name
    rows = read_metrics(out / "metrics.csv")
    names = list(federation.specs)
    assert {r.site for r in rows} == {*names, "all"}
    for rnd in (1, 2):
        for site in names:
            got = {r.metric for r in rows if r.round == rnd and r.site == site}
            assert {"train_loss", "dice", "num_train", "num_val"} <= got, (rnd, site, got)
    for name, spec in federation.specs.items():
        logs = "".join(p.log_text() for p in federation.site_processes[name])
        assert f"[site {name}]" in logs and str(spec.data_dir) in logs
        assert "accepts this runner's requests (signed with the SuperExec secret)" in logs
        others = [str(s.data_dir) for n, s in federation.specs.items() if n != name]
        assert not any(other in logs for other in others)


def _refused(spec: SuperNodeSpec, tweak: callable | None = None) -> ManagedProcess:  # type: ignore[valid-type]
    from fl_imaging.deploy.roles import supernode_command

    command = supernode_command(spec)
    if tweak is not None:
        command = tweak(command)
    proc = start_process("refused", command, spec.state_dir / "supernode.log", _env(spec.state_dir))
    try:
        proc.popen.wait(timeout=60)
    finally:
        stop_process(proc, grace=5)
    return proc


@pytest.mark.slow
def test_unregistered_supernode_is_refused(federation: LocalFederation, tmp_path: Path) -> None:
    stranger = make_site_key(tmp_path / "keys", "stranger")
    spec = SuperNodeSpec(
        data_dir=next(iter(federation.specs.values())).data_dir,
        superlink=federation.superlink,
        ca_cert=federation.ca_cert,
        private_key=stranger.private,
        state_dir=tmp_path / "stranger",
        runtime_port=free_port(),
    )
    with pytest.raises(ProcessError, match="Failed to activate SuperNode"):
        start_supernode(spec, timeout=60)
    assert "No SuperNode found with the given public key" in federation.superlink_process.log_text()


@pytest.mark.slow
def test_plain_text_and_unverified_clients_are_refused(
    federation: LocalFederation, tmp_path: Path
) -> None:
    base = dict(
        data_dir=next(iter(federation.specs.values())).data_dir,
        superlink=federation.superlink,
        private_key=None,
    )
    plain = _refused(
        SuperNodeSpec(
            **base,
            ca_cert=None,
            state_dir=tmp_path / "plain",
            runtime_port=free_port(),
            max_retries=2,
        )  # type: ignore[arg-type]
    )
    assert plain.popen.returncode != 0
    assert "Server disconnected without sending a response" in plain.log_text()
    no_ca = _refused(
        SuperNodeSpec(**base, ca_cert=None, state_dir=tmp_path / "no-ca", runtime_port=free_port()),  # type: ignore[arg-type]
        tweak=lambda cmd: [c for c in cmd if c != "--insecure"],  # TLS, system CAs only
    )
    assert no_ca.popen.returncode != 0
    assert "CERTIFICATE_VERIFY_FAILED" in no_ca.log_text()


@pytest.mark.slow
def test_a_site_killed_in_round_2_is_recorded_and_used_again_when_back(
    federation: LocalFederation, tmp_path: Path
) -> None:
    victim = "site-3"
    clientapp = federation.site_processes[victim][-1]  # its long-lived ClientApp process
    seen = len(clientapp.log_text())  # it served the other test's run already
    run = subprocess.Popen(
        _fl_imaging(federation, tmp_path / "run", "engine.rounds=16", "engine.min_sites=2"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(tmp_path),
    )
    restarted = threading.Event()
    try:
        deadline = time.monotonic() + 180
        while "round 2 epoch 1" not in clientapp.log_text()[seen:]:
            assert time.monotonic() < deadline and run.poll() is None, "round 2 never started"
            time.sleep(0.2)
        federation.kill_site(victim, signal.SIGKILL)  # a crash: no goodbye to the SuperLink

        def come_back() -> None:
            federation.start_site(victim, timeout=150)
            restarted.set()

        threading.Thread(target=come_back, daemon=True).start()
        output, _ = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 0, output[-4000:]
    assert restarted.wait(timeout=60)
    summary = (tmp_path / "run" / "summary.txt").read_text()
    # Killed before its reply left: Flower's SuperLink answers for the silent node once 2
    # heartbeats (2 x 30 s) are missed. Killed while uploading its reply (a round takes about a
    # second of training here, so this happens too): the reply's arrays never all arrive.
    assert (
        f"round 2: site {victim} failed: Error: Node Unavailable" in summary
        or f"round 2: site {victim} failed: Reply message objects are unavailable" in summary
    ), summary
    assert "node-" not in summary and "no train reply" not in summary, summary
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    trained = {(r.round, r.site) for r in rows if r.metric == "train_loss"}
    assert {(2, "site-1"), (2, "site-2")} <= trained and (2, victim) not in trained
    # It rejoins a few seconds after the SuperLink let its old connection go (up to 60 s after
    # the kill); rounds take about 5 s, so 16 rounds outlast that, and a later round trains
    # with it again.
    assert any(rnd >= 3 and site == victim for rnd, site in trained), (
        "the site that came back was not used again"
    )
