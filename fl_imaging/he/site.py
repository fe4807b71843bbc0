"""A site's side of homomorphic encryption: it decrypts the global model it receives and
encrypts the update it sends. The coordinator's side is :mod:`fl_imaging.he.coordinator`.

- **Incoming** (:func:`open_global_model`, every message that carries the model: training,
  evaluation, the test round): when the ArrayRecord holds ``he.sum``, the site decrypts it with
  the consortium's key, divides by the summed weight and puts the result in place of the
  encrypted layers (the coordinator's copy of them is its initial model, never trained); the
  decrypted model is kept in the site's state folder (``he-model.pt``, with its round in
  ``he-model.json``): the last one written is the run's final model, which only the sites hold.
- **Outgoing** (:func:`encrypt_reply`, a training reply to a message with the ``he`` record):
  the layers to encrypt (every floating array, or ``strategy.he.layers`` of the site's own
  config) leave as one encrypted ``[w, w x weights]`` (``he.update``; ``w``: the cases it
  trained on); the others stay in the clear. The site's public context goes with it when the
  coordinator does not hold the consortium's key id yet. The secret key never leaves the site.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from fl_imaging.common.atomic import write_atomically
from fl_imaging.config import RunConfig
from fl_imaging.flower.protocol import NUM_EXAMPLES, SiteRefusal
from fl_imaging.he.ckks import HEError, public_context_bytes
from fl_imaging.he.vectors import (
    HE,
    HE_SUM,
    HE_UPDATE,
    decrypted_mean,
    encrypt_weighted,
    encrypted_keys,
)
from fl_imaging.site.setup import SiteSetup
from strategies.arrays import to_numpy

__all__ = ["FINAL_MODEL", "HERefusal", "encrypt_reply", "open_global_model"]

#: The decrypted global model a site keeps (its state folder), and its round beside it.
FINAL_MODEL = "he-model.pt"
FINAL_MODEL_INFO = "he-model.json"


class HERefusal(SiteRefusal):
    """The site cannot decrypt what it was sent (another key, damaged bytes, no site's weight)
    or encrypt its update (a value out of CKKS's range); the message says which."""


def open_global_model(msg: Message, setup: SiteSetup, cfg: RunConfig, rnd: int) -> Message:
    """``msg`` with its ``arrays`` decrypted when they hold ``he.sum`` (changed in place; a
    message without it is returned as it is); the decrypted model written to the site's state
    folder as round ``rnd``'s. Raises :class:`HERefusal` when the sum does not decrypt."""
    if not msg.has_content() or "arrays" not in msg.content.array_records:
        return msg
    arrays = msg.content["arrays"]
    if HE_SUM not in arrays:
        return msg
    like = {k: v for k, v in to_numpy(arrays).items() if k != HE_SUM}
    keys = encrypted_keys(like, cfg.strategy.he.layers)
    key = setup.he_context()
    try:
        model = decrypted_mean(key.context, arrays[HE_SUM].numpy().tobytes(), like, keys)
    except HEError as err:
        raise HERefusal(
            f"[site {setup.name}] the encrypted global model does not decrypt with the "
            f"consortium's key {key.key_id}: {err}"
        ) from None
    _keep_model(setup, model, rnd)
    records = {k: v for k, v in msg.content.items() if k != "arrays"}
    record = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in model.items()})
    msg.content = RecordDict({**records, "arrays": record})  # type: ignore[arg-type]
    return msg


def _keep_model(setup: SiteSetup, model: dict[str, np.ndarray], rnd: int) -> None:
    """Write the decrypted model into the site's state folder (``he-model.pt``), with its
    round (``he-model.json``)."""
    state = {k: torch.from_numpy(np.array(v)) for k, v in model.items()}
    folder = setup.folder
    write_atomically(folder / FINAL_MODEL, lambda handle: torch.save(state, handle))
    info = json.dumps({"round": rnd, "site": setup.name}).encode()
    write_atomically(folder / FINAL_MODEL_INFO, lambda handle: handle.write(info))


def encrypt_reply(msg: Message, reply: Message, setup: SiteSetup, cfg: RunConfig) -> Message:
    """``reply`` (the site's training reply to ``msg``) with its encrypted layers replaced by
    ``he.update`` and the ``he`` record (the key id; the public context when ``msg``'s key id
    is not the consortium's). An error reply is returned as it is. Raises :class:`HERefusal`
    when a value cannot be encrypted."""
    if reply.has_error() or "arrays" not in reply.content.array_records:
        return reply
    key = setup.he_context()
    arrays = to_numpy(reply.content["arrays"])
    keys = encrypted_keys(arrays, cfg.strategy.he.layers)
    weight = float(reply.content["metrics"][NUM_EXAMPLES])  # type: ignore[arg-type]
    asked = msg.content.config_records.get(HE, ConfigRecord())
    sites = int(asked.get("sites", 1))  # type: ignore[arg-type]
    try:
        data = encrypt_weighted(key.context, arrays, keys, weight, sites)
    except HEError as err:
        raise HERefusal(f"[site {setup.name}] its update cannot be encrypted: {err}") from None
    plain = {k: Array(v) for k, v in arrays.items() if k not in keys}
    plain[HE_UPDATE] = Array(np.frombuffer(data, dtype=np.uint8))
    he: dict[str, Any] = {"key-id": key.key_id}
    if str(asked.get("key-id", "")) != key.key_id:
        he["context"] = public_context_bytes(key.context)  # the public part only
    records = {k: v for k, v in reply.content.items() if k != "arrays"}
    reply.content = RecordDict(
        {**records, "arrays": ArrayRecord(plain), HE: ConfigRecord(he)}  # type: ignore[arg-type]
    )
    return reply
