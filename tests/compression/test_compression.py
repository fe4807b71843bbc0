"""Update compression (``strategy.compression``): the codec (fl_imaging/compression/codec.py) and
its
error bounds, error feedback at the site (fl_imaging/compression/site.py), decoding before
any strategy (strategies/decoding.py in the chain), the refusals, the client-side DP bound, the
benchmark's bytes-up column, and real simulation runs whose metrics.csv shows the compressed
bytes (slow: with FedBN and through a resume).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_runs import run_cli
from flower_fakes import Arrays, FakeGrid, FakeTrainer, numpy_of, record
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping
from local_runs import local_run

from fl_imaging.benchmark.report import SiteResult, summarise
from fl_imaging.compression.codec import (
    COMPRESSED,
    COMPRESSION,
    Codec,
    compress,
    decode,
    decompress_arrays,
    encode,
    floating_sizes,
    topk_count,
)
from fl_imaging.compression.site import compress_reply, residual_of
from fl_imaging.config import CompressionMode, ConfigError, StrategyConfig
from fl_imaging.config.compose import check_overrides
from fl_imaging.flower.protocol import site_reply
from fl_imaging.flower.site import client_app
from fl_imaging.review.results import read_metrics
from fl_imaging.training.site_training import SiteTrainers
from strategies import UpdateCheck, ValidatingStrategy, build_strategy
from strategies.decoding import DecodingStrategy
from tasks import build_task

pytestmark = pytest.mark.usefixtures("task_identity")

FP16 = Codec(CompressionMode.fp16)
INT8 = Codec(CompressionMode.int8)
TOPK = Codec(CompressionMode.topk, 0.1)
#: Tensor sizes with an empty tensor, a scalar and one above 65536 entries (uint32 positions).
SIZES = [216, 8, 1, 13824, 0, 5, 70_000]


def segments(sizes: list[int]) -> list[slice]:
    ends = np.cumsum([0, *sizes])
    return [slice(int(a), int(b)) for a, b in zip(ends[:-1], ends[1:], strict=True)]


def an_update(seed: int, sizes: list[int] = SIZES) -> np.ndarray:
    """A flat update whose entries span magnitudes 1e-7 to 10, as trained updates do."""
    rng = np.random.default_rng(seed)
    total = sum(sizes)
    return rng.normal(size=total) * 10.0 ** rng.uniform(-7, 1, size=total)


# --- the codec: round trips and error bounds ------------------------------------------------


def test_fp16_round_trip_is_within_half_precision() -> None:
    update = an_update(0)
    payload = encode(update, SIZES, FP16)
    assert list(payload) == ["values"] and payload["values"].dtype == np.float16
    assert payload["values"].shape == (sum(SIZES),)
    decoded = decode(payload, SIZES, FP16)
    error = np.abs(decoded - update)
    # relative 2**-11 in fp16's normal range, absolute 2**-25 (half its subnormal step) below it
    assert np.all(error <= np.maximum(2.0**-11 * np.abs(update), 2.0**-25))
    normal = np.abs(update) >= 2.0**-14
    relative = error[normal] / np.abs(update[normal])
    assert 1e-4 < relative.max() <= 2.0**-11  # lossy, and by no more than half precision


def test_int8_round_trip_errs_by_at_most_half_a_step_of_its_tensor() -> None:
    update = an_update(1)
    payload = encode(update, SIZES, INT8)
    values, scales = payload["values"], payload["scales"]
    assert values.dtype == np.int8 and values.shape == (sum(SIZES),)
    assert scales.dtype == np.float32 and scales.shape == (len(SIZES),)
    assert values.min() >= -127
    decoded = decode(payload, SIZES, INT8)
    for t, part in enumerate(segments(SIZES)):
        if part.stop == part.start:
            assert scales[t] == 0.0
            continue
        peak = np.abs(update[part]).max()
        assert scales[t] == np.float32(peak / 127)
        assert np.abs(values[part]).max() == 127  # the largest entry uses the whole range
        error = np.abs(decoded[part] - update[part])
        assert error.max() <= float(scales[t]) / 2 * (1 + 1e-6)
        if part.stop - part.start > 100:
            assert error.max() > float(scales[t]) / 4  # it does round


@pytest.mark.parametrize("fraction", [0.1, 0.5, 1.0])
def test_topk_keeps_the_largest_entries_of_each_tensor_exactly(fraction: float) -> None:
    codec = Codec(CompressionMode.topk, fraction)
    update = an_update(2)
    payload = encode(update, SIZES, codec)
    counts = [topk_count(n, fraction) for n in SIZES]
    if fraction == 0.1:
        assert counts == [22, 1, 1, 1382, 0, 1, 7000]  # at least one entry of a non-empty tensor
    if fraction == 1.0:
        assert counts == SIZES
    assert payload["indices"].dtype == np.uint32  # one tensor has more than 65536 entries
    assert payload["values"].dtype == np.float32 and payload["values"].size == sum(counts)
    decoded = decode(payload, SIZES, codec)
    for part, count in zip(segments(SIZES), counts, strict=True):
        got, wanted = decoded[part], update[part]
        kept = np.flatnonzero(got)
        assert kept.size == count
        assert np.array_equal(got[kept], wanted[kept].astype(np.float32))  # exact as sent
        dropped = np.setdiff1d(np.arange(wanted.size), kept)
        if dropped.size:
            assert np.abs(wanted[kept]).min() >= np.abs(wanted[dropped]).max()
    small = [216, 8, 1]
    assert encode(an_update(3, small), small, codec)["indices"].dtype == np.uint16


@pytest.mark.parametrize(
    ("codec", "broken", "words"),
    [
        (FP16, lambda p: {"values": p["values"][:-1]}, "'values' is float16 of shape"),
        (INT8, lambda p: {"values": p["values"]}, "no 'scales' array"),
        (INT8, lambda p: {**p, "values": p["values"].astype(np.float32)}, "'values' is float32"),
        (TOPK, lambda p: {**p, "indices": p["indices"] * 0}, "not ascending positions"),
        (TOPK, lambda p: {**p, "indices": p["indices"] + 70_000}, "inside their tensor"),
    ],
    ids=["short", "no-scales", "float-values", "repeated", "outside"],
)
def test_a_malformed_payload_is_refused_with_what_is_wrong(
    codec: Codec, broken: object, words: str
) -> None:
    payload = encode(an_update(4), SIZES, codec)
    with pytest.raises(ValueError, match=words):
        decode(broken(payload), SIZES, codec)  # type: ignore[operator]


# --- error feedback at the site, through its Flower context ----------------------------------


def train_message(arrays: Arrays, node: int = 1, **config: float) -> Message:
    content = RecordDict(
        {"arrays": record(arrays), "config": ConfigRecord({"server-round": 1, **config})}
    )
    return Message(content, dst_node_id=node, message_type="train")


def site_model(seed: int) -> Arrays:
    rng = np.random.default_rng(seed)
    return {
        "w": rng.normal(size=(30, 40)).astype(np.float32),
        "b": rng.normal(size=10).astype(np.float32),
        "count": np.asarray(seed, np.int64),
    }


def flat(arrays: Arrays, keys: list[str]) -> np.ndarray:
    return np.concatenate([np.asarray(arrays[k], np.float64).ravel() for k in keys])


@pytest.mark.parametrize("codec", [FP16, INT8, TOPK], ids=["fp16", "int8", "topk"])
def test_error_feedback_sends_every_update_eventually(codec: Codec) -> None:
    """Over rounds, what the coordinator decoded plus the residual left at the site equals the
    sum of the site's updates; the residual survives in ``context.state`` between messages."""
    context = Context(1, 1, {}, RecordDict(), {})
    global_arrays = site_model(0)
    keys, sizes = floating_sizes(global_arrays)
    updates, decoded_sum = np.zeros(sum(sizes)), np.zeros(sum(sizes))
    rng = np.random.default_rng(5)
    for rnd in range(1, 6):
        msg = train_message(global_arrays)
        trained = {
            k: (v + rng.normal(scale=0.01, size=v.shape).astype(np.float32) if k != "count" else v)
            for k, v in global_arrays.items()
        }
        trained["count"] = np.asarray(rnd, np.int64)
        reply = site_reply(msg, "site-1", {"num-examples": 4}, record(trained))
        out = compress_reply(msg, reply, context, codec)
        assert "arrays" not in out.content.array_records
        payload = {k: v.numpy() for k, v in out.content[COMPRESSED].items()}
        decoded_sum += decode(payload, sizes, codec)
        updates += flat(trained, keys) - flat(global_arrays, keys)
        weights = decompress_arrays(
            out.content[COMPRESSED], out.content[COMPRESSION], global_arrays, codec
        )
        assert weights["count"] == rnd and weights["count"].dtype == np.int64  # sent as it is
        global_arrays = weights  # the next round starts from what the coordinator rebuilt
    residual = residual_of(context)
    assert residual is not None and residual.dtype == np.float32
    np.testing.assert_allclose(decoded_sum + residual, updates, rtol=0, atol=1e-6)
    lost = np.linalg.norm(residual) / np.linalg.norm(updates)
    assert lost > (0.1 if codec.mode == CompressionMode.topk else 1e-6)


