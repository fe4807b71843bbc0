"""Every strategy names its key hyperparameter (``strategy.tune_key``) in its YAML, and that key
is a number with a default that the command line overrides: what a tuner reads and sets."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fl_imaging.config import ConfigError
from fl_imaging.config.compose import check_overrides
from fl_imaging.config.strategy_checks import tune_value

CONF_STRATEGIES = Path(__file__).resolve().parents[2] / "conf" / "strategy"
EXPECTED = {
    "fedprox": ("params.proximal_mu", 0.01),
    "fedadam": ("params.eta", 0.01),
    "fedyogi": ("params.eta", 0.01),
    "fedadagrad": ("params.eta", 0.01),
    "fedavgm": ("params.server_learning_rate", 1.0),
    "scaffold": ("params.server_learning_rate", 1.0),
    "ditto": ("params.ditto_lambda", 0.1),
}


def test_every_strategy_yaml_says_its_tune_key() -> None:
    names = sorted(p.stem for p in CONF_STRATEGIES.glob("*.yaml"))
    assert set(EXPECTED) <= set(names)
    for name in names:
        raw = yaml.safe_load((CONF_STRATEGIES / f"{name}.yaml").read_text())
        assert "tune_key" in raw, name  # said, even where it is null
        cfg = check_overrides([f"strategy={name}"]).strategy
        if name in EXPECTED:
            assert (cfg.tune_key, tune_value(cfg)) == EXPECTED[name]
        else:
            assert cfg.tune_key is None, name


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_the_tune_key_is_overridden_on_the_command_line(name: str) -> None:
    key = EXPECTED[name][0]
    cfg = check_overrides([f"strategy={name}", f"strategy.{key}=0.37"]).strategy
    assert tune_value(cfg) == 0.37


def test_a_tune_key_naming_no_number_is_refused() -> None:
    with pytest.raises(ConfigError, match="strategy.params.nope does not exist"):
        check_overrides(["strategy=fedprox", "strategy.tune_key=params.nope"])
    with pytest.raises(ConfigError, match="not a number a tuner can vary"):
        check_overrides(["strategy=fedavg", "strategy.tune_key=fedbn"])
