"""A site's side of secure aggregation: its keys, its shares, its masked reply, its part in
unmasking. The coordinator's side and the stages are in :mod:`strategies.secure_aggregation`;
the arithmetic in :mod:`fl_imaging.secure_sum`.

A site keeps, in its Flower ``context.state`` (per run, kept between messages in both engines):
two ECDH key pairs (one to encrypt shares to other sites, one whose pairwise secrets seed the
masks), the other sites' public keys and the nodes whose mask key it helped to reveal. The
shares it is sent travel through the coordinator, encrypted for it (Fernet under the pair's
ECDH key, tagged with source and destination). It refuses what would let the coordinator
unmask a site alone: revealing a site's self-mask share and its mask-key share in the same
round, and masking again with a site whose mask key was revealed (new keys first).
"""

from __future__ import annotations

import secrets

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common.secure_aggregation.crypto.shamir import create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
    decrypt,
    encrypt,
    generate_shared_key,
)
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

from fl_imaging.protocol import NUM_EXAMPLES
from fl_imaging.secure_sum import (
    KEYS_ACTION,
    MASKED,
    SECAGG,
    SHARES,
    SHARES_ACTION,
    UNMASK_ACTION,
    SecAggSettings,
    keystream_mask,
    pack,
    pair_seed,
    pairwise_sign,
)

__all__ = [
    "SECAGG_STAGES",
    "advertise_keys",
    "mask_reply",
    "reveal_shares",
    "share_mask_key",
    "settings_of",
]

#: The site's secure aggregation state in its ``context.state``.
STATE = "secagg-state"


def _reply(msg: Message, values: dict) -> Message:
    return Message(RecordDict({SECAGG: ConfigRecord(values)}), reply_to=msg)


def _state(context: Context) -> ConfigRecord:
    if STATE not in context.state.config_records:
        raise ValueError("secure aggregation: this site has no keys yet (setup stage missing)")
    return context.state.config_records[STATE]


def _tag(src: int, dst: int) -> bytes:
    return b"%d>%d:" % (src, dst)


def _encrypt_for(context: Context, src: int, dst: int, share: bytes) -> bytes:
    state = _state(context)
    publics = dict(zip(state["nodes"], state["c-public"], strict=True))
    key = generate_shared_key(
        bytes_to_private_key(state["c-private"]), bytes_to_public_key(publics[dst])
    )
    return encrypt(key, _tag(src, dst) + share)


def _decrypt_from(context: Context, src: int, dst: int, ciphertext: bytes) -> bytes:
    """A share ``src`` encrypted for this site (``dst``); checks it was meant for this pair."""
    state = _state(context)
    publics = dict(zip(state["nodes"], state["c-public"], strict=True))
    key = generate_shared_key(
        bytes_to_private_key(state["c-private"]), bytes_to_public_key(publics[src])
    )
    plain = decrypt(key, ciphertext)
    if not plain.startswith(_tag(src, dst)):
        raise ValueError(f"secure aggregation: a share from node {src} was not meant for {dst}")
    return plain[len(_tag(src, dst)) :]


def advertise_keys(msg: Message, context: Context) -> Message:
    """Setup, first stage: make this site's two key pairs for the run's next key epoch, keep the
    private keys in ``context.state``, reply with the public keys."""
    c_private, c_public = generate_key_pairs()
    s_private, s_public = generate_key_pairs()
    context.state[STATE] = ConfigRecord(
        {
            "c-private": private_key_to_bytes(c_private),
            "s-private": private_key_to_bytes(s_private),
        }
    )
    return _reply(
        msg,
        {"c-public": public_key_to_bytes(c_public), "s-public": public_key_to_bytes(s_public)},
    )


def share_mask_key(msg: Message, context: Context) -> Message:
    """Setup, second stage: note every site's public keys and split this site's mask key into
    Shamir shares (``threshold`` of them rebuild it), one per site, each encrypted for it;
    reply with the ciphertexts by destination node id."""
    config = msg.content[SECAGG]
    me = int(msg.metadata.dst_node_id)
    nodes = [int(n) for n in config["nodes"]]
    if me not in nodes:
        raise ValueError(f"secure aggregation: node {me} is not among the keyed sites")
    state = _state(context)
    state["nodes"] = nodes
    state["c-public"] = list(config["c-public"])
    state["s-public"] = list(config["s-public"])
    state["revealed"] = []
    shares = create_shares(state["s-private"], int(config["threshold"]), len(nodes))
    ciphertexts = [_encrypt_for(context, me, dst, s) for dst, s in zip(nodes, shares, strict=True)]
    return _reply(msg, {"dsts": nodes, "cts": ciphertexts})