def test_a_residual_of_another_model_is_dropped() -> None:
    update = an_update(6, [50, 50])
    stale = np.ones(7)
    from fl_imaging.compression.codec import compress_arrays

    received = {"a": np.zeros(50, np.float32), "b": np.zeros(50, np.float32)}
    trained = {"a": update[:50].astype(np.float32), "b": update[50:].astype(np.float32)}
    _, residual = compress_arrays(received, trained, INT8, stale)
    fresh = compress(flat(trained, ["a", "b"]), [50, 50], INT8)
    np.testing.assert_allclose(residual, fresh.residual, atol=1e-7)


# --- decoding in the chain, before every strategy ---------------------------------------------


def compressed_round(
    strategy: object, codec: Codec, sites: list[Arrays], global_arrays: Arrays, weights: list[int]
) -> tuple[list[Message], list[Message]]:
    """Send ``global_arrays`` through ``strategy`` and answer each train message as the real
    site does: its reply (``sites[i]``), then compressed. Returns (plain, compressed) replies."""
    grid = FakeGrid(len(sites), lambda n, r, s: s)
    messages = strategy.configure_train(1, record(global_arrays), ConfigRecord(), grid)  # type: ignore[attr-defined]
    plain, packed = [], []
    for msg in sorted(messages, key=lambda m: grid.site_of[m.metadata.dst_node_id]):
        site = grid.site_of[msg.metadata.dst_node_id]
        reply = site_reply(
            msg, f"site-{site}", {"num-examples": weights[site - 1]}, record(sites[site - 1])
        )
        plain.append(reply)
        packed.append(compress_reply(msg, reply, grid.context_of(site), codec))
    return plain, packed


