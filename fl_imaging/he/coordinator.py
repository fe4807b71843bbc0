"""Homomorphic encryption of the updates: the coordinator's side. It adds ciphertexts it
cannot read.

Ours: neither Flower nor TenSEAL has a federated HE aggregation; the cryptography (CKKS) is
TenSEAL's (:mod:`fl_imaging.he.ckks`). :class:`HomomorphicAggregation` wraps FedAvg (or
FedProx, the same aggregation): every training message carries a ``he`` ConfigRecord (the
round, the key id of the public context the coordinator holds, the encrypted layers); each
site replies with the layers in the clear that are not encrypted, and ``he.update``: its
``[w, w x weights]`` of the encrypted layers under the consortium's key (with its public
context, once, when the coordinator does not hold it yet). The coordinator:

- keeps the first public context it receives, named by the key id the site gave (no secret
  key: :func:`check_public` refuses one that has it), and leaves out replies under another
  key id (a site of another consortium, or with a new key);
- adds the round's encrypted vectors (:func:`~fl_imaging.he.ckks.add_encrypted`) and puts the
  sum into the global ArrayRecord as ``he.sum``; the layers in the clear are FedAvg's mean;
- never holds the encrypted layers' trained values: its copy of them stays the initial model
  (which every party knows), and every message that carries the model (training, evaluation,
  test round) carries ``he.sum``, which the sites decrypt (:mod:`fl_imaging.he.site`). The
  final model is kept by the sites; the coordinator's run folder has no ``model.pt``.

A site that drops out of a round is simply not in that round's sum; the others' sum decrypts
(no pairwise keys, no threshold), so two sites suffice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fl_imaging.config import RunConfig, StrategyConfig
from fl_imaging.he import vectors
from fl_imaging.he.ckks import (
    COEFF_MOD_BIT_SIZES,
    MAX_ERROR,
    POLY_MODULUS_DEGREE,
    SCALE_BITS,
    HEError,
    HEUnavailable,
    add_encrypted,
    context_from,
    tenseal,
)
from fl_imaging.he.records import HE, HE_SUM, HE_UPDATE
from strategies.arrays import Arrays, cast_like, to_numpy
from strategies.wrapper import StrategyWrapper

__all__ = [
    "WEIGHTED_SUM",
    "HomomorphicAggregation",
    "check_homomorphic",
    "check_public",
    "encrypted_model_note",
    "parameters_line",
]

log = logging.getLogger("fl_imaging.server")

#: Strategies whose aggregation is FedAvg's weighted mean and nothing else at the coordinator
#: (FedProx adds its proximal term at the sites). Server optimisers (FedAvgM, FedAdam, ...)
#: keep momentum on the plaintext mean at the coordinator, which it never sees here.
WEIGHTED_SUM = ("fedavg", "fedprox")


def check_homomorphic(cfg: StrategyConfig) -> None:
    """Refuse, before the run, what cannot work when the coordinator only adds ciphertexts
    (``cfg.he.enabled``): another strategy than :data:`WEIGHTED_SUM`, secure aggregation at the
    same time, client-level DP, coordinator-side norm bounds or outlier rejection, FedBN,
    compression, or TenSEAL missing. Raises ValueError with the reason and what to use
    instead; passes when HE is off."""
    if not cfg.he.enabled:
        return
    bound = (
        "bound the updates at the sites instead (task.dp_sgd.enabled=true clips every "
        "per-sample gradient)"
    )
    if cfg.name not in WEIGHTED_SUM:
        robust = "needs every site's own update"
        server = "keeps its optimiser's state on the plaintext mean"
        why = server if cfg.name in ("fedavgm", "fedadam", "fedyogi", "fedadagrad") else robust
        raise ValueError(
            f"strategy={cfg.name} {why}, which homomorphic encryption hides from the "
            f"coordinator (it only adds ciphertexts); use {' or '.join(WEIGHTED_SUM)}"
        )
    if cfg.secagg.enabled:
        raise ValueError(
            "strategy.he.enabled=true with strategy.secagg.enabled=true: each hides the "
            "updates from the coordinator on its own; turn one of them off"
        )
    if cfg.dp.mode.value != "none":
        raise ValueError(
            f"strategy.dp.mode={cfg.dp.mode.value}: client-level DP clips and noises at the "
            "coordinator, which holds only ciphertexts with homomorphic encryption; use "
            "patient-level DP-SGD at the sites (task.dp_sgd.enabled=true), which composes"
        )
    if cfg.norm_bound is not None:
        raise ValueError(
            f"strategy.norm_bound={cfg.norm_bound} bounds each update on the coordinator, which "
            f"cannot read them with homomorphic encryption; {bound}"
        )
    if cfg.validation.norm_outliers == "reject":
        raise ValueError(
            "strategy.validation.norm_outliers=reject compares the sites' updates, which the "
            f"coordinator cannot read with homomorphic encryption; {bound}"
        )
    if cfg.fedbn:
        raise ValueError(
            "strategy.fedbn=true with homomorphic encryption is not built (the sites' own "
            "normalisation layers would travel in the encrypted sum); turn one of them off"
        )
    if cfg.compression.value != "none":
        raise ValueError(
            f"strategy.compression={cfg.compression.value}: a CKKS ciphertext cannot be "
            "compressed (its bytes are uniformly random); use strategy.compression=none"
        )
    try:
        tenseal()
    except HEUnavailable as err:  # an ImportError: said as a config problem, no traceback
        raise ValueError(str(err)) from None


def parameters_line(layers: list[str] | tuple[str, ...] = ()) -> str:
    """The CKKS parameters and what is encrypted, for the log and summary.txt."""
    which = f"the layers {', '.join(layers)}" if layers else "every floating array"
    return (
        f"CKKS (TenSEAL), polynomial degree {POLY_MODULUS_DEGREE}, coefficient modulus "
        f"{list(COEFF_MOD_BIT_SIZES)} bits, scale 2**{SCALE_BITS}, 128-bit security; "
        f"{which} encrypted (the rest in the clear); error of the decrypted sum below "
        f"{MAX_ERROR:g} per value before the division by the summed weight"
    )


def encrypted_model_note(cfg: RunConfig) -> str:
    """summary.txt's lines on homomorphic encryption: its parameters, and where the final
    model is (at the sites, not in the run folder); empty without it."""
    from fl_imaging.site.setup import site_state_root

    he = cfg.strategy.he
    if not he.enabled:
        return ""
    where = (
        f"{site_state_root(cfg)}/<site>-<hash>/he-model.pt"
        if cfg.engine.name.value == "simulation"
        else "he-model.pt in each SuperNode's --state folder"
    )
    return (
        f"homomorphic encryption: {parameters_line(he.layers)}\n"
        f"final model: kept by the sites only ({where}, its round in he-model.json); the "
        "coordinator never decrypted it, so this folder has no model.pt and no MONAI bundle"
    )


def check_public(context: Any) -> Any:
    """``context`` if it holds no secret key; raises :class:`~fl_imaging.he.ckks.HEError`
    otherwise (a site that sent its secret key: the coordinator refuses to hold it)."""
    if context.has_secret_key():
        raise HEError("a site sent a context holding its secret key: refused, not kept")
    return context


#: Called after every round: (round, sites whose ciphertexts were added, sites left out and
#: why, bytes of ciphertext each site sent).
OnRound = Callable[[int, list[str], dict[str, str], dict[str, int]], None]


class HomomorphicAggregation(StrategyWrapper):
    """Wraps ``inner`` (FedAvg or FedProx) so that the encrypted layers are added as
    ciphertexts (see the module); ``layers`` names them (empty: every floating array),
    ``sites`` names a reply's site (a callable taking the reply), ``on_round`` hears who was
    added."""

    #: The public context belongs to the consortium, not to the run: a resumed run asks anew.
    checkpointed = False

    def __init__(
        self,
        inner: Strategy,
        layers: list[str] | tuple[str, ...] = (),
        *,
        sites: Callable[[Message], str] | None = None,
        on_round: OnRound | None = None,
    ) -> None:
        super().__init__(inner)
        self.layers = list(layers)
        self.sites = sites or (lambda msg: str(msg.metadata.src_node_id))
        self.on_round = on_round
        self.context: Any = None
        self.key: str = ""
        self.sent_arrays: Arrays = {}
        #: Seconds spent adding ciphertexts, per round (for the log).
        self.add_seconds: dict[int, float] = {}

    def summary(self) -> None:
        """Log the parameters, then the inner strategy's summary."""
        log.info("Homomorphic encryption: %s", parameters_line(self.layers))
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The inner strategy's training messages, each with the ``he`` record: the round, the
        key id the coordinator holds ("" before the first reply), the encrypted layers and the
        number of sites asked (each keeps its values below ``HEADROOM / sites``)."""
        self.sent_arrays = to_numpy(arrays)
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        record = {
            "round": server_round,
            "key-id": self.key,
            "layers": list(self.layers),
            "sites": len(messages),  # the sum must not wrap: each site bounds its share
        }
        for msg in messages:
            # the inner strategy's messages share one RecordDict: each gets its own
            msg.content = RecordDict({**dict(msg.content.items()), HE: ConfigRecord(record)})
        return messages

    def learn_context(self, he: ConfigRecord) -> None:
        """Keep the public context a reply's ``he`` record carries, named by its key id, when
        none is held yet. Raises :class:`~fl_imaging.he.ckks.HEError` for a context holding a
        secret key (not kept) or bytes that are no context."""
        context_bytes = he.get("context")
        if self.key or not context_bytes:
            return
        self.context = check_public(context_from(bytes(context_bytes)))  # type: ignore[arg-type]
        self.key = str(he.get("key-id", ""))  # the sites' name for their key
        log.info("homomorphic encryption: holding the public context of key %s", self.key)

    def _encrypted_of(self, msg: Message) -> bytes | None:
        """The reply's encrypted vector, after learning the public context it may carry; None
        (logged) when it is under another key than the one held."""
        he = msg.content.config_records.get(HE, ConfigRecord())
        self.learn_context(he)
        if str(he.get("key-id", "")) != self.key:
            log.warning(
                "site %s encrypted under key %s, not the consortium's %s: left out",
                self.sites(msg),
                he.get("key-id"),
                self.key,
            )
            return None
        return msg.content["arrays"][HE_UPDATE].numpy().tobytes()

    def _as_plain_reply(self, msg: Message, keys: list[str]) -> Message:
        """``msg`` (changed in place) with its arrays as the inner strategy expects them: the
        layers in the clear as sent by the site, the encrypted layers as the coordinator's own
        copy (the same for every reply, so FedAvg's mean leaves them as they are)."""
        sent = {k: v for k, v in msg.content["arrays"].items() if k != HE_UPDATE}
        arrays = {
            name: sent[name] if name in sent else Array(value)
            for name, value in self.sent_arrays.items()
            if name != HE_SUM and (name in sent or name in keys)
        }
        records = {k: v for k, v in msg.content.items() if k not in ("arrays", HE)}
        msg.content = RecordDict({**records, "arrays": ArrayRecord(arrays)})  # type: ignore[arg-type]
        return msg

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The inner strategy's aggregate of the layers in the clear, with ``he.sum``: the sum
        of the round's encrypted vectors under the consortium's key. ``(None, None)`` when no
        reply carries one."""
        replies = list(replies)
        keys = vectors.encrypted_keys(self.sent_arrays, self.layers)
        kept: list[Message] = []
        encrypted: list[bytes] = []
        added: list[str] = []
        left_out: dict[str, str] = {}
        traffic: dict[str, int] = {}
        for msg in replies:
            if msg.has_error():
                kept.append(msg)  # the inner strategy (and the recorder) see the failure
                continue
            site = self.sites(msg)
            if HE_UPDATE not in msg.content.array_records.get("arrays", ArrayRecord()):
                left_out[site] = "its reply holds no encrypted update"
                continue
            try:
                data = self._encrypted_of(msg)
            except HEError as err:
                left_out[site] = str(err)
                continue
            if data is None:
                left_out[site] = "encrypted under another key"
                continue
            encrypted.append(data)
            added.append(site)
            traffic[site] = len(data)
            kept.append(self._as_plain_reply(msg, keys))
        if not encrypted:
            if self.on_round is not None:
                self.on_round(server_round, added, left_out, traffic)
            return None, None
        start = time.perf_counter()
        try:
            total = add_encrypted(self.context, encrypted)
        except HEError as err:  # a reply of another length: no sum this round
            left_out["all"] = str(err)
            if self.on_round is not None:
                self.on_round(server_round, [], left_out, traffic)
            return None, None
        self.add_seconds[server_round] = time.perf_counter() - start
        log.info(
            "round %d: homomorphic encryption: added %d encrypted updates (%.1f MB) in %.2f s",
            server_round,
            len(encrypted),
            sum(map(len, encrypted)) / 1e6,
            self.add_seconds[server_round],
        )
        arrays, metrics = self.inner.aggregate_train(server_round, kept)
        if arrays is None:
            return None, metrics
        if self.on_round is not None:
            self.on_round(server_round, added, left_out, traffic)
        # Flower's averaging makes integer counters float64: back to the model's dtypes, so that
        # the sites find the same arrays floating (encrypted) as they encrypted
        plain = cast_like(to_numpy(arrays), self.sent_arrays)
        out = {k: Array(np.ascontiguousarray(v)) for k, v in plain.items()}
        out[HE_SUM] = Array(np.frombuffer(total, dtype=np.uint8))
        return ArrayRecord(out), metrics  # type: ignore[arg-type]
