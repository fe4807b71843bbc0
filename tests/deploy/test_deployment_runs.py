"""Deployment runs on real Flower processes on 127.0.0.1: a SuperLink with TLS and SuperNode
authentication and 3 SuperNodes (the session's, deployment_fixtures.py, stopped by PID at its
end): every site reads only its folder while a local intruder is refused, refused clients, a
site killed mid-run, and secure aggregation across the real processes. All slow; every wait is
bounded.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import pytest
from cli_runs import run_cli, started_cli
from deployment_fixtures import DeployedRun, command_env
from runtime_intruder import AUTHENTICATION_FAILED, Answer

from fl_imaging.deploy.certs import (
    make_site_key,
)
from fl_imaging.deploy.local import LocalFederation
from fl_imaging.deploy.processes import (
    CLIENTAPP_READY,
    ManagedProcess,
    ProcessError,
    free_port,
    start_process,
    stop_process,
)
from fl_imaging.deploy.roles import (
    SuperNodeSpec,
    start_supernode,
)
from fl_imaging.review.results import read_metrics


def _fl_imaging_args(fed: LocalFederation, run_dir: Path, *overrides: str) -> list[str]:
    """The arguments of ``fl-imaging experiment=quick`` with ``overrides`` on ``fed`` into
    ``run_dir``."""
    return [*fed.fl_imaging_args("experiment=quick", *overrides), f"hydra.run.dir={run_dir}"]


@pytest.mark.slow
def test_three_sites_two_rounds_each_site_reads_only_its_folder(
    federation: LocalFederation, deployed_run: DeployedRun
) -> None:
    """The session's run on the session's federation (deployment_fixtures.py; it also scores
    the models across the sites: test_cross_site_deployment.py)."""
    for started in federation.site_processes.values():  # these rounds run with the secret on
        assert "--superexec-auth-secret-file" in started[0].command
        assert CLIENTAPP_READY.search(started[1].log_text())  # start_local waited for it
    # Meanwhile, every try of the intruder was refused by Flower's SuperExec authentication.
    answers = deployed_run.intruder_answers
    assert {address for address, _ in answers} == set(deployed_run.addresses)
    refused = Answer(401, AUTHENTICATION_FAILED)
    assert all(answer == refused for _, answer in answers), answers
    output = deployed_run.output
    assert "finished:completed" in output
    # the console: the ServerApp's own lines, not Flower's (box-drawn summary, coloured levels)
    # nor the record lines they travel in; main.log has all of them
    assert "round 2/2  train loss" in output and "\x1b" not in output
    assert "├" not in output and "fl-imaging-record" not in output
    out = deployed_run.folder
    log = (out / "main.log").read_text()
    assert "round 2/2  train loss" in log and "[flwr.run_output][INFO]" in log
    for name in ("metrics.csv", "summary.txt", "model.pt", "curves.png", "config.yaml"):
        assert (out / name).is_file(), name
    # The project itself was submitted (its bundle), the config in a run config file.
    assert (out / "flower-run-config.toml").is_file() and not (out / "flower-app").exists()
    rows = read_metrics(out / "metrics.csv")
    names = list(federation.specs)
    assert {r.site for r in rows} == {*names, "all"}
    for rnd in (1, 2):
        for site in names:
            got = {r.metric for r in rows if r.round == rnd and r.site == site}
            assert {"train_loss", "dice", "num_train", "num_val"} <= got, (rnd, site, got)
    for name, spec in federation.specs.items():
        logs = deployed_run.site_logs[name]
        assert f"[site {name}]" in logs and str(spec.data_dir) in logs
        assert "accepts this runner's requests (signed with the SuperExec secret)" in logs
        others = [str(s.data_dir) for n, s in federation.specs.items() if n != name]
        assert not any(other in logs for other in others)


def _refused(spec: SuperNodeSpec, tweak: callable | None = None) -> ManagedProcess:  # type: ignore[valid-type]
    from fl_imaging.deploy.roles import supernode_command

    command = supernode_command(spec)
    if tweak is not None:
        command = tweak(command)
    proc = start_process(
        "refused", command, spec.state_dir / "supernode.log", command_env(spec.state_dir)
    )
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
@pytest.mark.extended  # waits for Flower's heartbeat (2 x 30 s) and the site's rejoining
def test_a_site_killed_in_round_2_is_recorded_and_used_again_when_back(
    federation: LocalFederation, tmp_path: Path
) -> None:
    victim = "site-3"
    clientapp = federation.site_processes[victim][-1]  # its long-lived ClientApp process
    seen = len(clientapp.log_text())  # it served the other test's run already
    args = _fl_imaging_args(federation, tmp_path / "run", "engine.rounds=16", "engine.min_sites=2")
    restarted = threading.Event()
    with started_cli("fl-imaging", *args, cwd=tmp_path, env=command_env(tmp_path)) as run:
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


@pytest.mark.slow
def test_dp_fedavg_on_secure_aggregation_across_real_processes(
    federation: LocalFederation, tmp_path: Path
) -> None:
    """TLS, SuperNode authentication, secure aggregation (keys signed with each SuperNode's own
    key, checked against the roster) and DP-FedAvg on the secure sum: 2 rounds with all 3 sites
    summed, the accountant's epsilon, and each site's own record agreeing with the audit log."""
    import dp_accounting

    args = _fl_imaging_args(
        federation,
        tmp_path / "secure",
        "strategy=dpfedavg",
        "strategy.dp.mode=client_fixed",
        "strategy.secagg.enabled=true",
    )
    run_cli("fl-imaging", *args, cwd=tmp_path, env=command_env(tmp_path))
    summary = (tmp_path / "secure" / "summary.txt").read_text()
    assert "only the sum of 3 sites' updates in every round" in summary
    assert "holds the un-noised sum" in summary
    rows = read_metrics(tmp_path / "secure" / "metrics.csv")
    assert {(r.round, r.site) for r in rows if r.metric == "secagg_summed" and r.value == 1} == {
        (rnd, site) for rnd in (1, 2) for site in federation.specs
    }
    assert not [r for r in rows if r.metric == "num_train"]  # the weights travel masked
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(1.0), 2)
    epsilon = next(r.value for r in rows if r.metric == "epsilon" and r.round == 2)
    assert epsilon == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-3)
    for name, spec in federation.specs.items():
        record = spec.state_dir / "site-record.jsonl"
        check = run_cli(
            "fl-imaging-audit", "site", tmp_path / "secure", "--record", record, cwd=tmp_path
        )
        assert "they agree" in check.stdout, name


@pytest.mark.slow
@pytest.mark.extended  # waits for Flower's heartbeat (2 x 30 s) to declare the site lost
def test_secure_aggregation_with_a_site_lost_in_round_2(
    federation: LocalFederation, tmp_path: Path
) -> None:
    """Secure aggregation in a run in which site-3 dies in round 2: the others' shares unmask
    that round and the run goes on with 2 sites (new keys), results written."""
    victim = "site-3"
    clientapp = federation.site_processes[victim][-1]
    seen = len(clientapp.log_text())
    args = _fl_imaging_args(
        federation,
        tmp_path / "lost",
        "strategy.secagg.enabled=true",
        "engine.rounds=4",
        "engine.min_sites=2",
    )
    try:
        with started_cli("fl-imaging", *args, cwd=tmp_path, env=command_env(tmp_path)) as lost:
            deadline = time.monotonic() + 180
            while "round 2 epoch 1" not in clientapp.log_text()[seen:]:
                assert time.monotonic() < deadline and lost.poll() is None, "round 2 never began"
                time.sleep(0.2)
            federation.kill_site(victim, signal.SIGKILL)
            output, _ = lost.communicate(timeout=400)
    finally:
        federation.start_site(victim, timeout=150)  # back for the module's other tests
    assert lost.returncode == 0, output[-4000:]
    rows = read_metrics(tmp_path / "lost" / "metrics.csv")
    summed = {(r.round, r.site): r.value for r in rows if r.metric == "secagg_summed"}
    assert summed[(2, victim)] == 0.0 and summed[(2, "site-1")] == summed[(2, "site-2")] == 1.0
    assert {r.round for r in rows if r.metric == "secagg_sites" and r.value > 0} == {1, 2, 3, 4}
