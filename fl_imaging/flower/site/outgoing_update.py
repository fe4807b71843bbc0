"""What happens to a site's training reply before it leaves the site, in one place.

In order: Flower's client-side DP clipping (``strategy.dp.mode=client_*``: its
``fixedclipping_mod`` / ``adaptiveclipping_mod`` clip the update against the global model),
then either secure aggregation's masking (:mod:`.secagg_site`, when the coordinator asked for it),
homomorphic encryption (:mod:`fl_imaging.he.site`, when the coordinator asked for it) or update
compression (:mod:`.compression_site`, ``strategy.compression``). Masking and
compression never meet (refused in :mod:`fl_imaging.config.checks`).
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import Context, Message
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod

from fl_imaging.compression.codec import Codec
from fl_imaging.compression.site import compress_reply
from fl_imaging.config import CompressionMode, DPMode, RunConfig
from fl_imaging.he.records import HE
from fl_imaging.he.site import encrypt_reply
from fl_imaging.secagg.arithmetic import SECAGG
from fl_imaging.secagg.site import SecAggGuard, mask_reply
from fl_imaging.site.setup import SiteSetup

__all__ = ["CLIENT_DP_MODS", "outgoing_update"]

#: Flower's client-side DP mods, applied to training replies of the matching DP mode.
CLIENT_DP_MODS = {
    DPMode.client_fixed: fixedclipping_mod,
    DPMode.client_adaptive: adaptiveclipping_mod,
}


def _clipped(
    mod: Callable, msg: Message, context: Context, train: Callable[[Message, Context], Message]
) -> Message:
    """``train``'s reply clipped by Flower's DP ``mod``. The mod refuses a message with more
    than one ConfigRecord, so secure aggregation's record is taken out for the mod's call and
    put back for the training and the masking (the mod reads only the ``config`` record)."""
    secagg = msg.content.config_records.get(SECAGG)
    if secagg is None:
        return mod(msg, context, train)
    del msg.content[SECAGG]

    def train_with_secagg(inner: Message, ctx: Context) -> Message:
        inner.content[SECAGG] = secagg
        try:
            return train(inner, ctx)
        finally:
            del inner.content[SECAGG]

    try:
        return mod(msg, context, train_with_secagg)
    finally:
        msg.content[SECAGG] = secagg


def outgoing_update(
    msg: Message,
    context: Context,
    cfg: RunConfig,
    train: Callable[[Message, Context], Message],
    guard: Callable[[], SecAggGuard],
    setup: Callable[[], SiteSetup] | None = None,
) -> Message:
    """Run ``train`` on the coordinator's training message ``msg`` and return its reply as it
    leaves the site: clipped by Flower's client-side DP mod of ``cfg.strategy.dp.mode`` (if
    any), then masked (secure aggregation, with the site's ``guard()``), encrypted
    (homomorphic encryption, with the key of the site's ``setup()``) or encoded
    (``cfg.strategy.compression``)."""
    mod = CLIENT_DP_MODS.get(cfg.strategy.dp.mode)
    reply = train(msg, context) if mod is None else _clipped(mod, msg, context, train)
    if SECAGG in msg.content.config_records:
        return mask_reply(msg, reply, context, guard())
    if HE in msg.content.config_records and setup is not None:
        return encrypt_reply(msg, reply, setup(), cfg)
    if cfg.strategy.compression != CompressionMode.none:  # after any DP clipping
        return compress_reply(msg, reply, context, Codec.of(cfg.strategy))
    return reply
