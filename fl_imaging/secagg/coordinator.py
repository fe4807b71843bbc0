"""Secure aggregation (SecAgg+) on Flower's Message API: the coordinator learns only the sum.

Ours: Flower 1.41 runs SecAgg+ only on its legacy path (``SecAggPlusWorkflow`` with a
``LegacyContext`` and ``secaggplus_mod``, which read legacy ``fitres`` records); nothing in
``flwr.serverapp.strategy`` knows it. This wrapper drives the stages with the Grid it is given
in ``configure_train``, around any strategy whose aggregation is the weighted mean of the sites'
models (FedAvg and its server optimisers, and Flower's client-side DP wrapper around FedAvg,
which adds its noise to the unmasked mean). The cryptography is Flower's and ``cryptography``'s
(:mod:`fl_imaging.secagg.arithmetic`); the sites' side, with every check a site makes against a
coordinator that deviates, is :mod:`fl_imaging.secagg.site`.

Every round has its own keys; its stages and messages:

- **keys**: ``query.secagg_keys`` to the round's sites whose signed keys for this round did not
  come with the previous round's unmask reply (the first round, a site that was not in the
  previous round or did not answer its unmask);
- **shares**: ``query.secagg_shares`` with the round's roster (every site's signed public
  keys) and threshold; each site answers with its self-mask seed and its mask key in Shamir
  shares, one per other site, each encrypted for it (the coordinator keeps them, unreadable);
- **train**: the training message of each site that shared carries the shares made for it
  and the list of sites it masks with; a site replies with its quantised ``[weight,
  weight * update]`` plus its self-mask and pairwise masks;
- **unmask**: ``query.secagg_unmask`` to the sites that replied (the survivors), naming the
  dropouts; each reveals its shares of the survivors' seeds and of the dropouts' mask keys (and
  sends its signed keys for the next round). With at least the threshold of shares for each,
  the coordinator removes the masks and hands the mean to the wrapped strategy as one reply;
  with fewer, the round gives no aggregate (the model is kept).

A dropout's mask key, revealed to unmask the others, belongs to that round alone: it opens
nothing of the rounds before (which had their own keys) or after.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fl_imaging.config import StrategyConfig
from fl_imaging.flower.internals import bytes_to_public_key
from fl_imaging.flower.protocol import (
    NUM_EXAMPLES,
    UNIT_WEIGHT,
    ReplySites,
    error_reason,
    raise_if_refused,
)
from fl_imaging.secagg.arithmetic import (
    KEYS_ACTION,
    MASKED,
    SECAGG,
    SHARES_ACTION,
    UNMASK_ACTION,
    WEIGHTINGS,
    SecAggSettings,
    config_bytes,
    dequantize_sum,
    key_from_scalar,
    keystream_mask,
    pair_seed,
    pairwise_sign,
    threshold_of,
)
from strategies.arrays import Arrays, floating_keys, to_numpy, to_record
from strategies.wrapper import StrategyWrapper

__all__ = [
    "SUMMABLE",
    "SecureAggregation",
    "SecureRound",
    "check_secure_aggregation",
    "secure_weighting",
]

log = logging.getLogger("fl_imaging.server")

#: Strategies whose aggregation needs only the weighted sum of the updates.
SUMMABLE = ("fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad", "ditto")


def check_secure_aggregation(cfg: StrategyConfig, per_round: int) -> None:
    """Refuse, before the run, what cannot work when the coordinator sees only the sum of the
    updates (``cfg.secagg.enabled``): a strategy that needs single updates, server-side norm
    bounding or clipping, per-site outlier rejection, too many sites for the modulus. Raises
    ValueError with the reason and what to use instead; passes when secure aggregation is off."""
    secagg = cfg.secagg
    if not secagg.enabled:
        return
    bound = "clipping at the sites (strategy.dp.mode=client_fixed) bounds every update's norm"
    if cfg.name not in SUMMABLE:
        raise ValueError(
            f"strategy={cfg.name} needs every site's own update, which secure aggregation hides "
            f"from the coordinator; use one of {', '.join(SUMMABLE)} (robust aggregation cannot "
            f"see single updates: {bound})"
        )
    if cfg.norm_bound is not None:
        raise ValueError(
            f"strategy.norm_bound={cfg.norm_bound} bounds each update on the coordinator, which "
            f"sees only the sum with secure aggregation; {bound}"
        )
    if cfg.dp.mode not in ("none", "client_fixed"):
        raise ValueError(
            f"strategy.dp.mode={cfg.dp.mode.value}: with secure aggregation only client_fixed "
            "works (each site clips, the coordinator adds the noise once to the sum); server-side "
            "clipping needs single updates, adaptive clipping a clear bit from every site"
        )
    if cfg.validation.norm_outliers == "reject":
        raise ValueError(
            "strategy.validation.norm_outliers=reject compares each site's update with the "
            f"others', which secure aggregation hides from the coordinator; {bound}"
        )
    wanted = secagg.threshold if secagg.threshold > 1 else secagg.threshold * per_round
    if 2 * wanted <= per_round:
        raise ValueError(
            f"strategy.secagg.threshold={secagg.threshold:g}: {wanted:g} of {per_round} sites "
            "is not more than half of them, and the sites refuse that (two groups of sites "
            "could each rebuild one of a site's two secrets); use more than 0.5"
        )
    if secagg.weighting not in WEIGHTINGS:
        raise ValueError(
            f"strategy.secagg.weighting={secagg.weighting}: use one of {', '.join(WEIGHTINGS)}"
        )
    if cfg.dp.mode != "none" and secagg.weighting == "cases":
        raise ValueError(
            f"strategy.dp.mode={cfg.dp.mode.value} with strategy.secagg.weighting="
            f"{secagg.weighting}: client-level DP's noise assumes equal site weights (a site of "
            "90 cases among sites of 5 would weigh 0.9, not 1/3, and its epsilon be understated "
            "2.7x); set strategy.secagg.weighting=equal (or auto)"
        )
    if per_round * secagg.quantization_range >= secagg.modulus:
        raise ValueError(
            f"{per_round} sites per round x strategy.secagg.quantization_range="
            f"{secagg.quantization_range} reach the modulus {secagg.modulus}: the sum would wrap "
            "around; lower the quantization range or raise the modulus"
        )


def secure_weighting(cfg: StrategyConfig) -> str:
    """How the sites weigh in the secure sum: ``strategy.secagg.weighting``, with ``auto``
    resolved (equal under client-level DP, else by training cases)."""
    weighting = cfg.secagg.weighting
    if weighting == "auto":
        return "equal" if cfg.dp.mode != "none" else "cases"
    return weighting


#: Called after every round: (round, sites summed, sites that dropped out, why it failed or "",
#: bytes each site sent and received for secure aggregation beyond its model, by site).
OnRound = Callable[[int, list[str], list[str], str, dict[str, int]], None]


@dataclass
class SecureRound:
    """One round as the coordinator holds it: its number, the sites that shared their keys
    (``u1``, node ids), the threshold, each of their mask public keys and the training messages
    sent (to reply to)."""

    number: int
    u1: list[int]
    threshold: int
    mask_keys: dict[int, bytes] = field(default_factory=dict)
    sent: dict[int, Message] = field(default_factory=dict)


class SecureAggregation(StrategyWrapper):
    """Wraps ``inner`` (a FedAvg-family strategy) so that the coordinator sees only the sum of
    the round's masked updates (see the module). ``threshold`` comes from ``strategy.secagg``
    (a fraction of the round's sites or a count), ``settings`` are the arithmetic's,
    ``weighting`` how the sites weigh in the sum (``cases`` or ``equal``); ``round_timeout``
    bounds each stage (seconds); ``sites`` names nodes; ``on_round`` hears which sites were
    summed and which dropped out."""

    #: Keys and shares belong to the running federation: a resumed run makes new ones.
    checkpointed = False

    def __init__(
        self,
        inner: Strategy,
        settings: SecAggSettings,
        *,
        threshold: float,
        round_timeout: float,
        weighting: str = "cases",
        sites: ReplySites | None = None,
        on_round: OnRound | None = None,
    ) -> None:
        super().__init__(inner)
        self.settings = settings
        self.threshold = threshold
        self.round_timeout = round_timeout
        self.weighting = weighting
        self.sites = sites or ReplySites()
        self.on_round = on_round
        #: Hears every stage's good reply: (round, message type, reply).
        self.on_reply: Callable[[int, str, Message], None] | None = None
        self.grid: Grid | None = None
        self.sent_arrays: Arrays = {}
        #: Signed keys for a coming round that came with the last unmask replies, by node.
        self.next_keys: dict[int, dict] = {}
        self.round: SecureRound | None = None
        #: This round's bytes of keys, shares and unmasking, both ways, by node.
        self.traffic: dict[int, int] = {}

    def summary(self) -> None:
        """Log the settings, then the inner strategy's summary."""
        log.info(
            "Secure aggregation (SecAgg+, new keys every round): threshold %s of the round's "
            "sites, weights %s, clipping range %g, quantisation range %d, modulus %d",
            self.threshold,
            self.weighting,
            self.settings.clipping_range,
            self.settings.quantization_range,
            self.settings.modulus,
        )
        self.inner.summary()

    # --- stages -------------------------------------------------------------------------------

    def _ask(self, action: str, rnd: int, contents: dict[int, dict]) -> dict[int, ConfigRecord]:
        """Send ``query.<action>`` with each node's ConfigRecord ``contents[node]``; return the
        ``secagg`` records of the good replies by node. A site's refusal by its policy stops
        the run (:class:`~fl_imaging.flower.protocol.SiteRefused`); other failures are logged with
        the site's name."""
        assert self.grid is not None
        messages = [
            Message(
                RecordDict({SECAGG: ConfigRecord(values)}),
                dst_node_id=node,
                message_type=f"query.{action}",
                group_id=str(rnd),
            )
            for node, values in contents.items()
        ]
        for node, values in contents.items():
            self._count(node, values)
        answers: dict[int, ConfigRecord] = {}
        start = time.perf_counter()
        replies = list(self.grid.send_and_receive(messages, timeout=self.round_timeout))
        log.info(
            "round %d: secure aggregation's %s stage: %d of %d site(s) answered in %.1f s",
            rnd,
            action,
            sum(not r.has_error() for r in replies),
            len(messages),
            time.perf_counter() - start,
        )
        for reply in replies:
            node = int(reply.metadata.src_node_id)
            if reply.has_error():
                site = self.sites(reply)
                raise_if_refused(reply, site, rnd)
                log.warning(
                    "round %d: site %s failed in secure aggregation's %s: %s",
                    rnd,
                    site,
                    action,
                    error_reason(reply),
                )
            elif SECAGG in reply.content.config_records:
                answers[node] = reply.content.config_records[SECAGG]
                if self.on_reply is not None:
                    self.on_reply(rnd, f"query.{action}", reply)
                self._count(node, answers[node])
        return answers

    def _count(self, node: int, values: object) -> None:
        self.traffic[node] = self.traffic.get(node, 0) + config_bytes(values)

    def _keys(self, rnd: int, nodes: list[int]) -> dict[int, dict]:
        """Each node's signed keys for round ``rnd``: those that came with the last unmask
        replies, the others asked for now."""
        keys = {
            n: self.next_keys[n] for n in nodes if self.next_keys.get(n, {}).get("round") == rnd
        }
        missing = [n for n in nodes if n not in keys]
        if missing:
            answers = self._ask(KEYS_ACTION, rnd, {n: {"round": rnd} for n in missing})
            keys.update({n: dict(a) for n, a in answers.items()})
        self.next_keys = {}
        return keys

    def _shares(self, rnd: int, keys: dict[int, dict]) -> tuple[int, dict[int, ConfigRecord]]:
        """The round's threshold and each keyed site's encrypted shares (by node)."""
        keyed = sorted(keys)
        threshold = threshold_of(self.threshold, len(keyed))
        request = {
            "round": rnd,
            "nodes": keyed,
            "sites": [str(keys[n]["site"]) for n in keyed],
            "c-publics": [bytes(keys[n]["c-public"]) for n in keyed],
            "s-publics": [bytes(keys[n]["s-public"]) for n in keyed],
            "signatures": [bytes(keys[n]["signature"]) for n in keyed],
            "threshold": threshold,
        }
        return threshold, self._ask(SHARES_ACTION, rnd, {n: dict(request) for n in keyed})

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The inner strategy's training messages, after the round's keys and shares stages,
        each with the shares made for its site, the sites it masks with and the settings."""
        self.grid = grid
        self.sent_arrays = to_numpy(arrays)
        self.traffic = {}
        self.round = None
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        nodes = sorted(int(m.metadata.dst_node_id) for m in messages)
        keys = self._keys(server_round, nodes)
        if len(keys) < 2:
            self._failed(server_round, f"{len(keys)} site(s) sent keys, fewer than 2: no round")
            return []
        threshold, shares = self._shares(server_round, keys)
        # a site's shares must reach every other site that shared
        u1 = sorted(shares)
        for src in list(u1):
            if not set(u1) - {src} <= {int(d) for d in shares[src]["dsts"]}:
                u1.remove(src)
        if len(u1) < threshold:
            self._failed(
                server_round,
                f"only {len(u1)} of {len(keys)} sites shared their keys, fewer than the "
                f"threshold of {threshold} needed to remove the masks",
            )
            return []
        current = SecureRound(
            server_round, u1, threshold, {n: bytes(keys[n]["s-public"]) for n in u1}
        )
        self.round = current
        record = {
            "round": server_round,
            "u1": u1,
            "clipping-range": self.settings.clipping_range,
            "quantization-range": self.settings.quantization_range,
            "modulus": self.settings.modulus,
            "max-weight": self.settings.max_weight,
            "weighting": self.weighting,
        }
        by_dst = {
            s: dict(zip(map(int, shares[s]["dsts"]), shares[s]["cts"], strict=False)) for s in u1
        }
        kept = []
        for msg in messages:
            dst = int(msg.metadata.dst_node_id)
            if dst not in u1:
                continue
            srcs = [s for s in u1 if s != dst]
            values = {
                **record,
                "srcs": srcs,
                "cts": [bytes(by_dst[s][dst]) for s in srcs],
            }
            # the inner strategy's messages may share one RecordDict: each gets its own
            msg.content = RecordDict({**dict(msg.content.items()), SECAGG: ConfigRecord(values)})
            self._count(dst, values)
            current.sent[dst] = msg
            kept.append(msg)
        return kept

    def _failed(self, rnd: int, reason: str) -> None:
        log.error("round %d: secure aggregation failed: %s; the global model is kept", rnd, reason)
        if self.on_round is not None:
            self.on_round(rnd, [], [], reason, self._traffic())

    def _traffic(self) -> dict[str, int]:
        return {self.sites.of_node(n): b for n, b in self.traffic.items()}

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Unmask the sum of the masked replies and return the inner strategy's aggregate of
        their weighted mean (one reply); ``(None, None)`` when the round cannot be unmasked."""
        current = self.round
        if current is None or current.number != server_round:
            return None, None  # the round failed before training (reason already recorded)
        size = 1 + sum(self.sent_arrays[k].size for k in self._float_keys())
        masked: dict[int, Message] = {}
        for msg in replies:
            node = int(msg.metadata.src_node_id)
            self.sites(msg)  # learn the site's name
            if not msg.has_error() and MASKED in msg.content.array_records:
                if msg.content[MASKED][MASKED].numpy().size == size and node in current.sent:
                    masked[node] = msg
        survivors = sorted(masked)
        dropped = [n for n in current.u1 if n not in masked]
        if len(survivors) < current.threshold:
            self._failed(
                server_round,
                f"{len(survivors)} of {len(current.u1)} sites answered, fewer than the "
                f"threshold of {current.threshold} needed to remove the masks",
            )
            return None, None
        total = self._unmask(current, masked, dropped)
        if total is None:
            return None, None
        names = [self.sites.of_node(n) for n in survivors]
        dropped_names = [self.sites.of_node(n) for n in dropped]
        if self.on_round is not None:
            self.on_round(server_round, names, dropped_names, "", self._traffic())
        mean = self._mean(dequantize_sum(total, len(survivors), self.settings))
        return self.inner.aggregate_train(
            server_round, [self._as_reply(current.sent[n], mean, masked) for n in survivors]
        )

    def _float_keys(self) -> list[str]:
        return floating_keys(self.sent_arrays)

    def _unmask(
        self, current: SecureRound, masked: dict[int, Message], dropped: list[int]
    ) -> np.ndarray | None:
        """The sum of the survivors' quantised vectors (int64, mod M): their masked vectors less
        their self-masks (rebuilt from the revealed seeds) and less their pairwise masks with
        the dropouts (from the dropouts' revealed mask keys of this round)."""
        rnd, modulus = current.number, self.settings.modulus
        survivors = sorted(masked)
        request = {"round": rnd, "survivors": survivors, "dropped": dropped, "next-round": rnd + 1}
        answers = self._ask(UNMASK_ACTION, rnd, {n: dict(request) for n in survivors})
        seeds: dict[int, list[bytes]] = {n: [] for n in survivors}
        keys: dict[int, list[bytes]] = {n: [] for n in dropped}
        for node, answer in answers.items():
            for src, share in zip(answer["seed-srcs"], answer["seed-shares"], strict=True):
                if int(src) in seeds:
                    seeds[int(src)].append(bytes(share))
            for src, share in zip(answer["key-srcs"], answer["key-shares"], strict=True):
                if int(src) in keys:
                    keys[int(src)].append(bytes(share))
            if "next-round" in answer:
                self.next_keys[node] = {
                    k[len("next-") :]: v for k, v in answer.items() if k.startswith("next-")
                }
        short = [n for n, s in seeds.items() if len(s) < current.threshold]
        short += [n for n, k in keys.items() if len(k) < current.threshold]
        if short:
            self._failed(
                rnd,
                f"only {len(answers)} site(s) helped to unmask; the shares of "
                f"{', '.join(self.sites.of_node(n) for n in short)} are below the threshold",
            )
            return None
        total = sum(masked[n].content[MASKED][MASKED].numpy().astype(np.int64) for n in survivors)
        size = total.size
        for node in survivors:
            total -= keystream_mask(combine_shares(seeds[node]), size, modulus)
        for gone in dropped:
            private = key_from_scalar(combine_shares(keys[gone]))
            for node in survivors:
                public = bytes_to_public_key(current.mask_keys[node])
                mask = keystream_mask(
                    pair_seed(generate_shared_key(private, public), rnd), size, modulus
                )
                total -= pairwise_sign(node, gone) * mask
        return total % modulus

    def _mean(self, sums: np.ndarray) -> Arrays:
        """The new global model: the sent model plus the weighted mean update (float arrays;
        integer arrays as sent)."""
        factor, updates = sums[0], sums[1:]
        if not factor > 0:
            raise ValueError("secure aggregation: the sum of the sites' weights is not positive")
        model = dict(self.sent_arrays)
        offset = 0
        for key in self._float_keys():
            value = self.sent_arrays[key]
            step = updates[offset : offset + value.size].reshape(value.shape) / factor
            model[key] = (value + step).astype(value.dtype)
            offset += value.size
        return model

    def _as_reply(self, sent: Message, model: Arrays, masked: dict[int, Message]) -> Message:
        """The mean as a reply to ``sent``, weight 1, with each training metric averaged over the
        survivors: one per survivor, so that the wrapped strategy (Flower's DP wrapper counts
        the replies) averages identical models into the mean."""
        values: dict[str, list[float]] = {}
        for msg in masked.values():
            for key, value in msg.content["metrics"].items():
                if isinstance(value, int | float):
                    values.setdefault(key, []).append(float(value))
        metrics = {k: float(np.mean(v)) for k, v in values.items()}
        metrics.update({NUM_EXAMPLES: 1.0, UNIT_WEIGHT: 1.0})
        content = RecordDict({"arrays": to_record(model), "metrics": MetricRecord(metrics)})
        return Message(content, reply_to=sent)
