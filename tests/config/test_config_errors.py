"""A bad config stops before any training with a message naming the key and what is allowed."""

from __future__ import annotations

import pytest
from cli_runs import run_cli

from fl_imaging.cli.data import main as data_cli
from fl_imaging.config import ConfigError, validate_config
from fl_imaging.config.compose import check_overrides
from strategies import StrategyError, build_strategy


def test_default_config_is_valid() -> None:
    cfg = check_overrides([])
    assert cfg.task.name.value == "segmentation"
    assert cfg.engine.rounds == 3
    assert cfg.strategy.name == "fedavg"


def test_overrides_reach_the_config() -> None:
    cfg = check_overrides(
        [
            "task=classification",
            "engine.rounds=5",
            "engine.clients_per_round=2",
            "task.model.channels=[8,16,32]",
            "seed=1",
        ]
    )
    assert cfg.task.name.value == "classification"
    assert cfg.engine.rounds == 5 and cfg.engine.clients_per_round == 2
    assert cfg.task.model.channels == [8, 16, 32] and cfg.seed == 1


def test_unknown_key_names_the_key_and_the_allowed_keys() -> None:
    with pytest.raises(ConfigError) as err:
        check_overrides(["task.modle.channels=[4,8]"])
    text = str(err.value)
    assert "task.modle" in text and "model" in text and "optimizer" in text


def test_appended_unknown_key_is_refused_too() -> None:
    with pytest.raises(ConfigError, match=r"task\.model\.chanels.*channels"):
        check_overrides(["+task.model.chanels=[4,8]"])


def test_wrong_type_names_the_key_and_the_type() -> None:
    with pytest.raises(ConfigError, match=r"engine\.rounds.*int"):
        check_overrides(["engine.rounds=three"])


def test_wrong_enum_lists_the_allowed_values() -> None:
    with pytest.raises(ConfigError, match=r"task\.model\.name.*unet, segresnet"):
        check_overrides(["task.model.name=vnet"])


def test_unknown_strategy_group_option_lists_the_strategies() -> None:
    with pytest.raises(ConfigError, match=r"strategy/fedavgg[\s\S]*fedavg"):
        check_overrides(["strategy=fedavgg"])


def test_every_swept_value_is_checked() -> None:
    with pytest.raises(ConfigError, match="engine.rounds"):
        check_overrides(["engine.rounds=2,x"])


def test_unknown_strategy_name_and_parameter() -> None:
    cfg = check_overrides([])
    with pytest.raises(StrategyError, match="Allowed values for strategy.name: fedavg"):
        build_strategy(type(cfg.strategy)(name="krumm"), num_sites=3)
    with pytest.raises(StrategyError, match="Unknown parameter strategy.params.lr"):
        build_strategy(type(cfg.strategy)(name="fedavg", params={"lr": 1}), num_sites=3)


def test_ranges_are_checked() -> None:
    with pytest.raises(ConfigError, match="roi_size"):
        check_overrides(["task.roi_size=[32,32]"])
    with pytest.raises(ConfigError, match="does not fit task segmentation"):
        check_overrides(["task.model.name=densenet"])


@pytest.mark.parametrize(
    ("override", "words"),
    [
        (
            "task.spacing=[0,1,1]",
            r"task\.spacing=\[0\.0, 1\.0, 1\.0\]: every spacing \(mm\) must be positive",
        ),
        ("task.roi_size=[0,0,0]", r"task\.roi_size=\[0, 0, 0\]: every size \(voxels\) must be 1"),
        ("task.in_channels=0", r"task\.in_channels=0: must be 1 or more"),
        ("task.sw_overlap=1.5", r"the overlap in \[0, 1\)"),
        ("engine.num_sites=0", r"engine\.num_sites=0: must be 1 or more"),
        ("engine.round_timeout=0", r"engine\.round_timeout=0\.0"),
    ],
)
def test_sizes_spacings_and_timeouts_are_checked(override: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        check_overrides([override])


def test_krum_with_more_malicious_sites_than_it_can_score_is_refused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    krum = check_overrides(["strategy=krum"]).strategy  # num_malicious_nodes=1
    with pytest.raises(StrategyError, match=r"'krum' with num_malicious_nodes=1 .* 0 with 3 sites"):
        build_strategy(krum, num_sites=3)
    multikrum = check_overrides(["strategy=multikrum", "strategy.params.num_nodes_to_select=5"])
    with pytest.raises(StrategyError, match=r"num_nodes_to_select=5 must be between 1 and the 4"):
        build_strategy(multikrum.strategy, num_sites=5)
    with caplog.at_level("WARNING", logger="fl_imaging.server"):
        build_strategy(krum, num_sites=4)  # runs, below Krum's 2f+3 guarantee: said so
    assert "needs at least 2f+3 = 5 sites" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="fl_imaging.server"):
        build_strategy(krum, num_sites=5)
    assert "2f+3" not in caplog.text


