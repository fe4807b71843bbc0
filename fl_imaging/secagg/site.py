"""A site's side of secure aggregation: its keys, its shares, its masked reply, its part in
unmasking, and every check a site makes so that a coordinator that deviates from the protocol
still learns no single site's update. The coordinator's side and the stages are in
:mod:`fl_imaging.secagg.coordinator`; the arithmetic in :mod:`fl_imaging.secagg.arithmetic`.

One round, from a site's point of view (round ``r``; every stage is a message from the
coordinator, every check is the site's own, from its own state):

1. **keys** (``query.secagg_keys``, or the previous round's unmask message): two new ECDH key
   pairs for round ``r`` (one to encrypt shares for other sites, one whose pairwise secrets seed
   the masks), their public keys signed with the site's identity
   (:mod:`fl_imaging.site.identity`) over the run, the round, its node and its name.
2. **shares** (``query.secagg_shares``): the round's roster of keys. The site checks its own
   entry is its own, every other entry's signature against its own roster of the consortium's
   public keys, one entry per site, at least its policy's ``secure_aggregation.min_sites``
   sites, and a threshold ``t`` above half of them; then it draws a new self-mask seed and
   splits it and its mask key into Shamir shares, one per site, each encrypted for its
   recipient.
3. **train**: with the training message come the shares the other sites made for this site
   (kept); the site masks its update with its seed and with one pairwise mask per site that
   shared (``U1``).
4. **unmask** (``query.secagg_unmask``): the survivors (``U2``) and the dropouts; the site
   reveals its share of each survivor's seed and of each dropout's mask key.

What each check closes:

- **new keys every round**, the mask key and seed of round ``r`` used for no other round: a
  dropout's mask key, revealed to remove its pairwise masks, unmasks nothing of another round
  (with keys kept across rounds, the key revealed in round 5 and the seeds revealed in rounds
  1-4, while the site survived, gave the coordinator those rounds' updates);
- **one answer per stage and round, rounds only forward**: a replayed or repeated request (an
  old round's keys, shares or unmask, a second training message of the round) is refused, so
  the coordinator cannot make a site mask twice or share twice;
- **signed keys, checked against the site's own roster**: a coordinator that hands a site its
  own public key in another site's name (and so reads that site's shares) is refused;
- **never both secrets of one site in one round**: the site remembers, across messages, whose
  seed and whose mask key it revealed in the round, and refuses a request that would reveal the
  other one (asking the same sites twice with different survivor lists);
- **a threshold above half of the round's sites**: with the memory above, two groups of sites
  told different stories about who dropped out (each giving one of the two secrets of the same
  site) would have to be disjoint and each reach the threshold, which needs ``2t <= n``; so no
  consistency round (signed survivor lists) is needed against a coordinator alone. A
  coordinator colluding with ``c`` sites needs ``2t <= n + c - 1``: the guarantee holds against
  fewer than ``2t - n + 1`` colluding sites;
- **a minimum number of sites** (the site's policy): its update is masked only among, and
  unmasked only inside a sum of, at least that many sites.

A site keeps its round in its Flower ``context.state`` (per run, kept between messages in both
engines); nothing of a finished round is kept once the next round's shares are made.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common.secure_aggregation.crypto.shamir import create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
    decrypt,
    encrypt,
    generate_shared_key,
)
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)

from fl_imaging.flower.internals import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)
from fl_imaging.flower.protocol import NUM_EXAMPLES, SiteRefusal
from fl_imaging.secagg.arithmetic import (
    KEYS_ACTION,
    MASKED,
    SECAGG,
    SHARES_ACTION,
    UNMASK_ACTION,
    SecAggSettings,
    keystream_mask,
    pack,
    pair_seed,
    pairwise_sign,
    private_scalar,
    weight_factor,
)
from fl_imaging.site.identity import IdentityError, SiteIdentity, signed_bytes

__all__ = [
    "SECAGG_STAGES",
    "SecAggGuard",
    "SecAggRefused",
    "advertise_keys",
    "keys_bundle_bytes",
    "mask_reply",
    "reveal_shares",
    "settings_of",
    "share_keys",
]

#: The round in progress in the site's ``context.state`` (one ConfigRecord).
ROUND_STATE = "secagg-round"
#: Prefix of the keys made for a round, before their shares are made: ``secagg-keys-<round>``.
KEYS_STATE = "secagg-keys-"
#: Key records kept for rounds not begun yet (the next round's keys come with an unmask reply).
MAX_PENDING_KEYS = 2


class SecAggRefused(SiteRefusal):
    """A site refuses a secure aggregation request; the message says what the request would
    have given away, or which policy key it breaks."""


@dataclass(frozen=True)
class SecAggGuard:
    """What a site brings to secure aggregation: its ``identity`` (signing key and the
    consortium's roster) and ``min_sites``, the fewest sites it masks among and is unmasked
    with (its policy's ``secure_aggregation.min_sites``, at least 2)."""

    identity: SiteIdentity
    min_sites: int = 2


def keys_bundle_bytes(
    run_id: int, rnd: int, node: int, site: str, c_public: bytes, s_public: bytes
) -> bytes:
    """What a site signs for round ``rnd``'s keys: the run, the round, its node id, its name
    and its two public keys."""
    return signed_bytes(
        "fl-imaging secure aggregation keys", int(run_id), int(rnd), int(node), site,
        bytes(c_public), bytes(s_public),
    )  # fmt: skip


def _reply(msg: Message, values: dict) -> Message:
    return Message(RecordDict({SECAGG: ConfigRecord(values)}), reply_to=msg)


def _round_state(context: Context) -> ConfigRecord | None:
    return context.state.config_records.get(ROUND_STATE)


def _current_round(context: Context) -> int:
    state = _round_state(context)
    return int(state["round"]) if state is not None else 0


def _refuse(why: str) -> SecAggRefused:
    return SecAggRefused(f"secure aggregation: {why}")


def _keys_for(context: Context, rnd: int, guard: SecAggGuard, msg: Message) -> ConfigRecord:
    """The keys this site made for round ``rnd`` (made now, signed, when there are none);
    older pending keys are dropped."""
    name = f"{KEYS_STATE}{rnd}"
    if name in context.state.config_records:
        return context.state.config_records[name]
    c_private, c_public = generate_key_pairs()
    s_private, s_public = generate_key_pairs()
    c_bytes, s_bytes = public_key_to_bytes(c_public), public_key_to_bytes(s_public)
    node = int(msg.metadata.dst_node_id)
    signature = guard.identity.sign(
        keys_bundle_bytes(msg.metadata.run_id, rnd, node, guard.identity.name, c_bytes, s_bytes)
    )
    record = ConfigRecord(
        {
            "round": rnd,
            "c-private": private_key_to_bytes(c_private),
            "s-private": private_key_to_bytes(s_private),
            "c-public": c_bytes,
            "s-public": s_bytes,
            "signature": signature,
        }
    )
    pending = sorted(
        int(k[len(KEYS_STATE) :]) for k in context.state.config_records if k.startswith(KEYS_STATE)
    )
    for old in pending[: max(0, len(pending) - MAX_PENDING_KEYS + 1)]:
        del context.state[f"{KEYS_STATE}{old}"]
    context.state[name] = record
    return record


def _bundle(keys: ConfigRecord, guard: SecAggGuard) -> dict:
    return {
        "round": int(keys["round"]),
        "site": guard.identity.name,
        "c-public": bytes(keys["c-public"]),
        "s-public": bytes(keys["s-public"]),
        "signature": bytes(keys["signature"]),
    }


def advertise_keys(msg: Message, context: Context, guard: SecAggGuard) -> Message:
    """Stage 1: this site's public keys for the requested round, signed (the same ones again
    when asked twice). Refuses a round before the one it has begun."""
    rnd = int(msg.content[SECAGG]["round"])
    current = _current_round(context)
    if rnd <= current:
        raise _refuse(
            f"keys for round {rnd} were asked, but this site has begun round {current}: a "
            "finished round's keys are never made or used again"
        )
    return _reply(msg, _bundle(_keys_for(context, rnd, guard, msg), guard))


def _verified_roster(msg: Message, keys: ConfigRecord, guard: SecAggGuard) -> dict:
    """The round's roster from the shares request, every entry checked (see the module)."""
    config = msg.content[SECAGG]
    rnd = int(config["round"])
    me = int(msg.metadata.dst_node_id)
    nodes = [int(n) for n in config["nodes"]]
    sites = [str(s) for s in config["sites"]]
    c_publics = [bytes(k) for k in config["c-publics"]]
    s_publics = [bytes(k) for k in config["s-publics"]]
    signatures = [bytes(s) for s in config["signatures"]]
    if len({len(nodes), len(sites), len(c_publics), len(s_publics), len(signatures)}) != 1:
        raise _refuse("the roster's lists differ in length")
    if len(set(nodes)) != len(nodes) or len(set(sites)) != len(sites):
        raise _refuse(f"a node or a site appears twice in the roster ({nodes}, {sites})")
    if me not in nodes:
        raise _refuse(f"this site (node {me}) is not in the roster it was asked to share with")
    mine = nodes.index(me)
    own = (guard.identity.name, bytes(keys["c-public"]), bytes(keys["s-public"]))
    if (sites[mine], c_publics[mine], s_publics[mine]) != own:
        raise _refuse(
            "the roster holds other keys or another name for this site than the ones it made: "
            "changed on the way"
        )
    for node, site, c_pub, s_pub, signature in zip(
        nodes, sites, c_publics, s_publics, signatures, strict=True
    ):
        if node != me:
            try:
                guard.identity.verify(
                    site,
                    keys_bundle_bytes(msg.metadata.run_id, rnd, node, site, c_pub, s_pub),
                    signature,
                )
            except IdentityError as err:
                raise _refuse(str(err)) from None
    threshold = int(config["threshold"])
    if len(nodes) < guard.min_sites:
        raise _refuse(
            f"policy secure_aggregation.min_sites={guard.min_sites}: the round has "
            f"{len(nodes)} site(s)"
        )
    if not (2 <= threshold <= len(nodes) and 2 * threshold > len(nodes)):
        raise _refuse(
            f"threshold {threshold} of {len(nodes)} sites: it must be more than half of them "
            "(with half or fewer, two groups of sites could each rebuild one of a site's two "
            "secrets)"
        )
    return {
        "nodes": nodes,
        "sites": sites,
        "c-publics": c_publics,
        "s-publics": s_publics,
        "threshold": threshold,
    }


def share_keys(msg: Message, context: Context, guard: SecAggGuard) -> Message:
    """Stage 2: check the round's roster (:func:`_verified_roster`), draw this round's
    self-mask seed, split it and the mask key into Shamir shares (the threshold of them rebuild
    each) and reply with one ciphertext per other site (Flower's plaintext layout: source,
    destination, seed share, key share; encrypted under the pair's ECDH key of this round)."""
    rnd = int(msg.content[SECAGG]["round"])
    current = _current_round(context)
    if rnd <= current:
        raise _refuse(
            f"shares for round {rnd} were asked, but this site has begun round {current}: "
            "a site shares its keys once per round, for a round after the last one"
        )
    name = f"{KEYS_STATE}{rnd}"
    if name not in context.state.config_records:
        raise _refuse(f"this site made no keys for round {rnd} (the keys stage comes first)")
    keys = context.state.config_records[name]
    roster = _verified_roster(msg, keys, guard)
    me, nodes = int(msg.metadata.dst_node_id), roster["nodes"]
    seed = secrets.token_bytes(32)
    s_private = bytes_to_private_key(keys["s-private"])
    c_private = bytes_to_private_key(keys["c-private"])
    seed_shares = create_shares(seed, roster["threshold"], len(nodes))
    key_shares = create_shares(private_scalar(s_private), roster["threshold"], len(nodes))
    dsts, cts = [], []
    for dst, c_public, seed_share, key_share in zip(
        nodes, roster["c-publics"], seed_shares, key_shares, strict=True
    ):
        if dst == me:
            own = (seed_share, key_share)
            continue
        shared = generate_shared_key(c_private, bytes_to_public_key(c_public))
        dsts.append(dst)
        cts.append(encrypt(shared, share_keys_plaintext_concat(me, dst, seed_share, key_share)))
    for key in [k for k in context.state.config_records if k.startswith(KEYS_STATE)]:
        if int(key[len(KEYS_STATE) :]) <= rnd:
            del context.state[key]  # this round's keys move into the round; older ones go
    context.state[ROUND_STATE] = ConfigRecord(
        {
            "round": rnd,
            "stage": "shared",
            **roster,
            "c-private": bytes(keys["c-private"]),
            "s-private": bytes(keys["s-private"]),
            "seed": seed,
            "seed-from": [me],
            "seed-shares": [own[0]],
            "key-from": [me],
            "key-shares": [own[1]],
            "revealed-seed": [],
            "revealed-key": [],
        }
    )
    return _reply(msg, {"dsts": dsts, "cts": cts})


def settings_of(config: ConfigRecord) -> SecAggSettings:
    """The arithmetic settings the coordinator sent in a ``secagg`` ConfigRecord."""
    return SecAggSettings(
        clipping_range=float(config["clipping-range"]),
        quantization_range=int(config["quantization-range"]),
        modulus=int(config["modulus"]),
        max_weight=float(config["max-weight"]),
    )


def _take_shares(msg: Message, state: ConfigRecord, u1: list[int]) -> None:
    """Decrypt the shares the other sites of ``u1`` made for this site (forwarded with the
    training message) and keep them; each must come from its claimed source, for this site."""
    config = msg.content[SECAGG]
    me = int(msg.metadata.dst_node_id)
    srcs = [int(n) for n in config["srcs"]]
    if sorted(srcs) != sorted(n for n in u1 if n != me):
        raise _refuse("the shares forwarded are not those of the sites the round masks with")
    c_private = bytes_to_private_key(state["c-private"])
    publics = dict(zip(state["nodes"], state["c-publics"], strict=True))
    seed_from, seed_shares = list(state["seed-from"]), list(state["seed-shares"])
    key_from, key_shares = list(state["key-from"]), list(state["key-shares"])
    for src, ciphertext in zip(srcs, config["cts"], strict=True):
        shared = generate_shared_key(c_private, bytes_to_public_key(publics[src]))
        try:
            plain = decrypt(shared, bytes(ciphertext))
        except Exception:  # Fernet's InvalidToken: not encrypted under this pair's key
            raise _refuse(f"the share forwarded from node {src} was not made by it") from None
        source, destination, seed_share, key_share = share_keys_plaintext_separate(plain)
        if (source, destination) != (src, me):
            raise _refuse(f"the share forwarded from node {src} was made for another pair")
        seed_from.append(src)
        seed_shares.append(seed_share)
        key_from.append(src)
        key_shares.append(key_share)
    state["seed-from"], state["seed-shares"] = seed_from, seed_shares
    state["key-from"], state["key-shares"] = key_from, key_shares


def mask_reply(msg: Message, reply: Message, context: Context, guard: SecAggGuard) -> Message:
    """Stage 3: replace the model in ``reply`` (this site's training reply to ``msg``) by its
    masked, quantised update, once per round.

    The update is the floating arrays of the reply minus those of the global model received, in
    the global model's order, flattened, packed with the site's weight (``num-examples``, which
    leaves the metrics; :func:`~fl_imaging.secagg.arithmetic.weight_factor`) and quantised
    (:func:`fl_imaging.secagg.arithmetic.pack`); integer arrays (batch-norm counters) are not sent.
    Raises :class:`SecAggRefused` for a round this site shared no keys for or masked already,
    or sites it did not share with; ValueError for a reply unlike the global model or a value
    outside the clipping range."""
    config = msg.content.config_records[SECAGG]
    settings = settings_of(config)
    me, rnd = int(msg.metadata.dst_node_id), int(config["round"])
    state = _round_state(context)
    if state is None or int(state["round"]) != rnd:
        raise _refuse(f"asked to mask for round {rnd}, for which this site shared no keys")
    if state["stage"] != "shared":
        raise _refuse(f"this site has masked its update of round {rnd} already: once per round")
    u1 = sorted(int(n) for n in config["u1"])
    if me not in u1 or not set(u1) <= set(state["nodes"]):
        raise _refuse("the sites to mask with are not the round's sites, or not with this site")
    if len(u1) < int(state["threshold"]) or len(u1) < guard.min_sites:
        raise _refuse(
            f"only {len(u1)} site(s) to mask with: fewer than the threshold "
            f"{int(state['threshold'])} or the policy's secure_aggregation.min_sites="
            f"{guard.min_sites}"
        )
    _take_shares(msg, state, u1)
    sent = msg.content["arrays"]
    local = reply.content["arrays"]
    if list(local) != list(sent):
        raise ValueError("secure aggregation: the trained model's arrays differ from the global")
    keys = [k for k in sent if np.issubdtype(sent[k].numpy().dtype, np.floating)]
    update = np.concatenate(
        [(local[k].numpy().astype(np.float64) - sent[k].numpy()).ravel() for k in keys]
    )
    metrics = dict(reply.content["metrics"])
    cases = float(metrics.pop(NUM_EXAMPLES))
    factor = weight_factor(cases, str(config.get("weighting", "cases")), settings)
    masked = pack(factor, update, settings)
    masked += keystream_mask(bytes(state["seed"]), masked.size, settings.modulus)
    s_private = bytes_to_private_key(state["s-private"])
    publics = dict(zip(state["nodes"], state["s-publics"], strict=True))
    for other in u1:
        if other != me:
            shared = generate_shared_key(s_private, bytes_to_public_key(publics[other]))
            mask = keystream_mask(pair_seed(shared, rnd), masked.size, settings.modulus)
            masked += pairwise_sign(me, other) * mask
    masked %= settings.modulus
    state["u1"] = u1
    state["stage"] = "masked"
    content = RecordDict(
        {
            **{k: v for k, v in reply.content.config_records.items()},
            "metrics": MetricRecord(metrics),
            MASKED: ArrayRecord({MASKED: Array(masked.astype(np.uint32))}),
        }
    )
    return Message(content, reply_to=msg)


def reveal_shares(msg: Message, context: Context, guard: SecAggGuard) -> Message:
    """Stage 4: reveal this site's shares of the survivors' seeds and of the dropouts' mask
    keys for the round it masked in, never both of one site (remembered across messages), only
    for sites it masked with, and only inside a sum of at least ``guard.min_sites`` sites. With
    ``next-round`` in the request, the reply also carries this site's signed keys for that
    round (saving the next round a keys stage)."""
    config = msg.content[SECAGG]
    rnd = int(config["round"])
    me = int(msg.metadata.dst_node_id)
    state = _round_state(context)
    if state is None or int(state["round"]) != rnd:
        raise _refuse(
            f"unmasking of round {rnd} was asked, but this site's round is "
            f"{_current_round(context)}: a finished round is never unmasked again"
        )
    if state["stage"] not in ("masked", "unmasking"):
        raise _refuse(f"this site sent no masked update in round {rnd}")
    u1 = {int(n) for n in state["u1"]}
    survivors = {int(n) for n in config["survivors"]}
    dropped = {int(n) for n in config["dropped"]}
    if survivors & dropped:
        raise _refuse(
            f"nodes {sorted(survivors & dropped)} are named both survivor and dropout: "
            "revealing both shares would unmask them"
        )
    if not (survivors | dropped) <= u1:
        raise _refuse(f"nodes {sorted((survivors | dropped) - u1)} did not mask in this round")
    if me not in survivors:
        raise _refuse("this site sent its masked update but is not named a survivor")
    if len(survivors) < guard.min_sites:
        raise _refuse(
            f"policy secure_aggregation.min_sites={guard.min_sites}: the sum would hold only "
            f"{len(survivors)} site(s)"
        )
    seeds_shown, keys_shown = set(state["revealed-seed"]), set(state["revealed-key"])
    both = (survivors & keys_shown) | (dropped & seeds_shown)
    if both:
        raise _refuse(
            f"this site already revealed the other secret of nodes {sorted(both)} in round "
            f"{rnd}: revealing this one too would unmask them alone"
        )
    seed_of = dict(zip(state["seed-from"], state["seed-shares"], strict=True))
    key_of = dict(zip(state["key-from"], state["key-shares"], strict=True))
    seed_srcs, key_srcs = sorted(survivors), sorted(dropped)
    state["revealed-seed"] = sorted(seeds_shown | survivors)
    state["revealed-key"] = sorted(keys_shown | dropped)
    state["stage"] = "unmasking"
    values = {
        "seed-srcs": seed_srcs,
        "seed-shares": [bytes(seed_of[n]) for n in seed_srcs],
        "key-srcs": key_srcs,
        "key-shares": [bytes(key_of[n]) for n in key_srcs],
    }
    upcoming = int(config.get("next-round", 0))
    if upcoming > rnd:  # a ConfigRecord holds no nested record: the bundle's keys as next-*
        bundle = _bundle(_keys_for(context, upcoming, guard, msg), guard)
        values.update({f"next-{k}": v for k, v in bundle.items()})
    return _reply(msg, values)


#: The ClientApp's query handlers of the stages, by action (``query.<action>`` messages).
SECAGG_STAGES = {
    KEYS_ACTION: advertise_keys,
    SHARES_ACTION: share_keys,
    UNMASK_ACTION: reveal_shares,
}
