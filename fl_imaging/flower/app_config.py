"""The experiment config of a Flower run, read from its run config (``context.run_config``).

fl-imaging is a Flower App (``[tool.flwr.app]`` in the root ``pyproject.toml``), so a run can
come two ways, and both end in the same validated :class:`~fl_imaging.config.RunConfig`:

- ``fl-imaging engine=deployment ...`` sends the whole resolved config as YAML under
  ``fl-imaging-config`` (what the researcher's command composed and checked, sites included);
- ``flwr run . <federation> --run-config "overrides='experiment=quick'"`` sends Hydra overrides:
  every side (the ServerApp and each ClientApp) composes the packaged ``conf/`` with them, as
  ``fl-imaging`` does, then applies the flat keys ``num-server-rounds`` (``engine.rounds``; 0
  keeps the config's) and ``run-dir`` (``run_dir``; "" means ``runs/flwr-<run id>`` in the
  working folder of the ServerApp). Sites this machine can read (the demo, a public dataset,
  ``data.sites``) are prepared as ``fl-imaging`` prepares them (demo data written on first use,
  each site checked); a SuperNode given ``data-dir`` in its node config reads its own folder.

Flower accepts only the keys declared in ``[tool.flwr.app.config]`` and scalar values, which is
why the config travels as one string.
"""

from __future__ import annotations

import functools
import shlex
from dataclasses import replace
from pathlib import Path

from flwr.app import Context

from fl_imaging.config import ConfigError, DataName, RunConfig, config_from_yaml
from fl_imaging.flower.protocol import CONFIG_KEY

__all__ = [
    "APP_CONFIG",
    "CONFIG_KEY",
    "OVERRIDES_KEY",
    "ROUNDS_KEY",
    "RUN_DIR_KEY",
    "overrides_of",
    "resolve_config",
]

#: run_config key holding Hydra overrides, as on the ``fl-imaging`` command line.
OVERRIDES_KEY = "overrides"
#: run_config key for ``engine.rounds`` (the name Flower's app templates use); 0: the config's.
ROUNDS_KEY = "num-server-rounds"
#: run_config key for ``run_dir``; "": ``runs/flwr-<run id>`` in the ServerApp's working folder.
RUN_DIR_KEY = "run-dir"
#: Every run_config key with its default, as ``[tool.flwr.app.config]`` declares them.
APP_CONFIG: dict[str, str | int] = {
    OVERRIDES_KEY: "",
    ROUNDS_KEY: 0,
    RUN_DIR_KEY: "",
    CONFIG_KEY: "",
}


def overrides_of(run_config: dict) -> list[str]:
    """The Hydra overrides that ``run_config`` stands for: the words of ``overrides`` (split as
    a shell splits them, so ``'data.sites=[a, b]'`` in quotes stays one), then
    ``engine.rounds=N`` for a positive ``num-server-rounds``. Raises :class:`ConfigError` for a
    value of the wrong type."""
    text = run_config.get(OVERRIDES_KEY, "")
    rounds = run_config.get(ROUNDS_KEY, 0)
    if not isinstance(text, str):
        raise ConfigError(f"run config '{OVERRIDES_KEY}' must be a string of Hydra overrides")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise ConfigError(f"run config '{ROUNDS_KEY}' must be a whole number >= 0, not {rounds!r}")
    try:
        overrides = shlex.split(text)
    except ValueError as err:
        raise ConfigError(f"run config '{OVERRIDES_KEY}': {err} in {text!r}") from None
    return overrides + ([f"engine.rounds={rounds}"] if rounds else [])


@functools.lru_cache(maxsize=8)
def _composed(overrides: tuple[str, ...], run_dir: str, prepare: bool) -> RunConfig:
    """The config composed with ``overrides`` and checked, ``run_dir`` set; with ``prepare``,
    its sites resolved and checked as ``fl-imaging`` does (``data.sites`` set). Cached: a Ray
    worker or a warm ClientApp process composes once per run, not once per message."""
    from fl_imaging.config.compose import check_overrides

    cfg = replace(check_overrides(list(overrides)), run_dir=run_dir)
    if cfg.task.bundle is not None:  # read as data: the site's policy decides what runs
        from tasks.bundle_files import with_bundle_settings

        cfg = replace(cfg, task=with_bundle_settings(cfg.task))
    if prepare and not (cfg.data.name == DataName.folders and not cfg.data.sites):
        from fl_imaging.data.prepare import prepare_sites

        cfg, _, _ = prepare_sites(cfg)
    return cfg


def resolve_config(bound: RunConfig | None, context: Context) -> RunConfig:
    """The config of this run: ``bound`` when the app was built with one (``fl-imaging``'s
    simulation engine), else the one ``context.run_config`` sends (see the module's doc).
    Raises :class:`ConfigError` (a ValueError) for overrides Hydra or the schema refuses."""
    if bound is not None:
        return bound
    run_config = dict(context.run_config)
    text = run_config.get(CONFIG_KEY, "")
    if isinstance(text, str) and text.strip():
        return config_from_yaml(text)
    run_dir = str(run_config.get(RUN_DIR_KEY, "") or "")
    if not run_dir:
        run_dir = str(Path("runs") / f"flwr-{context.run_id}")
    # A SuperNode given its own data folder (deployment) reads only that one.
    prepare = "data-dir" not in context.node_config
    return _composed(tuple(overrides_of(run_config)), str(Path(run_dir).resolve()), prepare)
