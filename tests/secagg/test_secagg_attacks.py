"""A coordinator that deviates from secure aggregation, against the sites' real handlers
(:mod:`fl_imaging.secagg.site`) and, for a site that drops out, whole runs with the real sites
in-process (:mod:`local_runs`). Each
attack fails: the site refuses, or what the coordinator rebuilds of one site is uncorrelated
with that site's true update (|r| < 0.05 over more than 10k values), while the same rebuild
with the true secret (a positive control) gives the update back."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from flower_fakes import Arrays, record
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key
from local_runs import sites_in_process
from secagg_fakes import SecureSites

from fl_imaging.config import RunConfig, SecAggConfig, StrategyConfig
from fl_imaging.config.compose import check_overrides
from fl_imaging.review.audit import record_hash, verify_run
from fl_imaging.review.results import read_metrics
from fl_imaging.review.site_record_check import check_site_record
from fl_imaging.run import run
from fl_imaging.secagg.arithmetic import (
    MASKED,
    SECAGG,
    SecAggSettings,
    key_from_scalar,
    keystream_mask,
    pair_seed,
    pairwise_sign,
)
from fl_imaging.secagg.coordinator import SecureAggregation
from fl_imaging.secagg.site import ROUND_STATE, SecAggRefused, keys_bundle_bytes
from strategies import build_strategy

pytestmark = pytest.mark.usefixtures("task_identity")

SETTINGS = SecAggSettings()
GLOBAL = {"w": np.zeros((100, 110), np.float32)}  # 11,000 values


def step(site: int, rnd: int, sent: Arrays) -> Arrays:
    rng = np.random.default_rng([site, rnd])
    return {k: (0.02 * rng.normal(size=v.shape)).astype(v.dtype) for k, v in sent.items()}


class WatchedSites(SecureSites):
    """:class:`SecureSites` that keeps every message the coordinator sent and every reply it
    got: all that a coordinator holds."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.seen: list[tuple[Message, Message]] = []

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        messages = list(messages)
        replies = list(super().send_and_receive(messages, timeout=timeout))
        sent = {m.metadata.message_id: m for m in messages}  # replies come as sites finish
        self.seen += [(sent[r.metadata.reply_to_message_id], r) for r in replies]
        return replies

    def stage(self, action: str, rnd: int) -> list[tuple[Message, Message]]:
        return [
            (m, r)
            for m, r in self.seen
            if m.metadata.message_type == f"query.{action}"
            and int(m.content[SECAGG]["round"]) == rnd
            and not r.has_error()
        ]


def secure_fedavg(sites: int, **secagg: object) -> SecureAggregation:
    strategy = build_strategy(
        StrategyConfig(name="fedavg", secagg=SecAggConfig(enabled=True, **secagg)),
        num_sites=sites,
    )
    assert isinstance(strategy, SecureAggregation) or hasattr(strategy, "inner")
    return strategy  # type: ignore[return-value]


def one_round(strategy, grid, rnd):  # type: ignore[no-untyped-def]
    messages = strategy.configure_train(rnd, record(GLOBAL), ConfigRecord(), grid)
    return strategy.aggregate_train(rnd, grid.send_and_receive(messages))


def shares_of(replies: list[Message], kind: str, node: int) -> list[bytes]:
    """Every share of ``node``'s seed (``kind="seed"``) or mask key (``"key"``) revealed."""
    found = []
    for reply in replies:
        answer = reply.content[SECAGG]
        for src, share in zip(answer[f"{kind}-srcs"], answer[f"{kind}-shares"], strict=True):
            if int(src) == node:
                found.append(bytes(share))
    return found


def unmasked(
    masked: np.ndarray,
    node: int,
    rnd: int,
    seed: bytes,
    mask_key: ec.EllipticCurvePrivateKey,
    publics: dict[int, bytes],
) -> np.ndarray:
    """``node``'s masked vector of round ``rnd`` less its self-mask (from ``seed``) and its
    pairwise masks as ``mask_key`` gives them: its quantised update when both are its own."""
    size, modulus = masked.size, SETTINGS.modulus
    total = masked.astype(np.int64) - keystream_mask(seed, size, modulus)
    for other, public in publics.items():
        if other != node:
            shared = generate_shared_key(mask_key, bytes_to_public_key(public))
            total -= pairwise_sign(node, other) * keystream_mask(
                pair_seed(shared, rnd), size, modulus
            )
    return (total % modulus).astype(np.float64)


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1])


