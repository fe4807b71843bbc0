"""Homomorphic encryption across real Flower processes on 127.0.0.1: each SuperNode is given
the consortium's key file (``--he-key``), the coordinator's ServerApp and SuperLink never are;
every site's ciphertext is added in every round, the sites keep the final model, and the
researcher's run folder has no model.pt."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("tenseal", reason="the HE tests need the he extra: pip install -e '.[he]'")

from cli_runs import run_cli  # noqa: E402
from deployment_fixtures import command_env  # noqa: E402

from fl_imaging.data.demo import make_demo_data  # noqa: E402
from fl_imaging.deploy.local import start_local  # noqa: E402
from fl_imaging.he.keys import write_key_file  # noqa: E402
from fl_imaging.review.results import read_metrics  # noqa: E402


@pytest.mark.slow
@pytest.mark.extended
def test_he_across_real_processes_with_the_key_only_at_the_sites(tmp_path: Path) -> None:
    sites = make_demo_data(
        tmp_path / "data", num_sites=2, cases_per_site=6, shape=(24, 24, 24), dicom_sites=(),
        test_cases=2,
    )  # fmt: skip
    key = write_key_file(tmp_path / "consortium" / "consortium.he-key")
    fed = start_local(sites, tmp_path / "state", check=False, he_key=key)
    try:
        args = fed.fl_imaging_args("experiment=quick", "strategy.he.enabled=true")
        run_dir = tmp_path / "run"
        proc = run_cli(
            "fl-imaging", *args, "engine.test=true", f"hydra.run.dir={run_dir}",
            cwd=tmp_path, env=command_env(tmp_path),
        )  # fmt: skip
    finally:
        procs = fed.processes
        fed.stop()
    assert not any(p.alive() for p in procs)
    rows = read_metrics(run_dir / "metrics.csv")
    assert {r.round: r.value for r in rows if r.metric == "he_sites"} == {1: 2, 2: 2}
    assert [r for r in rows if r.metric == "test_dice" and r.site == "all"], proc.stdout[-2000:]
    assert not (run_dir / "model.pt").exists()
    assert "he-model.pt in each SuperNode's --state folder" in (run_dir / "summary.txt").read_text()
    for spec in fed.specs.values():
        assert (spec.state_dir / "he-model.pt").is_file()
        assert f'he-key = "{key}"' in (spec.state_dir / "node-config.toml").read_text()
    # the key file is nowhere the coordinator writes (its SuperLink state, the run folder)
    secret = key.read_bytes()
    for folder in (tmp_path / "state" / "superlink", run_dir):
        for path in folder.rglob("*"):
            if path.is_file() and path.stat().st_size >= len(secret):
                assert secret not in path.read_bytes(), path