def strategy_of(name: str, mode: str, on_checks: object = None) -> object:
    cfg = StrategyConfig(name=name, compression=CompressionMode(mode))
    return build_strategy(cfg, num_sites=4, on_checks=on_checks)  # type: ignore[arg-type]


def four_sites() -> tuple[Arrays, list[Arrays]]:
    global_arrays = site_model(0)
    rng = np.random.default_rng(9)
    sites = [
        {
            k: v + rng.normal(scale=0.05, size=v.shape).astype(np.float32) if k != "count" else v
            for k, v in global_arrays.items()
        }
        for _ in range(4)
    ]
    return global_arrays, sites


def test_fedavg_of_fp16_updates_equals_fedavg_of_the_originals() -> None:
    global_arrays, sites = four_sites()
    weights = [10, 20, 30, 40]
    compressed = strategy_of("fedavg", "fp16")
    assert isinstance(compressed, DecodingStrategy)
    assert isinstance(compressed.inner, ValidatingStrategy)
    plain_replies, packed = compressed_round(compressed, FP16, sites, global_arrays, weights)
    assert all("arrays" not in m.content.array_records for m in packed)
    got, _ = compressed.aggregate_train(1, packed)
    reference = strategy_of("fedavg", "none")
    compressed_round(reference, FP16, sites, global_arrays, weights)
    expected, _ = reference.aggregate_train(1, plain_replies)  # type: ignore[attr-defined]
    assert got is not None and expected is not None
    got_arrays, expected_arrays = numpy_of(got), numpy_of(expected)
    largest = max(np.abs(s["w"] - global_arrays["w"]).max() for s in sites)
    difference = np.abs(got_arrays["w"] - expected_arrays["w"]).max()
    assert 0 < difference <= 2.0**-11 * largest + 1e-6
    assert got_arrays["count"] == expected_arrays["count"] and got_arrays["count"].dtype == np.int64


