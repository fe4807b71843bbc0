"""What the coordinator and the sites say to each other: run_config and message keys, the reply a
site sends, and the one helper that names the site behind a reply.

This is the ground floor of the Flower side: the ServerApp, the ClientApp, our strategies and the
tests all read these names from here, so that both ends of a message agree on them.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict

__all__ = [
    "CONFIG_KEY",
    "CONTROL",
    "CONTROL_DELTA",
    "DITTO_EPOCHS",
    "DITTO_LAMBDA",
    "EVALUATE_GLOBAL",
    "EVAL_SPLIT",
    "FINETUNE_EPOCHS",
    "GLOBAL_EVAL",
    "LOCAL_EPOCHS",
    "MALICIOUS",
    "NUM_EXAMPLES",
    "PROXIMAL_MU",
    "SERVER_ROUND",
    "SITE_NAME",
    "SITE_RECORD",
    "RUN_KEY",
    "UNIT_WEIGHT",
    "ReplySites",
    "SiteError",
    "SiteRefusal",
    "SiteRefused",
    "content_sha256",
    "error_reason",
    "raise_if_refused",
    "refusal_of",
    "site_errors",
    "site_reply",
    "with_metadata",
]

#: run_config key holding the whole resolved experiment config as YAML (``fl-imaging``; the
#: other run_config keys: :mod:`fl_imaging.flower.app_config`).
CONFIG_KEY = "fl-imaging-config"
#: ConfigRecord in every reply that names the site which sent it.
SITE_RECORD = "site"
SITE_NAME = "name"
#: Metric Flower's strategies weight by: the number of samples (cases), never batches.
NUM_EXAMPLES = "num-examples"
#: Metric every site sends as 1: the weight of DP-FedAvg, which must weight sites equally.
UNIT_WEIGHT = "unit-weight"
#: Train-config key of the run's key: the same in a resumed run as in the run it continues
#: (a site's privacy ledger keeps one entry per run key).
RUN_KEY = "run-key"
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
#: SCAFFOLD (strategy=scaffold): the ArrayRecord of the global control variate ``c`` in a
#: training message, and the one of a site's ``c_i+ - c_i`` in its reply, beside ``arrays``
#: (one float32 array per trainable parameter, named and shaped as the parameter).
CONTROL = "scaffold-control"
CONTROL_DELTA = "scaffold-control-delta"
#: Ditto (strategy=ditto): train-config keys of the personal model's regulariser ``lambda``
#: and of its epochs of training per round.
DITTO_LAMBDA = "ditto-lambda"
DITTO_EPOCHS = "ditto-epochs"


def site_reply(
    msg: Message,
    site: str,
    metrics: Mapping[str, float],
    arrays: ArrayRecord | None = None,
    global_eval: Mapping[str, float] | None = None,
) -> Message:
    """The reply a site sends to ``msg``: its ``metrics`` (plus ``unit-weight`` = 1), the
    ``site`` record naming it, the model ``arrays`` (training replies) and, with one message
    per round, its evaluation of the previous global model (``global_eval``)."""
    content = RecordDict(
        {
            "metrics": MetricRecord({**metrics, UNIT_WEIGHT: 1}),
            SITE_RECORD: ConfigRecord({SITE_NAME: site}),
        }
    )
    if arrays is not None:
        content["arrays"] = arrays
    if global_eval is not None:
        content[GLOBAL_EVAL] = ConfigRecord(dict(global_eval))
    return Message(content=content, reply_to=msg)


def content_sha256(content: RecordDict) -> str:
    """SHA-256 (hex) of a message's content, the same at both ends of the wire: per record in
    sorted order its name and kind, then arrays (name, dtype, shape, bytes), metrics and config
    values (key and ``repr``; bytes as hex) in sorted key order. What a site records of each
    reply it sent and the coordinator of each reply it received, so that the two can be
    compared (``fl-imaging-audit site``)."""
    digest = hashlib.sha256()
    for name in sorted(content):
        record = content[name]
        digest.update(f"\0{name}\0{type(record).__name__}\0".encode())
        if isinstance(record, ArrayRecord):
            for key, array in record.items():
                values = np.ascontiguousarray(array.numpy())
                digest.update(f"{key}\0{values.dtype.str}\0{list(values.shape)}\0".encode())
                digest.update(values.tobytes())
        else:
            for key in sorted(record):
                value = record[key]
                shown = (
                    [v.hex() if isinstance(v, bytes) else repr(v) for v in value]
                    if isinstance(value, list)
                    else value.hex()
                    if isinstance(value, bytes)
                    else repr(value)
                )
                digest.update(f"{key}\0{shown}\0".encode())
    return digest.hexdigest()


class SiteError(RuntimeError):
    """A site's ClientApp failed; the message starts with ``[site NAME]``, the only way to name
    the site in the error reply Flower builds from it (an error reply carries no content)."""


class SiteRefusal(ValueError):
    """Raised at a site that refuses what the coordinator asks (its own policy, or a secure
    aggregation request that would give away what the site protects). Its error reply reads
    ``[site NAME] refused: <message>``; the coordinator stops the run with it
    (:func:`raise_if_refused`)."""


class SiteRefused(RuntimeError):
    """At the coordinator: a site refused a request (see :class:`SiteRefusal`); the run stops,
    and the message names the round, the site and the site's reason."""


