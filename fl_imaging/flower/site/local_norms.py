"""FedBN on the site side: the normalisation layers a site keeps to itself.

FedBN (Li et al. 2021, "FedBN: Federated Learning on Non-IID Features via Local Batch
Normalization") shares every weight but those of the normalisation layers: each site keeps its own
scale, shift and running statistics, so that sites with different scanners normalise their
features their own way. Flower 1.41 has no FedBN (only a research baseline outside the library),
so this module is ours. The server aggregates as usual (its average of the normalisation layers
serves a new site); each site overwrites them with its own after receiving the global model.

The kept layers live in the node's Flower ``context.state`` (a ``RecordDict`` that Flower keeps
per site between messages, in simulation and in deployment), not in process memory: Ray may
run a site on a different worker in each round.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Context
from torch import nn

from fl_imaging.training.model_checks import norm_state_keys

__all__ = ["LOCAL_NORMS", "restore_local_norms", "save_local_norms"]

#: Key of the site's own normalisation layers in its ``context.state``.
LOCAL_NORMS = "fedbn-local-norms"


def restore_local_norms(model: nn.Module, context: Context) -> bool:
    """Load the site's own normalisation layers from ``context.state`` into ``model`` (after the
    global weights were loaded). Returns False when the site has none yet (its first round)."""
    if LOCAL_NORMS not in context.state.array_records:
        return False
    local = context.state.array_records[LOCAL_NORMS].to_torch_state_dict()
    model.load_state_dict(local, strict=False)
    return True


def save_local_norms(model: nn.Module, context: Context) -> None:
    """Keep ``model``'s normalisation layers (CPU copies) in the site's ``context.state``."""
    state = model.state_dict()
    kept = {k: state[k].detach().cpu().clone() for k in norm_state_keys(model)}
    context.state[LOCAL_NORMS] = ArrayRecord(kept)