def round_publics(grid: WatchedSites, rnd: int) -> dict[int, bytes]:
    request = grid.stage("secagg_shares", rnd)[0][0].content[SECAGG]
    return {int(n): bytes(k) for n, k in zip(request["nodes"], request["s-publics"], strict=True)}


def test_a_dropped_sites_earlier_round_cannot_be_rebuilt_from_its_later_mask_key() -> None:
    grid = WatchedSites(3, step, {1: 10, 2: 20, 3: 30})
    strategy = secure_fedavg(3)
    assert one_round(strategy, grid, 1)[0] is not None  # all three survive round 1
    true_key = bytes_to_private_key(grid.contexts[3].state[ROUND_STATE]["s-private"])
    grid.fail = {"train": {3}}  # site 3 drops out of round 2 after sharing its keys
    assert one_round(strategy, grid, 2)[0] is not None
    node3 = grid.node_of[3]
    unmasks = {rnd: [r for _, r in grid.stage("secagg_unmask", rnd)] for rnd in (1, 2)}
    seed = combine_shares(shares_of(unmasks[1], "seed", node3))
    round2_key = key_from_scalar(combine_shares(shares_of(unmasks[2], "key", node3)))
    update = grid.updates[1][3]["w"].ravel().astype(np.float64)
    masked = grid.held[1][3]
    publics = round_publics(grid, 1)
    control = unmasked(masked, node3, 1, seed, true_key, publics)
    assert correlation(control[1:], update) > 0.999  # the rebuild works with the true key
    attack = unmasked(masked, node3, 1, seed, round2_key, publics)
    assert abs(correlation(attack[1:], update)) < 0.05  # round 2's key opens nothing of round 1
    assert update.size > 10_000


def test_asking_the_same_sites_twice_in_a_round_is_refused() -> None:
    grid = WatchedSites(3, step, {1: 10, 2: 20, 3: 30})
    one_round(secure_fedavg(3), grid, 1)  # each site revealed its shares of the three seeds
    node = grid.node_of
    request = {"round": 1, "survivors": [node[1], node[2]], "dropped": [node[3]]}
    second = Message(
        RecordDict({SECAGG: ConfigRecord(request)}),
        dst_node_id=node[1],
        message_type="query.secagg_unmask",
    )
    with pytest.raises(
        SecAggRefused, match=rf"already revealed the other secret of nodes \[{node[3]}\]"
    ):
        grid.site_answer(second)


def test_telling_two_sites_different_dropouts_rebuilds_neither_secret_of_a_site() -> None:
    """Sites 1 and 3 are told all three survived (site 3's seed is rebuilt from their two
    shares), site 2 that site 3 dropped: one share of site 3's mask key, below the threshold of
    2; the vector rebuilt with it is noise."""
    grid = WatchedSites(3, step, {1: 10, 2: 20, 3: 30})
    strategy = secure_fedavg(3)
    messages = list(strategy.configure_train(1, record(GLOBAL), ConfigRecord(), grid))
    replies = list(grid.send_and_receive(messages))
    assert all(not r.has_error() for r in replies)
    stories = {1: ([1, 2, 3], []), 2: ([1, 2], [3]), 3: ([1, 2, 3], [])}
    node = grid.node_of
    answers = {}
    for site, (survivors, dropped) in stories.items():
        request = {
            "round": 1,
            "survivors": [node[s] for s in survivors],
            "dropped": [node[s] for s in dropped],
        }
        msg = Message(
            RecordDict({SECAGG: ConfigRecord(request)}),
            dst_node_id=node[site],
            message_type="query.secagg_unmask",
        )
        answers[site] = grid.site_answer(msg)
    pairs = list(answers.values())
    seed = combine_shares(shares_of(pairs, "seed", node[3]))
    key_shares = shares_of(pairs, "key", node[3])
    assert len(key_shares) == 1  # the threshold is 2
    update = grid.updates[1][3]["w"].ravel().astype(np.float64)
    try:
        guessed = key_from_scalar(combine_shares(key_shares))
    except ValueError:  # not even a valid scalar: nothing rebuilt
        return
    attack = unmasked(grid.held[1][3], node[3], 1, seed, guessed, round_publics(grid, 1))
    assert abs(correlation(attack[1:], update)) < 0.05