_SITE_IN_ERROR = re.compile(r"\[site ([^\]{}]+)\]")  # not the source line of a traceback
_REFUSED = re.compile(r"\[site ([^\]{}]+)\] refused: ([^\n]*)")
#: Flower's reason for an exception raised in a ClientApp: ``<class 'T'>:<'message'>``.
_FLOWER_REASON = re.compile(r"^<class '[^']*'>:<'(.*)'>$", re.DOTALL)


@contextmanager
def site_errors(site: str) -> Iterator[None]:
    """Inside, an exception of a site's ClientApp is raised again as a :class:`SiteError` that
    names ``site``, its type and its message, so that the coordinator knows which site failed
    and why even if the site never answered otherwise."""
    try:
        yield
    except SiteRefusal as err:
        raise SiteError(f"[site {site}] refused: {err}") from err
    except Exception as err:
        raise SiteError(f"[site {site}] {type(err).__name__}: {err}") from err


def error_reason(msg: Message) -> str:
    """The reason of an error reply, without Flower's ``<class ...>:<'...'>`` wrapping."""
    reason = msg.error.reason
    match = _FLOWER_REASON.match(reason)
    return match.group(1) if match else reason


def refusal_of(msg: Message) -> str | None:
    """The reason of a site's refusal (:class:`SiteRefusal`) when ``msg`` is one, else None."""
    if not msg.has_error():
        return None
    found = _REFUSED.findall(error_reason(msg))  # the last: Ray's traceback repeats it
    return found[-1][1] if found else None


def raise_if_refused(msg: Message, site: str, rnd: int) -> None:
    """Raise :class:`SiteRefused` naming round ``rnd``, ``site`` and its reason when ``msg`` is
    a site's refusal; do nothing otherwise."""
    reason = refusal_of(msg)
    if reason is not None:
        raise SiteRefused(f"round {rnd}: site {site} refused: {reason}")


class ReplySites:
    """Names the site behind a reply: the one place that does.

    A site's replies carry its name (:func:`site_reply`); an error reply carries the name in its
    reason when our ClientApp raised it (:func:`site_errors`), else only the sender's node id:
    then the name the node gave earlier is used, and a node never heard from is called
    ``node-<id>``. ``known`` seeds node id -> site name.
    """

    def __init__(self, known: Mapping[int, str] | None = None) -> None:
        self.names: dict[int, str] = dict(known or {})

    def __call__(self, msg: Message) -> str:
        """The name of the site that sent ``msg`` (learnt from it when it names itself)."""
        node = int(msg.metadata.src_node_id)
        if msg.has_error():
            if (named := _SITE_IN_ERROR.search(msg.error.reason)) is not None:
                self.names[node] = named.group(1)
        elif SITE_RECORD in msg.content.config_records:
            self.names[node] = str(msg.content.config_records[SITE_RECORD][SITE_NAME])
        return self.of_node(node)

    def of_node(self, node_id: int) -> str:
        """The name node ``node_id`` gave in its replies so far, or ``node-<id>``."""
        return self.names.get(int(node_id), f"node-{node_id}")


#: The fields of a message's metadata, as Flower's public ``Metadata`` constructor takes them.
_METADATA_FIELDS = (
    "run_id",
    "message_id",
    "src_node_id",
    "dst_node_id",
    "reply_to_message_id",
    "group_id",
    "created_at",
    "ttl",
    "message_type",
    "src_task_id",
    "dst_task_id",
)


def with_metadata(message: Message, **fields: object) -> Message:
    """A copy of ``message`` (the same content, or the same error) whose metadata has
    ``fields`` replaced (e.g. ``src_node_id=3``), the rest copied, built with Flower's public
    ``Metadata`` and ``Message`` constructors; Flower's metadata has no setter for the message's
    id or sender. Raises TypeError for a name that is not a metadata field."""
    old = message.metadata
    unknown = set(fields) - set(_METADATA_FIELDS)
    if unknown:
        raise TypeError(f"not metadata fields: {', '.join(sorted(unknown))}")
    values = {name: getattr(old, name) for name in _METADATA_FIELDS} | fields
    metadata = Metadata(**values)  # type: ignore[arg-type]
    metadata.delivered_at = old.delivered_at
    if message.has_error():
        return Message(error=message.error, metadata=metadata)
    return Message(content=message.content, metadata=metadata)
