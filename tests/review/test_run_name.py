"""A run's name (fl_imaging/review/run_name.py): strategy, data, model and the user's
overrides, in key order, without what the first parts say or where files go, capped in
length; read back from a run folder (config.yaml and Hydra's .hydra/overrides.yaml)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fl_imaging.config import config_to_yaml
from fl_imaging.config.compose import check_overrides
from fl_imaging.review.run_name import (
    MAX_LENGTH,
    OVERRIDES_FILE,
    folder_name,
    run_folder_name,
    run_name,
    run_overrides,
)


def _name(*overrides: str) -> str:
    """The name of the run ``fl-imaging OVERRIDES`` would start."""
    return run_name(check_overrides(list(overrides)), list(overrides))


def test_a_name_says_strategy_data_model_and_the_overrides_in_key_order() -> None:
    name = _name("strategy=fedprox", "strategy.params.proximal_mu=0.1", "engine.rounds=5")
    assert (
        name
        == "fedprox · demo segmentation · unet · engine.rounds=5 strategy.params.proximal_mu=0.1"
    )
    # the same run typed in another order, with where its files go: the same name
    assert name == _name(
        "engine.rounds=5",
        "tracking=mlflow",
        "hydra.run.dir=/tmp/x",
        "strategy.params.proximal_mu=0.1",
        "strategy=fedprox",
        "tracking.uri=/tmp/mlruns",
        "data.root=/tmp/demo",
    )
    assert _name() == "fedavg · demo segmentation · unet"
    assert _name("experiment=mednist", "seed=3") == (
        "fedavg · mednist_rsna_64x64 classification · densenet · experiment=mednist seed=3"
    )
    assert _name("data=adrenal3d", "task=classification", "task.model.name=densenet") == (
        "fedavg · adrenalmnist3d classification · densenet"
    )
    # the layers on top of the strategy are part of it: strategy=dpfedavg is FedAvg under DP
    assert _name("strategy=dpfedavg", "strategy.dp.noise_multiplier=0.5") == (
        "fedavg + DP server_fixed · demo segmentation · unet · strategy.dp.noise_multiplier=0.5"
    )
    assert _name("strategy.secagg.enabled=true", "strategy.fedbn=true") == (
        "fedavg + secagg + FedBN · demo segmentation · unet"
    )
    added_and_removed = ["+tracking.tags.group=north", "~data.flag", "attack=noise"]
    assert run_name(check_overrides([]), added_and_removed) == (
        "fedavg · demo segmentation · unet · attack=noise ~data.flag"
    )


def test_a_long_name_is_capped_and_counts_what_it_leaves_out() -> None:
    many = [f"task.optimizer.lr=0.00{i}" for i in range(1, 10)]
    overrides = ["engine.rounds=10", "seed=7", *many]
    name = run_name(check_overrides(["engine.rounds=10", "seed=7"]), overrides)
    assert len(name) <= MAX_LENGTH
    assert name == (
        "fedavg · demo segmentation · unet · engine.rounds=10 seed=7 task.optimizer.lr=0.001 "
        "task.optimizer.lr=0.002 +7 more"
    )
    # a long value keeps its end, in its place in key order
    long_one = "task.class_names=[" + ",".join(f"class{i}" for i in range(20)) + "]"
    assert run_name(check_overrides([]), [long_one, "seed=1"]) == (
        "fedavg · demo segmentation · unet · seed=1 task.class_names=…lass17,class18,class19]"
    )
    # a long value keeps its end, where a path says most
    sites = "data.sites=[/data/hospitals/north/images,/data/hospitals/south-east/images]"
    cfg = check_overrides([])
    assert run_name(cfg, [sites]).endswith(" · data.sites=…tals/south-east/images]")


def test_the_name_is_read_back_from_a_run_folder(tmp_path: Path) -> None:
    overrides = ["strategy=fedmedian", "engine.rounds=4"]
    assert run_overrides(tmp_path) == [] and run_folder_name(tmp_path) is None
    (tmp_path / OVERRIDES_FILE).parent.mkdir()
    (tmp_path / OVERRIDES_FILE).write_text("- strategy=fedmedian\n- engine.rounds=4\n")
    (tmp_path / "config.yaml").write_text(config_to_yaml(check_overrides(overrides)))
    assert run_overrides(tmp_path) == overrides
    assert run_folder_name(tmp_path) == "fedmedian · demo segmentation · unet · engine.rounds=4"
    (tmp_path / OVERRIDES_FILE).write_text("{not: [a list")  # damaged: no overrides
    assert run_folder_name(tmp_path) == "fedmedian · demo segmentation · unet"
    (tmp_path / "config.yaml").write_text("task:\n  no_such_key: 1\n")  # an older version's
    assert run_folder_name(tmp_path) is None


@pytest.mark.parametrize(
    ("name", "folder"),
    [
        ("fedavg · demo segmentation · unet", "fedavg · demo segmentation · unet"),
        ("a · data.sites=…/x/y] task.device=cuda:0", "a · data.sites=…_x_y] task.device=cuda_0"),
        ("s/0.", "s_0"),
    ],
)
def test_a_name_as_a_folder_name(name: str, folder: str) -> None:
    assert folder_name(name) == folder