@pytest.mark.parametrize("codec", [INT8, TOPK], ids=["int8", "topk"])
def test_the_median_works_on_the_decoded_weights(codec: Codec) -> None:
    global_arrays, sites = four_sites()
    strategy = strategy_of("fedmedian", codec.mode.value)
    _, packed = compressed_round(strategy, codec, sites, global_arrays, [10, 10, 10, 10])
    out, _ = strategy.aggregate_train(1, packed)  # type: ignore[attr-defined]
    assert out is not None
    keys, sizes = floating_sizes(global_arrays)
    decoded = [
        flat(global_arrays, keys)
        + decode(
            {k: v.numpy() for k, v in m.content[COMPRESSED].items()},
            sizes,
            codec,
        )
        for m in packed
    ]
    expected = np.median(np.stack(decoded), axis=0)
    np.testing.assert_allclose(flat(numpy_of(out), keys), expected, rtol=0, atol=1e-6)
    # and it is not the median of the uncompressed models: the codec did change the update
    assert not np.allclose(expected, np.median([flat(s, keys) for s in sites], axis=0), atol=1e-6)


def test_a_reply_that_cannot_be_decoded_is_rejected_naming_its_site() -> None:
    global_arrays, sites = four_sites()
    checks: list[UpdateCheck] = []
    strategy = strategy_of("fedavg", "int8", lambda rnd, c: checks.extend(c))
    _, packed = compressed_round(strategy, INT8, sites, global_arrays, [10, 10, 10, 10])
    broken = packed[2].content[COMPRESSED]
    broken["scales"] = Array(np.zeros(3, np.float32))
    out, _ = strategy.aggregate_train(1, packed)  # type: ignore[attr-defined]
    assert out is not None  # the round goes on with the other three
    rejected = [c for c in checks if c.status == "rejected"]
    assert [c.site for c in rejected] == ["site-3"]
    assert "compressed update refused" in rejected[0].reason
    assert "'scales' is float32 of shape (3,), expected 2 entries" in rejected[0].reason


def test_a_site_compressing_otherwise_than_the_coordinator_is_refused() -> None:
    with pytest.raises(ValueError, match="compressed as topk .* this run decodes int8"):
        decompress_arrays(ArrayRecord(), TOPK.record(), {"w": np.zeros(3, np.float32)}, INT8)


# --- refusals and config ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["fp16", "int8", "topk"])
def test_compression_with_secure_aggregation_is_refused(mode: str) -> None:
    with pytest.raises(ConfigError) as err:
        check_overrides([f"strategy.compression={mode}", "strategy.secagg.enabled=true"])
    text = str(err.value)
    assert f"strategy.compression={mode} with strategy.secagg.enabled=true" in text
    assert "uniformly random" in text and "use strategy.compression=none" in text


def test_config_keys_and_their_checks() -> None:
    cfg = check_overrides(["strategy.compression=topk", "strategy.compression_topk=0.25"])
    assert Codec.of(cfg.strategy) == Codec(CompressionMode.topk, 0.25)
    assert check_overrides([]).strategy.compression == CompressionMode.none
    for fraction in ("0", "1.5"):
        with pytest.raises(ConfigError, match=r"strategy.compression_topk=.*must be in \(0, 1\]"):
            check_overrides([f"strategy.compression_topk={fraction}"])
    with pytest.raises(ConfigError, match="none, fp16, int8, topk"):
        check_overrides(["strategy.compression=int4"])


def test_the_command_exits_2_on_compression_with_secure_aggregation(tmp_path: Path) -> None:
    proc = run_cli(
        "fl-imaging",
        "experiment=quick",
        "strategy.compression=topk",
        "strategy.secagg.enabled=true",
        cwd=tmp_path,
        expect=2,
    )
    assert "strategy.compression=topk with strategy.secagg.enabled=true" in proc.stderr
    assert not (tmp_path / "demo-data").exists()  # refused before anything was generated


# --- client-side DP: the decoded update stays within the clipping norm ------------------------


