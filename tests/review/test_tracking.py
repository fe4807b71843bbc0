"""Experiment tracking (fl_imaging/review/tracking.py, fl_imaging/review/tracking_backends.py): a
run through
the real ServerApp code is read back with MLflow's own client (local store) and TensorBoard's
own event reader, and holds every row of metrics.csv at its round and site, the config as
parameters, the run's name (what it is: fl_imaging/review/run_name.py) and its files; a tracking
server that fails mid-run does not stop the run; a bad tracking setting stops before it; sweeps
and benchmark cells are tagged."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_runs import run_cli
from fake_runs import fake_run

from fl_imaging.benchmark.cells import cell_tracking
from fl_imaging.benchmark.plan import Cell
from fl_imaging.config import ConfigError
from fl_imaging.config.compose import check_overrides
from fl_imaging.review.audit import verify_run
from fl_imaging.review.results import MetricRow, read_metrics
from fl_imaging.review.run_name import OVERRIDES_FILE
from fl_imaging.review.tracking import (
    TRACKING_FILE,
    add_tracking_tags,
    check_tracking,
    flat_config,
    resolve_tracking,
    tensorboard_folder,
    tracked_name,
)
from fl_imaging.review.tracking_backends import MlflowBackend
from fl_imaging.review.tracking_store import metric_key, mlflow_store


def _typed(run_dir: Path, *overrides: str) -> None:
    """Record ``overrides`` in ``run_dir`` as Hydra does for ``fl-imaging OVERRIDES``."""
    (run_dir / OVERRIDES_FILE).parent.mkdir(parents=True)
    (run_dir / OVERRIDES_FILE).write_text("".join(f"- {o}\n" for o in overrides))


def _close(a: float, b: float) -> bool:
    """Equal to metrics.csv's 6 significant digits (NaN equals NaN)."""
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-12)


