"""Homomorphic encryption in whole runs (fl_imaging/he/coordinator.py, fl_imaging/he/site.py):
a run with HE ends within 0.005 Dice of the plain run, the coordinator's run folder holds
ciphertexts only (no model.pt, a checkpoint whose encrypted sum its context cannot decrypt),
the sites keep the final model, a site that drops out of a round leaves a sum that decrypts,
and what cannot work on ciphertexts is refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tenseal", reason="the HE tests need the he extra: pip install -e '.[he]'")

from local_runs import local_run  # noqa: E402

from fl_imaging.config import StrategyConfig  # noqa: E402
from fl_imaging.config.compose import check_overrides  # noqa: E402
from fl_imaging.he.ckks import HEError, decrypt_vector  # noqa: E402
from fl_imaging.he.keys import SIMULATED_KEY_FILE, load_key  # noqa: E402
from fl_imaging.review.results import read_metrics  # noqa: E402
from strategies import StrategyError, build_strategy  # noqa: E402

HE_ON = "strategy.he.enabled=true"


def _final_dice(run: Path, rnd: int) -> float:
    rows = read_metrics(run / "metrics.csv")
    return next(r.value for r in rows if r.round == rnd and r.site == "all" and r.metric == "dice")


def test_a_run_with_he_ends_within_0_005_dice_of_plain_and_only_the_sites_hold_the_model(
    tmp_path: Path,
) -> None:
    dice, runs = {}, {}
    for name, extra in (("plain", []), ("he", [HE_ON])):
        runs[name] = local_run(
            tmp_path / name, "experiment=quick", "engine.rounds=3", *extra,
            f"data.root={tmp_path / 'demo'}", f"site.state_dir={tmp_path / 'sites'}",
        )  # fmt: skip
        dice[name] = _final_dice(runs[name], 3)
    assert abs(dice["he"] - dice["plain"]) < 0.005, dice
    assert dice["he"] > 0.5  # it trained
    run = runs["he"]
    rows = read_metrics(run / "metrics.csv")
    assert {r.round: r.value for r in rows if r.metric == "he_sites"} == {1: 2, 2: 2, 3: 2}
    assert all(r.value > 1e5 for r in rows if r.metric == "bytes_he")  # ciphertexts
    summary = (run / "summary.txt").read_text()
    assert "only CKKS ciphertexts of each site's weighted update and their sum (2 sites" in summary
    assert "polynomial degree 8192" in summary and "kept by the sites only (" in summary
    assert f"{tmp_path / 'sites'}/<site>-<hash>/he-model.pt" in summary
    assert not (run / "model.pt").exists() and not (run / "bundle").exists()
    assert (runs["plain"] / "model.pt").is_file()
    # each site keeps the final (decrypted) model; it matches what the plain run wrote closely
    import torch

    kept = sorted((tmp_path / "sites").glob("*/he-model.pt"))
    assert len(kept) == 2
    final = torch.load(kept[0], weights_only=True)
    again = torch.load(kept[1], weights_only=True)
    plain = torch.load(runs["plain"] / "model.pt", weights_only=True)
    assert final.keys() == plain.keys()
    assert all(torch.equal(final[k], again[k]) for k in final)
    # (not bit-equal: CKKS errors of ~1e-8 grow through three rounds of training)
    assert max(float((final[k].double() - plain[k].double()).abs().max()) for k in final) < 0.05
    # the coordinator's checkpoint holds the encrypted sum, unreadable without the sites' key
    from fl_imaging.flower.coordinator.checkpoint import load_checkpoint
    from fl_imaging.he.ckks import context_from, public_context_bytes

    checkpoint = load_checkpoint(run)
    data = checkpoint.arrays["he.sum"].tobytes()
    secret = load_key(tmp_path / "sites" / SIMULATED_KEY_FILE).context
    public = context_from(public_context_bytes(secret))
    with pytest.raises(HEError, match="no secret key"):
        decrypt_vector(public, data, 10)
    assert np.isfinite(decrypt_vector(secret, data, 10)).all()
    assert not list(run.rglob("*.key"))  # no key file in the coordinator's run folder


def test_a_site_that_drops_out_leaves_a_sum_of_the_rest_that_decrypts(tmp_path: Path) -> None:
    """Three sites, the third lost in round 2; only the first block is encrypted; batch norm,
    whose integer counters Flower averages into floats (the coordinator casts them back, so
    the sites find the same arrays encrypted as they sent); then the test round decrypts."""
    run = local_run(
        tmp_path / "run", "experiment=quick", "engine.rounds=2", "data.num_sites=3", HE_ON,
        "strategy.he.layers=[model.0]", "attack=dropout", "attack.sites=[2]",
        "attack.rounds=[2]", "engine.min_sites=2", "task.model.norm=batch", "engine.test=true",
        "data.test_fraction=0.34",
        f"data.root={tmp_path / 'demo'}", f"site.state_dir={tmp_path / 'sites'}",
    )  # fmt: skip
    rows = read_metrics(run / "metrics.csv")
    assert {r.round: r.value for r in rows if r.metric == "he_sites"} == {1: 3, 2: 2}
    assert {r.site for r in rows if r.metric == "he_summed" and r.round == 2} == {
        "site-1",
        "site-2",
    }
    assert _final_dice(run, 2) > 0.3  # the sum of the two others decrypted and was scored
    assert [r.value for r in rows if r.metric == "test_dice" and r.site == "all"]  # test round
    summary = (run / "summary.txt").read_text()
    assert "only the layers model.0 encrypted, the others' updates in the clear" in summary
    # the first block (model.0.*) alone: one ciphertext of 4096 values, about 131 kB
    assert {round(r.value, -4) for r in rows if r.metric == "bytes_he"} == {130000.0}


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["strategy=fedmedian"], "needs every site's own update"),
        (["strategy=fedavgm"], "keeps its optimiser's state on the plaintext mean"),
        (["strategy.secagg.enabled=true"], "turn one of them off"),
        (["strategy=dpfedavg", "strategy.dp.mode=client_fixed"], "task.dp_sgd.enabled=true"),
        (["strategy.norm_bound=5"], "bounds each update on the coordinator"),
        (["strategy.validation.norm_outliers=reject"], "compares the sites' updates"),
        (["strategy.compression=fp16"], "cannot be compressed"),
    ],
)
def test_what_needs_plaintext_updates_is_refused_with_the_reason(
    overrides: list[str], words: str
) -> None:
    cfg: StrategyConfig = check_overrides([*overrides, HE_ON]).strategy
    with pytest.raises(StrategyError, match=words):
        build_strategy(cfg, num_sites=3)


def test_cross_site_evaluation_is_refused_and_dp_sgd_composes(tmp_path: Path) -> None:
    from fl_imaging.config import ConfigError

    with pytest.raises(ConfigError, match="strategy.he.enabled=true keeps encrypted"):
        check_overrides([HE_ON, "engine.cross_site=true"])
    cfg = check_overrides([HE_ON, "task.dp_sgd.enabled=true", "task.dp_sgd.noise_multiplier=1"])
    build_strategy(cfg.strategy, num_sites=2)  # site-side DP-SGD composes