def _shares_request(grid: WatchedSites, rnd: int, keys: dict[int, dict], threshold: int):  # type: ignore[no-untyped-def]
    """The shares stage of round ``rnd`` for site 1, with the keys of ``keys`` (by site number)
    and ``threshold``."""
    nodes = [grid.node_of[site] for site in sorted(keys)]
    keys = {grid.node_of[site]: bundle for site, bundle in keys.items()}
    values = {
        "round": rnd,
        "nodes": nodes,
        "sites": [keys[n]["site"] for n in nodes],
        "c-publics": [keys[n]["c-public"] for n in nodes],
        "s-publics": [keys[n]["s-public"] for n in nodes],
        "signatures": [keys[n]["signature"] for n in nodes],
        "threshold": threshold,
    }
    return Message(
        RecordDict({SECAGG: ConfigRecord(values)}),
        dst_node_id=grid.node_of[1],
        message_type="query.secagg_shares",
    )


def _keys(grid: WatchedSites, rnd: int) -> dict[int, dict]:
    """Every site's answer to round ``rnd``'s keys stage, by site number."""
    keys = {}
    for site, node in grid.node_of.items():
        msg = Message(
            RecordDict({SECAGG: ConfigRecord({"round": rnd})}),
            dst_node_id=node,
            message_type="query.secagg_keys",
        )
        keys[site] = {k: v for k, v in grid.site_answer(msg).content[SECAGG].items()}
    return keys


@pytest.mark.parametrize("signed_by", ["site-2", "coordinator"])
def test_a_substituted_public_key_is_refused(signed_by: str) -> None:
    grid = WatchedSites(3, step, {1: 10, 2: 20, 3: 30})
    keys = _keys(grid, 1)
    own = ec.generate_private_key(ec.SECP384R1())  # the coordinator's key, in site-2's name
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes, sign_message

    keys[2]["c-public"] = public_key_to_bytes(own.public_key())
    if signed_by == "coordinator":
        bundle = keys_bundle_bytes(
            1, 1, grid.node_of[2], "site-2", keys[2]["c-public"], keys[2]["s-public"]
        )
        keys[2]["signature"] = sign_message(own, bundle)
    with pytest.raises(SecAggRefused, match="not signed by site-2's key in this site's roster"):
        grid.site_answer(_shares_request(grid, 1, keys, 2))


def test_a_site_outside_the_roster_and_a_threshold_of_half_are_refused() -> None:
    grid = WatchedSites(4, step, dict.fromkeys(range(1, 5), 10))
    keys = _keys(grid, 1)
    with pytest.raises(SecAggRefused, match="threshold 2 of 4 sites: it must be more than half"):
        grid.site_answer(_shares_request(grid, 1, keys, 2))
    keys[3]["site"] = "site-9"
    with pytest.raises(SecAggRefused, match="site site-9 is not in this site's roster"):
        grid.site_answer(_shares_request(grid, 1, keys, 3))


def test_an_old_rounds_requests_replayed_are_refused() -> None:
    grid = WatchedSites(3, step, {1: 10, 2: 20, 3: 30})
    strategy = secure_fedavg(3)
    one_round(strategy, grid, 1)
    one_round(strategy, grid, 2)
    for action, words in (
        ("secagg_keys", "has begun round 2"),
        ("secagg_shares", "has begun round 2"),
        ("secagg_unmask", "a finished round is never unmasked again"),
    ):
        old = (
            next(m for m, _ in grid.stage(action, 1) if m.metadata.dst_node_id == grid.node_of[1])
            if (action != "secagg_keys")
            else Message(
                RecordDict({SECAGG: ConfigRecord({"round": 1})}),
                dst_node_id=grid.node_of[1],
                message_type="query.secagg_keys",
            )
        )
        with pytest.raises(SecAggRefused, match=words):
            grid.site_answer(old)
    train = next(
        m
        for m, _ in grid.seen
        if m.metadata.message_type == "train"
        and m.metadata.dst_node_id == grid.node_of[1]
        and int(m.content[SECAGG]["round"]) == 2
    )
    with pytest.raises(SecAggRefused, match="masked its update of round 2 already"):
        grid.site_answer(train)  # a second training message of the round: masking twice


