"""Names shared by the ServerApp and the ClientApp: what travels in run_config and in messages."""

from __future__ import annotations

from flwr.app import Context

from fl_imaging.config import RunConfig, config_from_yaml

__all__ = [
    "CONFIG_KEY",
    "EVALUATE_GLOBAL",
    "EVAL_SPLIT",
    "FINETUNE_EPOCHS",
    "GLOBAL_EVAL",
    "LOCAL_EPOCHS",
    "NUM_EXAMPLES",
    "PROXIMAL_MU",
    "SERVER_ROUND",
    "SITE_NAME",
    "SITE_RECORD",
    "MALICIOUS",
    "UNIT_WEIGHT",
    "resolve_config",
]

#: run_config key holding the whole resolved experiment config as YAML (deployment engine).
CONFIG_KEY = "fl-imaging-config"
#: ConfigRecord in every reply that names the site which sent it.
SITE_RECORD = "site"
SITE_NAME = "name"
#: Metric Flower's strategies weight by: the number of samples (cases), never batches.
NUM_EXAMPLES = "num-examples"
#: Metric every site sends as 1: the weight of DP-FedAvg, which must weight sites equally.
UNIT_WEIGHT = "unit-weight"
#: Metric a site sends as 1 when it is a simulated malicious site (attack=...), else 0.
MALICIOUS = "malicious"
SERVER_ROUND = "server-round"
LOCAL_EPOCHS = "local-epochs"
#: Train-config flag: evaluate the received global model before training, and send the result
#: in the reply's ConfigRecord ``GLOBAL_EVAL`` (one message per round).
EVALUATE_GLOBAL = "evaluate-global"
GLOBAL_EVAL = "global-eval"
#: Evaluate-config keys of the final test round: the split to score (``val`` by default, or
#: ``test``) and the epochs of local fine-tuning after which a site scores the test cases again.
EVAL_SPLIT = "split"
FINETUNE_EPOCHS = "finetune-epochs"
#: Train-config key of FedProx's proximal weight (sent by Flower's FedProx).
PROXIMAL_MU = "proximal-mu"


def resolve_config(bound: RunConfig | None, context: Context) -> RunConfig:
    """Return the config an app was built with (simulation) or the one sent in run_config
    (deployment). Raises ValueError when neither exists."""
    if bound is not None:
        return bound
    text = context.run_config.get(CONFIG_KEY)
    if not isinstance(text, str):
        raise ValueError(
            f"run_config has no '{CONFIG_KEY}': start runs with `fl-imaging`, which sends the "
            "experiment config along."
        )
    return config_from_yaml(text)