def test_validate_accepts_plain_dicts() -> None:
    with pytest.raises(ConfigError, match="Unknown config key 'engine.roundz'"):
        validate_config({"engine": {"roundz": 2}})


def test_cli_exits_2_before_training_with_the_message(tmp_path) -> None:
    proc = run_cli("fl-imaging", "engine.rounds=abc", cwd=tmp_path, expect=2)
    assert "engine.rounds" in proc.stderr and "int" in proc.stderr
    assert not (tmp_path / "demo-data").exists()  # nothing was generated or trained


@pytest.mark.parametrize(
    ("option", "words"),
    [
        (["--num-classes", "0"], "argument --num-classes: must be 2 or more, got 0"),
        (["--in-channels", "0"], "argument --in-channels: must be 1 or more, got 0"),
        (["--num-classes", "two"], "argument --num-classes: invalid integer value: 'two'"),
    ],
)
def test_inspect_refuses_impossible_class_and_channel_counts(
    tmp_path, capsys, option: list[str], words: str
) -> None:
    with pytest.raises(SystemExit) as stop:
        data_cli(["inspect", str(tmp_path), *option])
    assert stop.value.code == 2
    assert words in capsys.readouterr().err


def test_a_network_its_settings_cannot_build_is_refused_before_the_run(tmp_path) -> None:
    """SegResNet's default group norm (8 groups) cannot take task.model.channels[0]=4: the
    pre-run checks build the network once and refuse it, naming the model keys and the
    constructor's reason, before any site's data is made (exit 2, no traceback)."""
    demo = tmp_path / "demo"
    proc = run_cli(
        "fl-imaging",
        "experiment=quick",
        "task.model.name=segresnet",
        "task.model.channels=[4,8]",
        f"data.root={demo}",
        cwd=tmp_path,
        expect=2,
    )
    assert "Traceback" not in proc.stderr and "HYDRA_FULL_ERROR" not in proc.stderr
    assert "the network cannot be built from task.model.name=segresnet" in proc.stderr
    assert "task.model.channels=[4, 8]" in proc.stderr
    assert "num_channels (4) must be divisible by num_groups (8)" in proc.stderr
    assert not demo.exists()


@pytest.mark.parametrize(
    ("command", "override"),
    [
        ("fl-imaging", "task.roi_size=[32,32"),
        ("fl-imaging", "strategy.name='fedavg"),
        ("fl-imaging-eval", "task.roi_size=[32,32"),
    ],
)
def test_a_malformed_override_is_one_line_naming_it(tmp_path, command: str, override: str) -> None:
    """A stray bracket or quote stops the command with exit 2 and one line naming the
    override and how to write it, not Hydra's parser traceback."""
    args = [override]
    if command == "fl-imaging-eval":
        (tmp_path / "model.pt").write_bytes(b"")  # a weights file: the override is refused first
        args = [str(tmp_path / "model.pt"), override]
    proc = run_cli(command, *args, cwd=tmp_path, expect=2)
    assert "Traceback" not in proc.stderr
    assert f"The override {override!r} cannot be read" in proc.stderr
    assert "close every bracket and quote" in proc.stderr
    assert not (tmp_path / "demo-data").exists()