def test_a_sites_minimum_number_of_sites_is_kept() -> None:
    grid = WatchedSites(3, step, {1: 10, 2: 20, 3: 30}, min_sites=3)
    grid.fail = {"secagg_keys": {3}}  # the round would mask among two sites only
    strategy = secure_fedavg(3)
    with pytest.raises(Exception, match="policy secure_aggregation.min_sites=3: the round has 2"):
        one_round(strategy, grid, 1)
    grid = WatchedSites(3, step, {1: 10, 2: 20, 3: 30}, min_sites=3)
    strategy = secure_fedavg(3)
    messages = list(strategy.configure_train(1, record(GLOBAL), ConfigRecord(), grid))
    grid.send_and_receive(messages)
    node = grid.node_of
    request = {"round": 1, "survivors": [node[1], node[2]], "dropped": [node[3]]}
    msg = Message(
        RecordDict({SECAGG: ConfigRecord(request)}),
        dst_node_id=node[1],
        message_type="query.secagg_unmask",
    )
    with pytest.raises(SecAggRefused, match="the sum would hold only 2 site"):
        grid.site_answer(msg)


def _config(overrides: list[str], run_dir: Path) -> RunConfig:
    cfg = check_overrides(overrides)
    cfg.run_dir = str(run_dir)
    return cfg


def _flat(arrays: object, keys: list[str]) -> np.ndarray:
    return np.concatenate([arrays[k].numpy().astype(np.float64).ravel() for k in keys])  # type: ignore[index]


