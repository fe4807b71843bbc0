"""Every user-supplied value that must be one of a set (the schema's enums and the string keys
of :data:`fl_imaging.config.schema.CHOICES`) is refused with the key and every allowed value
named; every string key of the schema is either such a choice or free text listed here, so a
new enum-like key cannot go unchecked."""

from __future__ import annotations

import dataclasses
import enum
import types
import typing

import pytest
from cli_runs import run_cli

from fl_imaging.config import ConfigError, RunConfig
from fl_imaging.config.compose import check_overrides
from fl_imaging.config.schema import CHOICE_NULLS, CHOICES

#: String keys whose value is a path, an address, a name or an expression, not one of a set
#: (each checked where it is used: files and folders by the sites and the commands, strategy.name
#: by the strategy registry, task.device by its pattern).
FREE_TEXT = {
    "task.model._target_",
    "task.model.init",
    "task.loss._target_",
    "task.optimizer._target_",
    "task.device",
    "task.bundle",
    "task.bundle_sha256",
    "data.root",
    "data.flag",
    "data.sites_dir",
    "data.decoded_cache",
    "strategy.name",
    "strategy.tune_key",  # a key under strategy., checked by config/strategy_checks.py
    "engine.ray_address",
    "engine.superlink",
    "engine.root_certificates",
    "bench.name",
    "bench.out_dir",
    "bench.reference",
    "bench.compare_with",  # a method label; no column when the benchmark does not run it
    "tracking.uri",
    "tracking.experiment",
    "tracking.run_name",
    "site.state_dir",
    "site.he_key",  # a key file, checked by the site when it loads it
    "site.policy",
    "run_dir",
    "resume",
}


def _fields(cls: type, prefix: str = "") -> typing.Iterator[tuple[str, object]]:
    """Every leaf field of the schema dataclass ``cls``: (dotted key, its type, ``X | None``
    unwrapped)."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        kind = hints[field.name]
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if typing.get_origin(kind) in (typing.Union, types.UnionType):
            kind = args[0] if len(args) == 1 else kind
        key = f"{prefix}{field.name}"
        if dataclasses.is_dataclass(kind):
            yield from _fields(kind, f"{key}.")  # type: ignore[arg-type]
        else:
            yield key, kind


ENUM_KEYS = [
    (key, [e.value for e in kind])
    for key, kind in _fields(RunConfig)
    if isinstance(kind, type) and issubclass(kind, enum.Enum)
]
STRING_KEYS = [key for key, kind in _fields(RunConfig) if kind is str]


def test_every_string_key_is_a_checked_choice_or_free_text() -> None:
    unclassified = set(STRING_KEYS) - set(CHOICES) - FREE_TEXT
    assert not unclassified, f"add to CHOICES (with their values) or FREE_TEXT: {unclassified}"
    assert set(CHOICES) | FREE_TEXT <= set(STRING_KEYS)  # no stale entry
    assert len(ENUM_KEYS) >= 10


@pytest.mark.parametrize(
    ("key", "allowed"),
    [*ENUM_KEYS, *((k, list(v)) for k, v in CHOICES.items())],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_a_value_outside_the_set_is_refused_naming_every_allowed_value(
    key: str, allowed: list[str]
) -> None:
    with pytest.raises(ConfigError) as err:
        check_overrides([f"{key}=notavalue"])
    message = str(err.value)
    assert key in message and "notavalue" in message, message
    for value in allowed:
        assert value in message, (value, message)
    if key in CHOICE_NULLS:
        assert "null" in message


def test_a_bad_choice_stops_fl_imaging_with_exit_2(tmp_path) -> None:
    """The command itself: a value no key allows (here secure aggregation's weighting, which
    was accepted before) stops before anything runs, naming the allowed values."""
    demo = tmp_path / "demo"
    proc = run_cli(
        "fl-imaging",
        "experiment=quick",
        "strategy.secagg.weighting=eq",
        f"data.root={demo}",
        cwd=tmp_path,
        expect=2,
    )
    assert "strategy.secagg.weighting=eq: allowed values are auto, cases, equal" in proc.stderr
    assert "Traceback" not in proc.stderr and not demo.exists()


def test_an_unknown_strategy_name_stops_fl_imaging_before_the_sites(tmp_path) -> None:
    demo = tmp_path / "demo"
    proc = run_cli(
        "fl-imaging",
        "experiment=quick",
        "strategy.name=krumm",
        f"data.root={demo}",
        cwd=tmp_path,
        expect=2,
    )
    assert "Unknown strategy 'krumm'. Allowed values for strategy.name: fedavg" in proc.stderr
    assert "Traceback" not in proc.stderr and not demo.exists()
