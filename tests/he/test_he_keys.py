"""The consortium's HE key: made by ``fl-imaging-deploy he-key``, given to each SuperNode with
``--he-key`` (its node config's ``he-key``), refused when missing or public only; the
coordinator never gets a context holding the secret key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("tenseal", reason="the HE tests need the he extra: pip install -e '.[he]'")

from cli_runs import run_cli  # noqa: E402
from flwr.app import ConfigRecord  # noqa: E402

from fl_imaging.config.compose import check_overrides  # noqa: E402
from fl_imaging.deploy.roles import SuperNodeSpec, supernode_command  # noqa: E402
from fl_imaging.he.ckks import (  # noqa: E402
    HEError,
    context_from,
    public_context_bytes,
    secret_context_bytes,
)
from fl_imaging.he.coordinator import HomomorphicAggregation  # noqa: E402
from fl_imaging.he.keys import HEKeyError, load_key  # noqa: E402
from fl_imaging.site.setup import SiteSetup, SiteSetupError  # noqa: E402
from fl_imaging.training.site_training import SiteRef  # noqa: E402


def test_the_key_command_writes_a_secret_file_once(tmp_path: Path) -> None:
    out = tmp_path / "consortium.he-key"
    made = run_cli("fl-imaging-deploy", "he-key", "--out", out, cwd=tmp_path)
    assert "never to the coordinator" in made.stdout
    assert os.stat(out).st_mode & 0o777 == 0o600
    key = load_key(out)
    assert key.context.has_secret_key() and key.key_id in made.stdout
    again = run_cli("fl-imaging-deploy", "he-key", "--out", out, cwd=tmp_path, expect=2)
    assert "exists: a new key would lock the sites" in again.stderr


def test_a_supernode_reads_its_key_from_its_node_config(tmp_path: Path) -> None:
    out = tmp_path / "k.he-key"
    run_cli("fl-imaging-deploy", "he-key", "--out", out, cwd=tmp_path)
    spec = SuperNodeSpec(
        data_dir=tmp_path / "hospital-a",
        superlink="127.0.0.1:9093",
        ca_cert=None,
        private_key=None,
        state_dir=tmp_path / "node",
        he_key=out,
    )
    supernode_command(spec)
    assert f'he-key = "{out}"' in (tmp_path / "node" / "node-config.toml").read_text()
    cfg = check_overrides([])
    site = SiteRef("hospital-a", tmp_path / "hospital-a", 0)
    setup = SiteSetup.of({"state-dir": str(tmp_path / "node"), "he-key": str(out)}, cfg, site)
    assert setup.he_context().context.has_secret_key()
    without = SiteSetup.of({"state-dir": str(tmp_path / "node")}, cfg, site)
    with pytest.raises(SiteSetupError, match="--he-key FILE"):
        without.he_context()
    public = tmp_path / "public.he-key"
    public.write_bytes(public_context_bytes(load_key(out).context))
    with pytest.raises(HEKeyError, match="holds no secret key"):
        load_key(public)
    with pytest.raises(HEKeyError, match="no such file"):
        load_key(tmp_path / "missing")


def test_the_coordinator_refuses_a_context_holding_the_secret_key(tmp_path: Path) -> None:
    out = tmp_path / "k.he-key"
    run_cli("fl-imaging-deploy", "he-key", "--out", out, cwd=tmp_path)
    key = load_key(out)
    secret = key.context
    strategy = HomomorphicAggregation(inner=None)  # type: ignore[arg-type]
    sent = ConfigRecord({"key-id": key.key_id, "context": secret_context_bytes(secret)})
    with pytest.raises(HEError, match="secret key: refused"):
        strategy.learn_context(sent)
    assert strategy.context is None and not strategy.key
    with pytest.raises(HEError, match="not a TenSEAL context"):
        strategy.learn_context(ConfigRecord({"key-id": key.key_id, "context": b"junk"}))
    strategy.learn_context(
        ConfigRecord({"key-id": key.key_id, "context": public_context_bytes(secret)})
    )
    assert strategy.key == key.key_id and not strategy.context.has_secret_key()
    assert not context_from(public_context_bytes(secret)).has_secret_key()