def test_in_a_whole_run_a_dropout_leaves_its_earlier_round_unreadable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """3 sites, site-3 drops out of round 2: the round aggregates from the other two, and what
    the coordinator holds after round 2 (site-3's round-2 mask key, its round-1 seed) rebuilds
    nothing of site-3's round-1 update, taken from a plain run with the same seeds. Control: the
    plain run's round-1 mean update is the secure run's."""
    held: dict[str, list] = {"asked": [], "masked": [], "means": []}
    ask, aggregate = SecureAggregation._ask, SecureAggregation.aggregate_train

    def watched_ask(self, action, rnd, contents):  # type: ignore[no-untyped-def]
        answers = ask(self, action, rnd, contents)
        held["asked"].append((action, rnd, dict(contents), dict(answers)))
        return answers

    def watched_aggregate(self, rnd, replies):  # type: ignore[no-untyped-def]
        replies = list(replies)
        keys = [k for k in self.sent_arrays if self.sent_arrays[k].dtype.kind == "f"]
        start = np.concatenate([self.sent_arrays[k].astype(np.float64).ravel() for k in keys])
        for msg in replies:
            if not msg.has_error():
                node = int(msg.metadata.src_node_id)
                vector = msg.content[MASKED][MASKED].numpy().copy()
                held["masked"].append((rnd, node, self.sites.of_node(node), vector, start))
        arrays, metrics = aggregate(self, rnd, replies)
        if arrays is not None:
            held["means"].append((rnd, _flat(arrays, keys) - start))
        return arrays, metrics

    plain_models: dict[str, np.ndarray] = {}
    fedavg_aggregate = FedAvg.aggregate_train

    def plain_aggregate(self, rnd, replies):  # type: ignore[no-untyped-def]
        replies = list(replies)
        for msg in replies:
            if rnd == 1 and not msg.has_error() and "arrays" in msg.content:
                arrays = msg.content["arrays"]
                keys = [k for k in arrays if arrays[k].numpy().dtype.kind == "f"]
                plain_models[str(msg.content["site"]["name"])] = _flat(arrays, keys)
        return fedavg_aggregate(self, rnd, replies)

    base = [
        "experiment=quick",
        "data.num_sites=3",
        "task.model.channels=[4,8,24]",  # 15k values: the test asks for 10k or more
        f"data.root={tmp_path / 'demo'}",
        "attack=dropout",
        "attack.sites=[2]",
        "attack.rounds=[2]",
    ]
    monkeypatch.setattr(FedAvg, "aggregate_train", plain_aggregate)
    with sites_in_process():  # the real sites, in this process (local_runs.py)
        run(_config(base, tmp_path / "plain"))
    monkeypatch.setattr(FedAvg, "aggregate_train", fedavg_aggregate)
    monkeypatch.setattr(SecureAggregation, "_ask", watched_ask)
    monkeypatch.setattr(SecureAggregation, "aggregate_train", watched_aggregate)
    with sites_in_process():
        run(_config([*base, "strategy.secagg.enabled=true"], tmp_path / "secure"))
    rows = read_metrics(tmp_path / "secure" / "metrics.csv")
    summed = {r.round: r.value for r in rows if r.metric == "secagg_sites" and r.site == "all"}
    assert summed == {1: 3.0, 2: 2.0}  # round 2 aggregated from the two survivors
    masked = {(rnd, name): (node, v, start) for rnd, node, name, v, start in held["masked"]}
    node3, vector, start = masked[(1, "site-3")]
    unmasks = {rnd: ans for action, rnd, _, ans in held["asked"] if action == "secagg_unmask"}
    requests = {rnd: c for action, rnd, c, _ in held["asked"] if action == "secagg_shares"}

    def revealed(rnd: int, kind: str) -> list[bytes]:
        return [
            bytes(share)
            for answer in unmasks[rnd].values()
            for src, share in zip(answer[f"{kind}-srcs"], answer[f"{kind}-shares"], strict=True)
            if int(src) == node3
        ]

    seed = combine_shares(revealed(1, "seed"))
    key2 = key_from_scalar(combine_shares(revealed(2, "key")))  # what the dropout gave away
    request = next(iter(requests[1].values()))
    publics = {
        int(n): bytes(k) for n, k in zip(request["nodes"], request["s-publics"], strict=True)
    }
    attack = unmasked(vector, node3, 1, seed, key2, publics)
    updates = {name: model - start for name, model in plain_models.items()}
    assert len(updates) == 3 and updates["site-3"].size > 10_000
    plain_mean = sum(updates.values()) / 3  # the sites have 4 training cases each
    secure_mean = dict(held["means"])[1]
    assert correlation(plain_mean, secure_mean) > 0.99  # control: the same training
    assert abs(correlation(attack[1:], updates["site-3"])) < 0.05
    summary = (tmp_path / "secure" / "summary.txt").read_text()
    assert "site-3" in summary
    # each site's own record agrees with the coordinator's log; a log rewritten whole (its
    # chain recomputed) with one of site-1's replies changed does not
    records = sorted((tmp_path / "site-state").glob("site-*/site-record.jsonl"))
    by_site = {p.parent.name.rsplit("-", 1)[0]: p for p in records if p.stat().st_size}
    for own in by_site.values():
        assert check_site_record(tmp_path / "secure", own).ok
    forged = tmp_path / "forged"
    shutil.copytree(tmp_path / "secure", forged)
    _rewrite_chain(forged / "audit.jsonl", "site-1")
    assert verify_run(forged, check_resumed=False).ok  # the chain alone cannot tell
    problems = check_site_record(forged, by_site["site-1"]).problems
    assert any("that the site never sent" in p for p in problems), problems
    assert any("the coordinator's log leaves out" in p for p in problems), problems


def _rewrite_chain(path: Path, site: str) -> None:
    """Change the digest of ``site``'s first training reply in the log; recompute every hash."""
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    changed = False
    prev = entries[0]["prev"]
    for entry in entries:
        for reply in entry.get("replies", []):
            if reply["site"] == site and reply["type"] == "train" and not changed:
                reply["sha256"] = "0" * 64
                changed = True
        entry["prev"] = prev
        entry["hash"] = prev = record_hash(entry)
    assert changed
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))
