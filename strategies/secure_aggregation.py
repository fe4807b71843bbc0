"""Secure aggregation (SecAgg+) on Flower's Message API: the coordinator learns only the sum.

Ours: Flower 1.41 runs SecAgg+ only on its legacy path (``SecAggPlusWorkflow`` with a
``LegacyContext`` and ``secaggplus_mod``, which read legacy ``fitres`` records); nothing in
``flwr.serverapp.strategy`` knows it. This wrapper drives the stages with the Grid it is given
in ``configure_train``, around any strategy whose aggregation is the weighted mean of the sites'
models (FedAvg and its server optimisers, and Flower's client-side DP wrapper around FedAvg,
which adds its noise to the unmasked mean). The cryptography is Flower's and ``cryptography``'s
(:mod:`fl_imaging.secure_sum`); the sites' side is :mod:`fl_imaging.flower.secagg_site`.

The stages and their messages:

- **setup**, once per key epoch (the first round, and again when the round's sites change or a
  dropout's mask key was revealed): ``query.secagg_keys`` (each site makes two key pairs, sends
  the public keys), then ``query.secagg_shares`` (each site sends its mask key in Shamir shares,
  each encrypted for one site; the coordinator keeps them, unreadable to it);
- **every round**: the training message carries the round's sites and their public keys; a
  site replies with its quantised ``[weight, weight * update]`` plus its self-mask and pairwise
  masks, and its shares of this round's self-mask seed (fresh every round: it is revealed at
  the end of the round);
- **unmask**, every round: ``query.secagg_unmask`` to the sites that replied; each reveals its
  shares of the survivors' self-mask seeds and of the dropouts' mask keys. With at least the
  threshold of shares for each, the coordinator removes the masks and hands the mean to the
  wrapped strategy as one reply; with fewer, the round gives no aggregate (the model is kept).

Pairwise masks are new every round without a new key exchange (each round's seed is derived
from the pair's key and the round). A dropout's mask key is revealed to unmask the others, so
it gets new keys (a new epoch) before it takes part again.
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
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

from fl_imaging.config import StrategyConfig
from fl_imaging.protocol import NUM_EXAMPLES, UNIT_WEIGHT, ReplySites
from fl_imaging.secure_sum import (
    KEYS_ACTION,
    MASKED,
    SECAGG,
    SHARES,
    SHARES_ACTION,
    UNMASK_ACTION,
    SecAggSettings,
    config_bytes,
    dequantize_sum,
    keystream_mask,
    pair_seed,
    pairwise_sign,
    threshold_of,
)
from strategies.arrays import Arrays, floating_keys, to_numpy, to_record
from strategies.wrapper import StrategyWrapper

__all__ = ["SUMMABLE", "SecureAggregation", "SecureRound", "check_secure_aggregation"]

log = logging.getLogger("fl_imaging.server")

#: Strategies whose aggregation needs only the weighted sum of the updates.
SUMMABLE = ("fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad")


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
    if per_round * secagg.quantization_range >= secagg.modulus:
        raise ValueError(
            f"{per_round} sites per round x strategy.secagg.quantization_range="
            f"{secagg.quantization_range} reach the modulus {secagg.modulus}: the sum would wrap "
            "around; lower the quantization range or raise the modulus"
        )


#: Called after every round: (round, sites summed, sites that dropped out, why it failed or "",
#: bytes each site sent and received for secure aggregation beyond its model, by site).
OnRound = Callable[[int, list[str], list[str], str, dict[str, int]], None]


@dataclass
class SecureRound:
    """One round as the coordinator holds it: its sites (node ids), the self-mask threshold,
    the training messages sent (to reply to), and each site's masked vector and shares."""

    number: int
    participants: list[int]
    threshold: int
    sent: dict[int, Message] = field(default_factory=dict)