def _series(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    return sorted(points, key=lambda p: (p[0], math.isnan(p[1]), 0 if math.isnan(p[1]) else p[1]))


def _expected(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.csv as {METRIC/SITE: [(round, value), ...]}."""
    series: dict[str, list[tuple[int, float]]] = {}
    for row in read_metrics(run_dir / "metrics.csv"):
        series.setdefault(metric_key(row.metric, row.site), []).append((row.round, row.value))
    return series


def _assert_same_series(expected: dict, got: dict[str, list[tuple[int, float]]]) -> None:
    """Every metric of metrics.csv, and only those, with the same values at the same steps."""
    assert set(got) == set(expected)
    for key, points in expected.items():
        want, have = _series(points), _series(got[key])
        assert [p[0] for p in have] == [p[0] for p in want], key
        for (step, value), (_, value_csv) in zip(have, want, strict=True):
            assert _close(value, value_csv), (key, step, value, value_csv)


@pytest.mark.usefixtures("task_identity")
def test_an_mlflow_run_holds_every_metric_param_and_file(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    store = tmp_path / "mlruns"
    run_dir = tmp_path / "run"
    overrides = (
        "tracking=mlflow",
        f"tracking.uri={store}",
        "strategy=dpfedavg",
        "strategy.dp.noise_multiplier=0.5",
        "engine.test=true",  # its rows come after the last round: sent when the run ends
    )
    _typed(run_dir, "engine.rounds=3", *overrides)
    plan = fake_run(run_dir, *overrides, rounds=3)
    info = json.loads((run_dir / TRACKING_FILE).read_text())
    assert (
        info["tracking_uri"] == f"sqlite:///{store / 'mlflow.db'}" and info["status"] == "FINISHED"
    )
    summary = (run_dir / "summary.txt").read_text()
    assert f"tracking: MLflow run {info['run_id']} (experiment fl-imaging)" in summary
    assert f"mlflow ui --backend-store-uri sqlite:///{store / 'mlflow.db'}" in summary

    client = MlflowClient(tracking_uri=info["tracking_uri"])
    run = client.get_run(info["run_id"])
    name = (
        "fedavg + DP server_fixed · demo segmentation · unet · engine.rounds=3 engine.test=true "
        "strategy.dp.noise_multiplier=0.5"
    )
    assert run.info.status == "FINISHED" and run.info.run_name == name  # what it is, not a date
    assert run.data.tags["description"] == run.data.tags["mlflow.note.content"] == name
    expected = _expected(run_dir)
    wanted = {"dice/site-1", "dice_1/site-1", "train_loss/all", "epsilon/all", "test_dice/site-3"}
    assert wanted <= set(expected) and set(run.data.metrics) == set(expected)
    got = {
        key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
        for key in run.data.metrics
    }
    _assert_same_series(expected, got)
    assert math.isnan(dict(expected["dice_1/site-1"])[1])  # a NaN went through as NaN
    # the resolved config as parameters
    params = run.data.params
    assert params["strategy.dp.mode"] == "server_fixed" and params["engine.rounds"] == "3"
    assert params["strategy.dp.noise_multiplier"] == "0.5"
    assert params["task.model.channels"] == "[4, 8, 16]" and params["run_dir"] == str(run_dir)
    assert params == {key: str(value) for key, value in flat_config(plan.cfg).items()}
    # tags: code version, config hash, the audit log's last hash (an anchor outside the folder)
    audit = verify_run(run_dir)
    assert run.data.tags["audit_last_hash"] == audit.last_hash
    assert run.data.tags["config_sha256"] == audit.records[0]["config_sha256"]
    assert run.data.tags["mlflow.source.git.commit"].startswith(audit.records[0]["code"]["commit"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {
        "model.pt",
        "metrics.csv",
        "config.yaml",
        "summary.txt",
        "curves.png",
        "audit.jsonl",
        "report.html",
    } <= artifacts
    assert not any(a.startswith("checkpoint") for a in artifacts)
    local = Path(client.download_artifacts(run.info.run_id, "model.pt", str(tmp_path / "dl")))
    assert local.read_bytes() == (run_dir / "model.pt").read_bytes()


@pytest.mark.usefixtures("task_identity")
def test_tensorboard_event_files_hold_every_metric(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    run_dir = tmp_path / "run"
    _typed(run_dir, "engine.rounds=3", "tracking=tensorboard", "strategy=fedmedian")
    fake_run(run_dir, "tracking=tensorboard", "strategy=fedmedian", rounds=3)
    name = "fedmedian · demo segmentation · unet · engine.rounds=3"
    logdir = run_dir / "tensorboard" / name  # TensorBoard's run list shows what it is
    assert f"tracking: TensorBoard event files in {logdir}" in (run_dir / "summary.txt").read_text()
    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    expected = _expected(run_dir)
    got = {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }
    _assert_same_series(expected, got)
    assert {"files/curves.png"} <= set(events.Tags()["images"])
    texts = set(events.Tags()["tensors"])  # text summaries are tensors to the reader
    assert {"config/text_summary", "summary/text_summary", "status/text_summary"} <= texts
    # HParams: the run's name beside the config, ranked by the main metric and the train loss
    hparams = {
        tag: HParamsPluginData.FromString(content)
        for tag, content in events.PluginTagToContent("hparams").items()
    }
    ranked = [m.name.tag for m in hparams["_hparams_/experiment"].experiment.metric_infos]
    assert ranked == ["dice/all", "train_loss/all"] and set(ranked) <= set(got)
    session = hparams["_hparams_/session_start_info"].session_start_info.hparams
    assert session["description"].string_value == name
    assert session["strategy.name"].string_value == "fedmedian"


def test_a_run_s_tracked_name_and_tensorboard_folder(tmp_path: Path) -> None:
    run_dir = tmp_path / "2026-01-02_03-04-05"
    _typed(run_dir, "engine.rounds=2", "tracking=tensorboard")
    cfg = check_overrides(["engine.rounds=2", "tracking=tensorboard"])
    name = "fedavg · demo segmentation · unet · engine.rounds=2"
    assert tracked_name(cfg, run_dir) == (name, name)
    assert tensorboard_folder(cfg, run_dir, name) == run_dir / "tensorboard" / name
    shared = check_overrides(["tracking=tensorboard", f"tracking.uri={tmp_path / 'tb'}"])
    # runs of one config in one folder stay apart: each folder starts with its run's
    assert tensorboard_folder(shared, run_dir, name) == tmp_path / "tb" / f"{run_dir.name} {name}"
    named = add_tracking_tags(shared, {}, run_name="sweep/1")  # a name given wins
    assert tracked_name(named, run_dir) == ("sweep/1", name)
    assert tensorboard_folder(named, run_dir, name) == tmp_path / "tb" / "sweep" / "1"


@pytest.mark.usefixtures("task_identity")
def test_a_tracking_failure_mid_run_is_said_and_the_run_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    original = MlflowBackend.log_rows

    def flaky(self: MlflowBackend, rows: list[MetricRow]) -> None:
        calls.append(len(rows))
        if len(calls) == 2:
            raise ConnectionError("tracking server went away")
        original(self, rows)

    monkeypatch.setattr(MlflowBackend, "log_rows", flaky)
    run_dir = tmp_path / "run"
    fake_run(run_dir, "tracking=mlflow", f"tracking.uri={tmp_path / 'mlruns'}", rounds=3)
    assert len(calls) == 2  # nothing more was tried after the failure
    summary = (run_dir / "summary.txt").read_text()
    assert (
        "tracking: MLflow failed in round 2: ConnectionError: tracking server went away" in summary
    )
    assert "the run went on without tracking" in summary
    assert read_metrics(run_dir / "metrics.csv")[-1].round == 3  # every round ran
    info = json.loads((run_dir / TRACKING_FILE).read_text())
    assert info["failed"].startswith("in round 2")
    assert info["status"] == "FINISHED (tracking failed: not sent)"  # not what the server holds
    assert verify_run(run_dir).ok


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_bad_tracking_setting_stops_before_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    closed = f"http://127.0.0.1:{_free_port()}"
    cfg = check_overrides(["tracking=mlflow", f"tracking.uri={closed}"])
    with pytest.raises(ConfigError, match=rf"tracking.uri={closed}: no MLflow server answers"):
        check_tracking(cfg)
    blocker = tmp_path / "file"
    blocker.write_text("")
    cfg = resolve_tracking(check_overrides(["tracking=tensorboard", f"tracking.uri={blocker}/x"]))
    with pytest.raises(ConfigError, match="tracking.uri: cannot write to"):
        check_tracking(cfg)
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="needs the mlflow package: pip install mlflow"):
        check_tracking(check_overrides(["tracking=mlflow"]))
    check_tracking(check_overrides([]))  # tracking=none: nothing to check, nothing imported


def test_an_unreachable_server_stops_fl_imaging_before_training(tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{_free_port()}"
    proc = run_cli(
        "fl-imaging",
        "experiment=quick",
        "tracking=mlflow",
        f"tracking.uri={closed}",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
        expect=2,
    )
    output = proc.stdout + proc.stderr
    assert f"tracking.uri={closed}: no MLflow server answers" in output
    assert "Traceback" not in output and not (tmp_path / "demo-data").exists()


#: A web server that is not MLflow: every GET and POST answers 404 with an HTML page, as a
#: web server's default site does.
_NOT_MLFLOW = """
import http.server, sys
class NotFound(http.server.BaseHTTPRequestHandler):
    def _page(self):
        body = b"<html><body><h1>404 Not Found</h1></body></html>"
        self.send_response(404)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    do_GET = do_POST = _page
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), NotFound).serve_forever()
"""


@contextlib.contextmanager
def _web_server_not_mlflow() -> Iterator[str]:
    """A loopback HTTP server answering 404 to everything (:data:`_NOT_MLFLOW`), started in
    its own process and waited for (at most 30 s); yields its address; stopped by its PID."""
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-c", _NOT_MLFLOW, str(port)])
    try:
        deadline = time.monotonic() + 30
        while True:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert server.poll() is None and time.monotonic() < deadline, "no web server"
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.kill()
        server.wait(timeout=30)


def test_a_web_server_that_is_not_mlflow_stops_fl_imaging_before_training(
    tmp_path: Path,
) -> None:
    """An address where a web server answers, but not MLflow (404 pages): refused before the
    run, exit 2, naming the address and what MLflow was asked; nothing trains."""
    with _web_server_not_mlflow() as uri:
        proc = run_cli(
            "fl-imaging",
            "experiment=quick",
            "tracking=mlflow",
            f"tracking.uri={uri}",
            f"hydra.run.dir={tmp_path / 'run'}",
            cwd=tmp_path,
            expect=2,
        )
    output = proc.stdout + proc.stderr
    assert f"tracking.uri={uri}: the server there does not answer as an MLflow tracking" in output
    assert "/api/2.0/mlflow/experiments/search: HTTP 404" in output
    assert "Traceback" not in output and not (tmp_path / "demo-data").exists()


def test_a_scheme_mlflow_does_not_serve_stops_fl_imaging_before_training(
    tmp_path: Path,
) -> None:
    proc = run_cli(
        "fl-imaging",
        "experiment=quick",
        "tracking=mlflow",
        "tracking.uri=ftp://127.0.0.1/mlruns",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
        expect=2,
    )
    output = proc.stdout + proc.stderr
    assert "tracking.uri=ftp://127.0.0.1/mlruns: MLflow keeps no runs under the scheme ftp://" in (
        output
    )
    assert "Traceback" not in output and not (tmp_path / "demo-data").exists()


def test_a_database_uri_without_its_driver_is_refused_password_hidden() -> None:
    cfg = check_overrides(["tracking=mlflow", "tracking.uri=mysql+nosuchdriver://u:secret@h/db"])
    with pytest.raises(ConfigError, match="MLflow cannot open this database here") as err:
        check_tracking(cfg)
    assert "secret" not in str(err.value) and "u:***@h/db" in str(err.value)


def test_unknown_backends_and_empty_names_are_refused() -> None:
    with pytest.raises(ConfigError, match="Could not find 'tracking/wandb'"):
        check_overrides(["tracking=wandb"])
    with pytest.raises(ConfigError, match="expected one of: none, mlflow, tensorboard"):
        check_overrides(["tracking.backend=wandb"])
    with pytest.raises(ConfigError, match="tracking.experiment is empty"):
        check_overrides(["tracking=mlflow", "tracking.experiment=' '"])


def test_where_mlflow_keeps_a_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    local = mlflow_store(None)
    assert local.uri == f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    assert local.artifacts == (tmp_path / "mlruns" / "artifacts").as_uri()
    assert mlflow_store("store").folder == tmp_path / "store"
    assert mlflow_store("sqlite:///x.db").artifacts == (tmp_path / "artifacts").as_uri()
    server = mlflow_store("http://mlflow.example.org:5000")
    assert server.uri == "http://mlflow.example.org:5000" and server.artifacts is None
    cfg = resolve_tracking(check_overrides(["tracking=mlflow"]))
    assert cfg.tracking.uri == str(tmp_path / "mlruns")  # absolute: the same for a ServerApp
    assert resolve_tracking(check_overrides([])).tracking.uri is None


def test_sweep_jobs_and_benchmark_cells_are_tagged() -> None:
    cfg = check_overrides(["tracking=mlflow", "+tracking.tags.site_group=north"])
    tagged = add_tracking_tags(cfg, {"sweep": "s", "site_group": "south"}, run_name="s/0")
    assert tagged.tracking.tags == {"sweep": "s", "site_group": "north"}  # the user's win
    assert tagged.tracking.run_name == "s/0"
    cfg = check_overrides(["experiment=smoke", "tracking=mlflow"])
    cell = Cell("iid", "fedavg", "federated", 1, ())
    cell_cfg = cell_tracking(cfg, cell)
    assert cell_cfg.tracking.tags == {
        "benchmark": "smoke",
        "setup": "iid",
        "method": "fedavg",
        "kind": "federated",
        "seed": "1",
    }
    assert cell_cfg.tracking.run_name == "smoke/iid/fedavg/seed1"


def test_metric_keys_keep_metric_and_site_apart() -> None:
    assert metric_key("dice_1", "site-2") == "dice_1/site-2"
    assert metric_key("test_auc", "Hôpital A (2)") == "test_auc/H_pital A _2_"


@pytest.mark.slow
@pytest.mark.extended  # the tags themselves: test_sweep_jobs_and_benchmark_cells_are_tagged
def test_a_multirun_sweep_is_one_tagged_mlflow_run_per_job(tmp_path: Path) -> None:
    """Through Flower's simulation engine: `fl-imaging --multirun` with tracking=mlflow gives one
    MLflow run per job, tagged with the sweep, each with every metric of its metrics.csv; each
    job's audit log verifies and its report.html is written."""
    from mlflow import MlflowClient

    store = tmp_path / "mlruns"
    run_cli(
        "fl-imaging",
        "--multirun",
        "experiment=quick",
        "engine.rounds=1",
        "seed=0,1",
        "tracking=mlflow",
        f"tracking.uri={store}",
        f"data.root={tmp_path / 'demo'}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        cwd=tmp_path,
        timeout=600,
    )
    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("fl-imaging")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 2
    by_job = {r.data.tags["sweep_job"]: r for r in runs}
    assert set(by_job) == {"0", "1"}
    for job, run in by_job.items():
        folder = tmp_path / "sweep" / job
        assert run.data.tags["sweep"] == str(tmp_path / "sweep")
        assert f"seed={job}" in run.data.tags["sweep_overrides"]
        assert run.info.run_name == f"sweep/{job}" and run.info.status == "FINISHED"
        assert run.data.params["seed"] == job
        got = {
            key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
            for key in run.data.metrics
        }
        _assert_same_series(_expected(folder), got)
        assert verify_run(folder).ok and (folder / "report.html").is_file()


