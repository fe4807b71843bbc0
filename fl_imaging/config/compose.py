"""Compose the Hydra config from command-line overrides and check it, before anything runs.

Every override is composed once and checked against the schema (:mod:`fl_imaging.config`), so a
misspelt key or a wrong type stops in a second with a message naming the key and the allowed
keys or values, not after the engine has started; for ``--multirun`` each swept value is checked.
"""

from __future__ import annotations

import re

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException, OverrideParseException
from omegaconf import DictConfig, open_dict

from fl_imaging.config import ConfigError, RunConfig, config_dir, validate_config

__all__ = ["check_overrides", "parse_overrides"]


#: Where Hydra's override grammar is described, for a user whose override does not parse.
_GRAMMAR_PAGE = "https://hydra.cc/docs/advanced/override_grammar/basic/"


def parse_overrides(overrides: list[str]) -> list[Override]:
    """Hydra's parse of each of ``overrides`` (``key=value`` strings), in order. Raises
    :class:`ConfigError` naming the first override Hydra's grammar cannot read (a stray bracket
    or quote, say) and how to write it instead."""
    parser = OverridesParser.create()
    parsed: list[Override] = []
    for override in overrides:
        try:
            parsed.extend(parser.parse_overrides([override]))
        except OverrideParseException as err:
            reason = str(err).splitlines()[0].strip()
            raise ConfigError(
                f"The override {override!r} cannot be read ({reason}): close every bracket "
                "and quote (e.g. task.roi_size=[32,32] or strategy.name=fedavg, a value with "
                f"spaces or commas quoted whole: key='a b'); the grammar: {_GRAMMAR_PAGE}"
            ) from None
    return parsed


def _variants(overrides: list[str]) -> list[list[str]]:
    """Each swept value once: the first value of every sweep, then one list per other value.
    Raises :class:`ConfigError` for an override Hydra cannot parse."""
    parsed = parse_overrides(overrides)
    base: list[str] = []
    sweeps: list[tuple[int, list[str]]] = []
    for override in parsed:
        key = override.get_key_element()
        if override.is_sweep_override():
            values = [f"{key}={v}" for v in override.sweep_string_iterator()]
            sweeps.append((len(base), values))
            base.append(values[0])
        else:
            base.append(override.input_line or "")
    variants = [base]
    for index, values in sweeps:
        for value in values[1:]:
            variants.append(base[:index] + [value] + base[index + 1 :])
    return variants


def _allowed_after_failed_override(message: str) -> str:
    match = re.search(r"Could not override '([^']+)'", message)
    if not match:
        return ""
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        node: object = compose("config")
    known: list[str] = []
    for part in match.group(1).split("."):
        if not isinstance(node, DictConfig):
            return ""
        if part not in node:
            where = ".".join(known)
            keys = ", ".join(sorted(str(k) for k in node.keys() if k != "hydra"))
            wrong = ".".join([*known, part])
            scope = f" in {where}" if where else ""
            return f"Unknown config key '{wrong}'. Allowed keys{scope}: {keys}."
        known.append(part)
        node = node[part]
    return ""


def check_overrides(overrides: list[str]) -> RunConfig:
    """Compose the config with ``overrides`` (each swept value separately) and validate it.

    Returns the validated config of the first variant; raises :class:`ConfigError` with a message
    that names the override Hydra cannot parse, or the key and the allowed keys or values.
    """
    first: RunConfig | None = None
    GlobalHydra.instance().clear()
    for variant in _variants(overrides):
        try:
            with initialize_config_dir(str(config_dir()), version_base="1.3"):
                composed = compose("config", overrides=variant)
        except HydraException as err:
            text = str(err).split("\nConfig search path:")[0].strip()
            raise ConfigError(_allowed_after_failed_override(text) or text) from None
        with open_dict(composed):
            composed.run_dir = "."
        run = validate_config(composed)
        first = first or run
    assert first is not None
    return first