class SecureAggregation(StrategyWrapper):
    """Wraps ``inner`` (a FedAvg-family strategy) so that the coordinator sees only the sum of
    the round's masked updates (see the module). ``threshold`` and ``num_shares`` come from
    ``strategy.secagg`` (a fraction of the round's sites or a count), ``settings`` are the
    arithmetic's; ``round_timeout`` bounds each stage (seconds); ``sites`` names nodes;
    ``on_round`` hears which sites were summed and which dropped out."""

    #: Keys and shares belong to the running federation: a resumed run makes new ones.
    checkpointed = False

    def __init__(
        self,
        inner: Strategy,
        settings: SecAggSettings,
        *,
        threshold: float,
        round_timeout: float,
        sites: ReplySites | None = None,
        on_round: OnRound | None = None,
    ) -> None:
        super().__init__(inner)
        self.settings = settings
        self.threshold = threshold
        self.round_timeout = round_timeout
        self.sites = sites or ReplySites()
        self.on_round = on_round
        self.grid: Grid | None = None
        self.sent_arrays: Arrays = {}
        #: The key epoch: node -> (encryption key, mask key) public keys; mask-key shares by
        #: destination then source; the mask-key threshold; nodes whose mask key was revealed.
        self.public: dict[int, tuple[bytes, bytes]] = {}
        self.key_shares: dict[int, dict[int, bytes]] = {}
        self.key_threshold = 0
        self.revealed: set[int] = set()
        self.round: SecureRound | None = None
        #: This round's bytes of keys, shares and unmasking, both ways, by node.
        self.traffic: dict[int, int] = {}

    def summary(self) -> None:
        """Log the settings, then the inner strategy's summary."""
        log.info(
            "Secure aggregation (SecAgg+): threshold %s of the round's sites, clipping range "
            "%g, quantisation range %d, modulus %d",
            self.threshold,
            self.settings.clipping_range,
            self.settings.quantization_range,
            self.settings.modulus,
        )
        self.inner.summary()

    # --- stages -------------------------------------------------------------------------------

    def _ask(self, action: str, rnd: int, contents: dict[int, dict]) -> dict[int, ConfigRecord]:
        """Send ``query.<action>`` with each node's ConfigRecord ``contents[node]``; return the
        ``secagg`` records of the good replies by node (failures logged with the site's name)."""
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
                log.warning(
                    "round %d: site %s failed in secure aggregation's %s: %s",
                    rnd,
                    self.sites(reply),
                    action,
                    reply.error.reason,
                )
            elif SECAGG in reply.content.config_records:
                answers[node] = reply.content.config_records[SECAGG]
                self._count(node, answers[node])
        return answers

    def _count(self, node: int, values: object) -> None:
        self.traffic[node] = self.traffic.get(node, 0) + config_bytes(values)

    def _setup(self, rnd: int, nodes: list[int]) -> None:
        """A new key epoch among ``nodes``: their public keys, then their mask-key shares."""
        keys = self._ask(KEYS_ACTION, rnd, {n: {"server-round": rnd} for n in nodes})
        self.public = {n: (bytes(a["c-public"]), bytes(a["s-public"])) for n, a in keys.items()}
        keyed = sorted(self.public)
        self.key_threshold = threshold_of(self.threshold, len(keyed))
        request = {
            "nodes": keyed,
            "c-public": [self.public[n][0] for n in keyed],
            "s-public": [self.public[n][1] for n in keyed],
            "threshold": self.key_threshold,
        }
        answers = self._ask(SHARES_ACTION, rnd, {n: dict(request) for n in keyed})
        self.key_shares = {n: {} for n in answers}
        for src, answer in answers.items():
            for dst, ciphertext in zip(answer["dsts"], answer["cts"], strict=True):
                if int(dst) in self.key_shares:
                    self.key_shares[int(dst)][src] = bytes(ciphertext)
        self.public = {n: k for n, k in self.public.items() if n in answers}
        self.revealed = set()
        log.info("round %d: secure aggregation keys set among %d site(s)", rnd, len(answers))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The inner strategy's training messages, each with the round's sites, their public
        keys and the settings; a new key epoch first when needed."""
        self.grid = grid
        self.sent_arrays = to_numpy(arrays)
        self.traffic = {}
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        nodes = sorted(int(m.metadata.dst_node_id) for m in messages)
        if set(nodes) != set(self.public) or set(nodes) & self.revealed:
            self._setup(server_round, nodes)
        participants = [n for n in nodes if n in self.public]
        threshold = threshold_of(self.threshold, len(participants))
        self.round = SecureRound(server_round, participants, threshold)
        if len(participants) < 2:
            self._failed(server_round, "fewer than 2 sites have keys: no round")
            return []
        record = {
            "round": server_round,
            "participants": participants,
            "threshold": threshold,
            "clipping-range": self.settings.clipping_range,
            "quantization-range": self.settings.quantization_range,
            "modulus": self.settings.modulus,
            "max-weight": self.settings.max_weight,
        }
        kept = []
        for msg in messages:
            if int(msg.metadata.dst_node_id) in self.public:
                msg.content[SECAGG] = ConfigRecord(dict(record))
                self._count(int(msg.metadata.dst_node_id), record)
                self.round.sent[int(msg.metadata.dst_node_id)] = msg
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
            raise RuntimeError("SecureAggregation.aggregate_train before configure_train")
        keys = self._keys()
        size = 1 + sum(self.sent_arrays[k].size for k in keys)
        masked: dict[int, Message] = {}
        for msg in replies:
            node = int(msg.metadata.src_node_id)
            self.sites(msg)  # learn the site's name
            if not msg.has_error() and MASKED in msg.content.array_records:
                if msg.content[MASKED][MASKED].numpy().size == size and node in current.sent:
                    masked[node] = msg
                    self._count(node, msg.content.config_records.get(SHARES, {}))
        survivors = sorted(masked)
        dropped = [n for n in current.participants if n not in masked]
        if len(survivors) < current.threshold:
            self._failed(
                server_round,
                f"{len(survivors)} of {len(current.participants)} sites answered, fewer than "
                f"the threshold of {current.threshold} needed to remove the masks",
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

    def _keys(self) -> list[str]:
        return floating_keys(self.sent_arrays)

    def _unmask(
        self, current: SecureRound, masked: dict[int, Message], dropped: list[int]
    ) -> np.ndarray | None:
        """The sum of the survivors' quantised vectors (int64, mod M): their masked vectors less
        their self-masks (rebuilt from the revealed seeds) and less their pairwise masks with
        the dropouts (from the dropouts' revealed mask keys)."""
        rnd, modulus = current.number, self.settings.modulus
        survivors = sorted(masked)
        shares = {n: masked[n].content.config_records[SHARES] for n in survivors}
        request = {}
        for node in survivors:
            b_srcs = [s for s in survivors if node in [int(d) for d in shares[s]["dsts"]]]
            request[node] = {
                "survivors": survivors,
                "dropped": dropped,
                "b-srcs": b_srcs,
                "b-cts": [
                    bytes(shares[s]["cts"][[int(d) for d in shares[s]["dsts"]].index(node)])
                    for s in b_srcs
                ],
                "sk-srcs": [d for d in dropped if d in self.key_shares.get(node, {})],
                "sk-cts": [
                    self.key_shares[node][d] for d in dropped if d in self.key_shares.get(node, {})
                ],
            }
        answers = self._ask(UNMASK_ACTION, rnd, request)
        seeds: dict[int, list[bytes]] = {n: [] for n in survivors}
        keys: dict[int, list[bytes]] = {n: [] for n in dropped}
        for answer in answers.values():
            for src, share in zip(answer["b-srcs"], answer["b-shares"], strict=True):
                seeds[int(src)].append(bytes(share))
            for src, share in zip(answer["sk-srcs"], answer["sk-shares"], strict=True):
                keys[int(src)].append(bytes(share))
        short = [n for n, s in seeds.items() if len(s) < current.threshold]
        short += [n for n, k in keys.items() if len(k) < self.key_threshold]
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
            private = bytes_to_private_key(combine_shares(keys[gone]))
            for node in survivors:
                shared = generate_shared_key(private, bytes_to_public_key(self.public[node][1]))
                mask = keystream_mask(pair_seed(shared, rnd), size, modulus)
                total -= pairwise_sign(node, gone) * mask
            self.revealed.add(gone)
        return total % modulus

    def _mean(self, sums: np.ndarray) -> Arrays:
        """The new global model: the sent model plus the weighted mean update (float arrays;
        integer arrays as sent)."""
        factor, updates = sums[0], sums[1:]
        if not factor > 0:
            raise ValueError("secure aggregation: the sum of the sites' weights is not positive")
        model = dict(self.sent_arrays)
        offset = 0
        for key in self._keys():
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