def settings_of(config: ConfigRecord) -> SecAggSettings:
    """The arithmetic settings the coordinator sent in a ``secagg`` ConfigRecord."""
    return SecAggSettings(
        clipping_range=float(config["clipping-range"]),
        quantization_range=int(config["quantization-range"]),
        modulus=int(config["modulus"]),
        max_weight=float(config["max-weight"]),
    )


def mask_reply(msg: Message, reply: Message, context: Context) -> Message:
    """Replace the model in ``reply`` (this site's training reply to ``msg``) by its masked,
    quantised update, and add its encrypted shares of this round's self-mask seed.

    The update is the floating arrays of the reply minus those of the global model received, in
    the global model's order, flattened, packed with the site's weight (``num-examples``, which
    leaves the metrics) and quantised (:func:`fl_imaging.secure_sum.pack`); integer arrays
    (batch-norm counters) are not sent. Raises ValueError for a reply unlike the global model,
    a value outside the clipping range, or a participant whose mask key was revealed."""
    config = msg.content.config_records[SECAGG]
    settings = settings_of(config)
    me, rnd = int(msg.metadata.dst_node_id), int(config["round"])
    participants = [int(n) for n in config["participants"]]
    state = _state(context)
    burnt = set(state["revealed"]) & set(participants)
    if burnt:
        raise ValueError(f"secure aggregation: nodes {sorted(burnt)} need new keys first")
    sent = msg.content["arrays"]
    local = reply.content["arrays"]
    if list(local) != list(sent):
        raise ValueError("secure aggregation: the trained model's arrays differ from the global")
    keys = [k for k in sent if np.issubdtype(sent[k].numpy().dtype, np.floating)]
    update = np.concatenate(
        [(local[k].numpy().astype(np.float64) - sent[k].numpy()).ravel() for k in keys]
    )
    metrics = dict(reply.content["metrics"])
    weight = float(metrics.pop(NUM_EXAMPLES))
    masked = pack(weight, update, settings)
    seed = secrets.token_bytes(32)
    masked += keystream_mask(seed, masked.size, settings.modulus)
    s_private = bytes_to_private_key(state["s-private"])
    publics = dict(zip(state["nodes"], state["s-public"], strict=True))
    for other in participants:
        if other != me:
            shared = generate_shared_key(s_private, bytes_to_public_key(publics[other]))
            mask = keystream_mask(pair_seed(shared, rnd), masked.size, settings.modulus)
            masked += pairwise_sign(me, other) * mask
    masked %= settings.modulus
    shares = create_shares(seed, int(config["threshold"]), len(participants))
    content = RecordDict(
        {
            **{k: v for k, v in reply.content.config_records.items()},
            "metrics": MetricRecord(metrics),
            MASKED: ArrayRecord({MASKED: Array(masked.astype(np.uint32))}),
            SHARES: ConfigRecord(
                {
                    "dsts": participants,
                    "cts": [
                        _encrypt_for(context, me, dst, share)
                        for dst, share in zip(participants, shares, strict=True)
                    ],
                }
            ),
        }
    )
    return Message(content, reply_to=msg)


def reveal_shares(msg: Message, context: Context) -> Message:
    """Unmasking: decrypt the shares sent to this site by the round's survivors (of their
    self-mask seeds) and by its dropouts (of their mask keys, from the setup) and reply with
    them. Refuses a request that names a site both survivor and dropout."""
    config = msg.content[SECAGG]
    me = int(msg.metadata.dst_node_id)
    survivors = {int(n) for n in config["survivors"]}
    dropped = {int(n) for n in config["dropped"]}
    if survivors & dropped:
        raise ValueError(
            f"secure aggregation: nodes {sorted(survivors & dropped)} are named both survivor "
            "and dropout: revealing both shares would unmask them; refused"
        )
    b_srcs = [int(n) for n in config["b-srcs"]]
    if not set(b_srcs) <= survivors:
        raise ValueError("secure aggregation: a self-mask share was asked of a dropout")
    sk_srcs = [int(n) for n in config["sk-srcs"]]
    if not set(sk_srcs) <= dropped:
        raise ValueError("secure aggregation: a mask-key share was asked of a survivor")
    state = _state(context)
    state["revealed"] = sorted(set(state["revealed"]) | set(sk_srcs))
    return _reply(
        msg,
        {
            "b-srcs": b_srcs,
            "b-shares": [
                _decrypt_from(context, src, me, ct)
                for src, ct in zip(b_srcs, config["b-cts"], strict=True)
            ],
            "sk-srcs": sk_srcs,
            "sk-shares": [
                _decrypt_from(context, src, me, ct)
                for src, ct in zip(sk_srcs, config["sk-cts"], strict=True)
            ],
        },
    )


#: The ClientApp's query handlers of the stages, by action (``query.<action>`` messages).
SECAGG_STAGES = {
    KEYS_ACTION: advertise_keys,
    SHARES_ACTION: share_mask_key,
    UNMASK_ACTION: reveal_shares,
}
