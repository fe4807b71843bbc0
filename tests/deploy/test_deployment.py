"""Deployment: certificates and keys, the server's handling of sites that come and go, the
config a run sends, and process handling (start, stop, children). Runs on real Flower
processes: test_deployment_runs.py.
"""

from __future__ import annotations

import sys
import time
import tomllib
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from flower_fakes import FakeGrid
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from fl_imaging.config import config_from_yaml
from fl_imaging.config.compose import check_overrides
from fl_imaging.data.demo import make_demo_data
from fl_imaging.deploy.certs import (
    CertError,
    make_ca,
    make_server_certificate,
    make_site_key,
    verify_server_certificate,
)
from fl_imaging.deploy.processes import (
    ManagedProcess,
    descendants,
    flower_env,
    start_process,
    stop_process,
)
from fl_imaging.deploy.roles import (
    IN_MEMORY_DATABASE,
    RunnerError,
    SiteCheckError,
    check_site_folder,
    superlink_command,
    wait_until_serving,
)
from fl_imaging.engines.deployment import (
    project_app_dir,
    stage_project_app,
    write_app_dir,
    write_run_config,
)
from fl_imaging.flower.app_config import APP_CONFIG
from fl_imaging.flower.protocol import CONFIG_KEY, SITE_NAME, SITE_RECORD
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


def test_the_project_is_the_flower_app_and_the_run_config_carries_the_whole_config(
    tmp_path: Path,
) -> None:
    from flwr.cli.config_utils import load_and_validate

    root = project_app_dir()
    assert root == Path(__file__).resolve().parents[2]
    config, _ = load_and_validate(root / "pyproject.toml")  # Flower's own check, as flwr run
    app = config["tool"]["flwr"]["app"]
    assert app["components"] == {
        "serverapp": "fl_imaging.flower.coordinator.server_app:app",
        "clientapp": "fl_imaging.flower.site.client_app:app",
    }
    assert app["config"] == APP_CONFIG
    # The one-file app for an installed toolkit without its project folder declares the same.
    fallback, _ = load_and_validate(write_app_dir(tmp_path) / "pyproject.toml")
    assert fallback["tool"]["flwr"]["app"]["components"] == app["components"]
    assert fallback["tool"]["flwr"]["app"]["config"] == APP_CONFIG
    cfg = check_overrides(["experiment=quick", "engine=deployment", "seed=7"])
    with write_run_config(tmp_path, cfg).open("rb") as handle:
        sent = tomllib.load(handle)
    assert set(sent) == {CONFIG_KEY}
    assert config_from_yaml(sent[CONFIG_KEY]) == cfg


def test_the_staged_app_bundles_the_same_files_as_the_project(tmp_path: Path) -> None:
    import io
    import zipfile

    from flwr.cli.build import build_fab_from_disk

    def files(app: Path) -> dict[str, bytes]:
        with zipfile.ZipFile(io.BytesIO(build_fab_from_disk(app))) as fab:
            return {name: fab.read(name) for name in fab.namelist() if not name.startswith(".")}

    root = project_app_dir()
    assert root is not None
    staged = files(stage_project_app(root, tmp_path))
    assert staged == files(root)
    assert "fl_imaging/flower/coordinator/server_app.py" in staged and "conf/config.yaml" in staged


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
    assert sorted(m.metadata.dst_node_id for m in sent) == sorted(grid.nodes)
    site = {m.metadata.dst_node_id: grid.site_of[m.metadata.dst_node_id] for m in sent}
    replies = [_reply(m, f"site-{site[m.metadata.dst_node_id]}") for m in reversed(sent)]
    arrays, _ = wrapper.aggregate_train(1, replies)
    assert arrays is not None and names == ["site-1", "site-2", "site-3"]  # first seen, sorted
    # Round 2: site 2 answers with an error (as the recorder notes it), site 3 never answers.
    sent = list(wrapper.configure_train(2, _arrays(), ConfigRecord(), grid))
    by_site = {site[m.metadata.dst_node_id]: m for m in sent}
    error = Message(Error(code=0, reason="Node Unavailable"), reply_to=by_site[2])
    failures.append((2, f"node-{grid.node_of[2]}", "Node Unavailable"))
    arrays, metrics = wrapper.aggregate_train(2, [error, _reply(by_site[1], "site-1")])
    assert (arrays, metrics) == (None, None)  # 1 usable reply < engine.min_sites=2
    assert failures[0] == (2, "site-2", "Node Unavailable")
    assert failures[1][:2] == (2, "site-3") and "engine.round_timeout=7" in failures[1][2]


@pytest.mark.usefixtures("task_identity")
def test_run_stops_when_sites_stay_away_and_keeps_the_last_checkpoint(tmp_path: Path) -> None:
    from fl_imaging.flower.coordinator.checkpoint import load_checkpoint
    from fl_imaging.flower.coordinator.server_app import run_federation

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


def _logging_process(tmp_path: Path, name: str, script: str) -> ManagedProcess:
    """A Python process running ``script`` with its output in ``tmp_path/name.log``."""
    return start_process(
        name, [sys.executable, "-c", script], tmp_path / f"{name}.log", flower_env(tmp_path)
    )


def test_a_site_is_ready_only_once_its_clientapp_runner_serves(tmp_path: Path) -> None:
    # The SuperNode is accepted at once; its ClientApp runner (importing torch and MONAI in
    # real life) answers 1.5 s later, with warm_clientapp's own log line.
    node = _logging_process(
        tmp_path, "node", "import time; print('SuperNode ID: 42', flush=True); time.sleep(60)"
    )
    runner_script = (
        "import logging, time\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "time.sleep(1.5)\n"
        "from fl_imaging.deploy import warm_clientapp as w\n"
        "w.log.info(\"the SuperNode accepts this runner's requests (%s)\", 'unsigned')\n"
        "time.sleep(60)\n"
    )
    runner = _logging_process(tmp_path, "runner", runner_script)
    try:
        start = time.monotonic()
        wait_until_serving([node, runner], timeout=30)
        waited = time.monotonic() - start
    finally:
        stop_process(node, grace=5)
        stop_process(runner, grace=5)
    assert waited >= 1.4
    assert "the SuperNode accepts this runner's requests" in runner.log_text()


def test_a_refused_clientapp_runner_stops_the_site_start_with_its_log(tmp_path: Path) -> None:
    node = _logging_process(
        tmp_path, "node", "import time; print('SuperNode ID: 42', flush=True); time.sleep(60)"
    )
    runner = _logging_process(
        tmp_path,
        "runner",
        "import sys; print('error: the SuperNode refused this runner', flush=True); sys.exit(2)",
    )
    try:
        with pytest.raises(RunnerError, match="runner cannot take tasks(.|\n)*refused this runner"):
            wait_until_serving([node, runner], timeout=30)
    finally:
        stop_process(node, grace=5)
        stop_process(runner, grace=5)


def test_a_broken_site_folder_is_refused_before_the_supernode_starts(tmp_path: Path) -> None:
    (site,) = make_demo_data(
        tmp_path / "d", num_sites=1, cases_per_site=2, shape=(8, 8, 8), dicom_sites=()
    )
    next((site / "labels").iterdir()).write_bytes(b"not a nifti")
    with pytest.raises(SiteCheckError, match="found problems; the SuperNode is not started"):
        check_site_folder(site)