@pytest.mark.parametrize("codec", [FP16, INT8, TOPK], ids=["fp16", "int8", "topk"])
def test_the_decoded_update_never_exceeds_the_bound(codec: Codec) -> None:
    sizes = [216, 8, 13824]
    unbounded_over = 0
    for seed in range(20):
        update = an_update(seed, sizes)
        bound = float(np.linalg.norm(update))  # an update already clipped to the bound
        if codec.mode != CompressionMode.topk:  # top-k only removes entries: never longer
            plain = compress(update, sizes, codec)
            unbounded_over += np.linalg.norm(plain.sent) > bound
        residual = an_update(seed + 100, sizes)  # what earlier rounds did not send
        result = compress(update, sizes, codec, residual, bound)
        assert np.linalg.norm(result.sent) <= bound
        assert np.linalg.norm(result.sent) >= 0.99 * bound  # shrunk to the bound, not to 0
        np.testing.assert_allclose(result.sent + result.residual, update + residual, atol=1e-9)
    if codec.mode != CompressionMode.topk:
        assert unbounded_over > 0  # without the bound, rounding does push some updates over


@pytest.mark.parametrize("mode", ["fp16", "int8", "topk"])
def test_client_side_clipping_bounds_the_decoded_update_every_round(mode: str) -> None:
    """A site with client-side DP clipping (Flower's mod) and error feedback: what the
    coordinator decodes and aggregates stays within the clipping norm, round after round."""
    clip = 0.5
    cfg = check_overrides(
        [
            "strategy=dpfedavg",
            "strategy.dp.mode=client_fixed",
            f"strategy.dp.clipping_norm={clip}",
            f"strategy.compression={mode}",
        ]
    )
    cfg.data.sites = ["/nowhere/site-1"]
    strategy = build_strategy(cfg.strategy, num_sites=1)
    assert isinstance(strategy, DecodingStrategy)
    assert isinstance(strategy.inner.inner, DifferentialPrivacyClientSideFixedClipping)  # type: ignore[attr-defined]
    # an update of norm about 4.5, clipped to 0.5 by the mod
    trainer = FakeTrainer(0.1, jitter=True)
    app = client_app.build_client_app(cfg, SiteTrainers(build=lambda c, s, t: trainer))
    context = Context(1, 1, {"partition-id": 0}, RecordDict(), {})
    global_arrays = {"w": np.zeros((40, 50), np.float32), "b": np.ones(10, np.float32)}
    norms = []
    for rnd in range(1, 5):
        grid = FakeGrid(1, lambda n, r, s: s)
        (msg,) = strategy.configure_train(rnd, record(global_arrays), ConfigRecord(), grid)
        out = app(msg, context)
        assert not out.has_error(), out.error.reason if out.has_error() else ""
        decoded = numpy_of(strategy.decoded(out).content["arrays"])
        update = flat(decoded, ["w", "b"]) - flat(global_arrays, ["w", "b"])
        norms.append(float(np.linalg.norm(update)))
        global_arrays = decoded
    residual = residual_of(context)
    assert residual is not None and np.linalg.norm(residual) > 0
    assert max(norms) <= clip * (1 + 1e-6)  # float32 weights: rounding of one ulp at most
    assert norms[-1] > 0.9 * clip  # with the residual, a round sends nearly the whole budget


# --- the benchmark's bytes-up column -----------------------------------------------------------


def test_the_benchmark_summary_shows_bytes_up_per_site() -> None:
    def result(method: str, site: str, up: float) -> SiteResult:
        return SiteResult(
            "iid", method, "federated", 0, site, "d", "iid", 2, {"dice": 0.5}, mb_up=up, mb_down=2
        )

    rows = [result("fedavg", "a", 1.0), result("fedavg", "b", 1.0), result("int8", "a", 0.25)]
    fedavg, int8 = summarise(rows, ["dice"])
    assert fedavg.figures["mb_up_per_site"] == (1.0, 0.0)
    assert int8.figures["mb_up_per_site"] == (0.25, 0.0)
    assert int8.figures["mb_per_site"] == (2.25, 0.0)


# --- whole runs (the real sites in-process: local_runs.py) ------------------------------------


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One demo data folder for the module's runs (written by the first run)."""
    return tmp_path_factory.mktemp("compression-demo") / "demo"


def fl_imaging(folder: Path, demo: Path, *overrides: str) -> list:
    """Run ``experiment=quick`` with ``overrides`` into ``folder``, the real sites in-process
    (:func:`local_runs.local_run`); its metric rows."""
    local_run(folder, "experiment=quick", *overrides, f"data.root={demo}")
    return read_metrics(folder / "metrics.csv")