def _descendants(pid: int) -> list[int]:
    """``pid``'s child processes, their children, ... (by ``ps``)."""
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    children = [int(p) for p in out.stdout.split()]
    return [p for child in children for p in (child, *_descendants(child))]


def _kill_tree(pid: int) -> None:
    for process in [*_descendants(pid), pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.usefixtures("task_identity")
def test_an_mlflow_server_that_dies_mid_run_does_not_stop_it(tmp_path: Path) -> None:
    """A real `mlflow server`: round 1 is tracked there; killed during round 2, the run ends in
    seconds with every result, and its summary says tracking stopped in round 2."""
    from fake_runs import TestedSites, evaluate_metrics, shift, train_metrics
    from mlflow import MlflowClient

    port = _free_port()
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            str(tmp_path / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    uri = f"http://127.0.0.1:{port}"

    def respond(node: int, rnd: int, sent):  # type: ignore[no-untyped-def]
        if rnd == 2 and node == 1:
            _kill_tree(server.pid)
        return shift(node, rnd, sent)

    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                check_tracking(check_overrides(["tracking=mlflow", f"tracking.uri={uri}"]))
                break
            except ConfigError:
                assert time.monotonic() < deadline, "mlflow server did not start"
                time.sleep(1)
        run_dir = tmp_path / "run"
        grid = TestedSites(3, respond, train_metrics, evaluate_metrics)
        start = time.monotonic()
        fake_run(run_dir, "tracking=mlflow", f"tracking.uri={uri}", rounds=3, grid=grid)
        assert time.monotonic() - start < 60
    finally:
        _kill_tree(server.pid)
        server.wait(timeout=30)
    summary = (run_dir / "summary.txt").read_text()
    assert "tracking: MLflow failed in round 2: MlflowException" in summary
    assert read_metrics(run_dir / "metrics.csv")[-1].round == 3 and verify_run(run_dir).ok
    run_id = json.loads((run_dir / TRACKING_FILE).read_text())["run_id"]
    stored = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'server.db'}").get_run(run_id)
    assert stored.data.params["engine.rounds"] == "3"
    history = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'server.db'}").get_metric_history(
        run_id, "dice/site-2"
    )
    assert [m.step for m in history] == [1]  # round 1 reached the server, nothing after