def expected_bytes(overrides: list[str], codec: Codec) -> tuple[int, int]:
    """(bytes up of one uncompressed reply, bytes up of one compressed reply) for the model of
    ``experiment=quick`` with ``overrides``, from the layout alone: Flower frames each array
    (NumPy's .npy header), the payload holds one array per kind plus the integer counters."""
    cfg = check_overrides(["experiment=quick", *overrides])
    state = {k: v.numpy() for k, v in build_task(cfg.task).build_model().state_dict().items()}
    _, sizes = floating_sizes(state)
    framed = {k: len(Array(v).data) for k, v in state.items()}
    plain = sum(framed.values())
    counters = sum(n for k, n in framed.items() if state[k].dtype.kind != "f")

    def empty(n: int, dtype: type) -> int:
        return len(Array(np.zeros(n, dtype)).data)

    total = sum(sizes)
    if codec.mode == CompressionMode.fp16:
        return plain, counters + empty(total, np.float16)
    if codec.mode == CompressionMode.int8:
        return plain, counters + empty(total, np.int8) + empty(len(sizes), np.float32)
    kept = sum(max(1, round(codec.topk * n)) for n in sizes)
    return plain, counters + empty(kept, np.uint16) + empty(kept, np.float32)


def bytes_rows(rows: list, metric: str) -> dict[tuple[int, str], float]:
    return {(r.round, r.site): r.value for r in rows if r.metric == metric}


@pytest.mark.parametrize(("mode", "ratio"), [("fp16", (2.0, 2.3)), ("int8", (4.0, 4.3))])
def test_a_real_run_sends_the_compressed_bytes(
    tmp_path: Path, demo_root: Path, mode: str, ratio: tuple[float, float]
) -> None:
    codec = Codec(CompressionMode(mode))
    rows = fl_imaging(tmp_path / "run", demo_root, f"strategy.compression={mode}")
    plain, packed = expected_bytes([], codec)
    up = bytes_rows(rows, "bytes_up")
    assert sorted(up) == [(1, "site-1"), (1, "site-2"), (2, "site-1"), (2, "site-2")]
    assert set(up.values()) == {packed}
    assert ratio[0] <= plain / packed <= ratio[1]
    assert set(bytes_rows(rows, "bytes_down_train").values()) == {plain}  # down: uncompressed
    accepted = bytes_rows(rows, "update_accepted")
    assert len(accepted) == 4 and set(accepted.values()) == {1.0}
    dice = [r.value for r in rows if r.metric == "dice" and r.site != "all"]
    assert dice and all(0 <= d <= 1 for d in dice)


def test_topk_with_fedbn_sends_the_kept_entries_and_the_counters(
    tmp_path: Path, demo_root: Path
) -> None:
    overrides = ["task.model.norm=batch", "strategy.fedbn=true"]
    rows = fl_imaging(tmp_path / "run", demo_root, *overrides, "strategy.compression=topk")
    plain, packed = expected_bytes(overrides, TOPK)
    assert set(bytes_rows(rows, "bytes_up").values()) == {packed}
    assert 6.0 <= plain / packed <= 7.0  # 4 bytes against 0.1 x (2 + 4), plus framing
    accepted = bytes_rows(rows, "update_accepted")
    assert len(accepted) == 4 and set(accepted.values()) == {1.0}
    norms = bytes_rows(rows, "update_norm")
    assert all(math.isfinite(v) and v > 0 for v in norms.values())


def test_a_compressed_run_resumes(tmp_path: Path, demo_root: Path) -> None:
    first = tmp_path / "first"
    fl_imaging(first, demo_root, "strategy.compression=int8", "engine.rounds=2")
    resumed = tmp_path / "resumed"
    rows = fl_imaging(
        resumed, demo_root, "strategy.compression=int8", "engine.rounds=3", f"resume={first}"
    )
    _, packed = expected_bytes([], INT8)
    up = bytes_rows(rows, "bytes_up")
    assert sorted({rnd for rnd, _ in up}) == [1, 2, 3] and set(up.values()) == {packed}
    assert {r.round for r in rows if r.metric == "train_loss"} == {1, 2, 3}
    before = torch.load(first / "model.pt", weights_only=True)
    after = torch.load(resumed / "model.pt", weights_only=True)
    assert not all(torch.equal(before[k], v) for k, v in after.items())  # round 3 trained
