"""Arrays packed into one before a message travels, restored exactly on arrival
(fl_imaging.flower.packed_arrays), at both ends: the coordinator's Grid and the sites' mod."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fl_imaging.flower.packed_arrays import (
    LAYOUT_SUFFIX,
    pack_content,
    packed_arrays_mod,
    unpack_content,
)


def _unet_state() -> dict[str, torch.Tensor]:
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    net = UNet(3, 1, 2, channels=(8, 16, 32), strides=(2, 2), num_res_units=1)
    return net.state_dict()


def _mixed() -> ArrayRecord:
    return ArrayRecord(
        {
            "w": Array.from_numpy_ndarray(np.arange(24, dtype=np.float32).reshape(2, 3, 4)),
            "half": Array.from_numpy_ndarray(np.linspace(0, 1, 5).astype(np.float16)),
            "count": Array.from_numpy_ndarray(np.array(7, dtype=np.int64)),  # 0-d
            "mask": Array.from_numpy_ndarray(np.array([True, False, True])),
            "empty": Array.from_numpy_ndarray(np.zeros((0, 3), dtype=np.float64)),
            "big_endian": Array.from_numpy_ndarray(np.arange(3, dtype=">i4")),
        }
    )


def test_a_model_travels_as_a_few_objects_and_comes_back_bit_for_bit() -> None:
    state = _unet_state()
    content = RecordDict(
        {
            "arrays": ArrayRecord(state),
            "config": ConfigRecord({"server-round": 3}),
            "metrics": MetricRecord({"loss": 0.5}),
        }
    )
    packed = pack_content(content)
    assert len(get_all_nested_objects(content)) > len(state)  # an array and its chunk(s) each
    assert len(get_all_nested_objects(packed)) <= 8
    assert list(packed["arrays"].keys()) == ["packed"]
    restored = unpack_content(packed)
    assert list(restored.keys()) == ["arrays", "config", "metrics"]
    back = restored["arrays"].to_torch_state_dict()
    assert list(back) == list(state)
    for name, tensor in state.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    assert restored["config"]["server-round"] == 3
    assert list(content.keys()) == ["arrays", "config", "metrics"]  # the original is untouched
    assert len(content["arrays"]) == len(state)


def test_every_dtype_and_shape_is_restored_in_order() -> None:
    record = _mixed()
    restored = unpack_content(pack_content(RecordDict({"arrays": record})))["arrays"]
    assert list(restored.keys()) == list(record.keys())
    for name, array in record.items():
        before, after = array.numpy(), restored[name].numpy()
        assert after.dtype == before.dtype and after.shape == before.shape, name
        np.testing.assert_array_equal(after, before)


def test_what_cannot_gain_or_is_not_numpy_is_left_alone() -> None:
    single = RecordDict({"arrays": ArrayRecord([np.ones(4, dtype=np.float32)])})
    assert pack_content(single) is single
    assert unpack_content(single) is single
    foreign = Array(dtype="float32", shape=(2,), stype="custom", data=b"\0" * 8)
    odd = RecordDict({"arrays": ArrayRecord({"a": foreign, "b": foreign})})
    assert pack_content(odd) is odd


def test_several_records_are_packed_each_with_its_own_layout() -> None:
    content = RecordDict({"global": _mixed(), "local": _mixed()})
    packed = pack_content(content)
    assert set(packed.keys()) == {
        "global",
        "local",
        "global" + LAYOUT_SUFFIX,
        "local" + LAYOUT_SUFFIX,
    }
    restored = unpack_content(packed)
    assert list(restored.keys()) == ["global", "local"]


def test_a_cache_packs_a_shared_record_once_and_another_record_apart() -> None:
    shared, other = _mixed(), _mixed()
    cache: dict = {}
    first = pack_content(RecordDict({"arrays": shared}), cache)
    again = pack_content(RecordDict({"arrays": shared, "more": other}), cache)
    assert again["arrays"] is first["arrays"]
    assert again["arrays" + LAYOUT_SUFFIX] is first["arrays" + LAYOUT_SUFFIX]
    assert again["more"] is not first["arrays"]
    restored = unpack_content(again)
    for key in ("arrays", "more"):
        assert list(restored[key].keys()) == list(_mixed().keys())


def test_a_damaged_packed_record_is_refused_not_misread() -> None:
    packed = pack_content(RecordDict({"arrays": _mixed()}))
    data = packed["arrays"]["packed"].numpy()
    short = RecordDict(
        {
            "arrays": ArrayRecord({"packed": Array.from_numpy_ndarray(data[:-4])}),
            "arrays" + LAYOUT_SUFFIX: packed["arrays" + LAYOUT_SUFFIX],
        }
    )
    with pytest.raises(ValueError, match="'arrays'.*needs more"):
        unpack_content(short)


class _Msg:
    """The part of a Flower Message the mod uses."""

    def __init__(self, content: RecordDict | None) -> None:
        self.content = content

    def has_content(self) -> bool:
        return self.content is not None


def test_a_site_unpacks_what_came_packed_and_packs_its_reply_only_then() -> None:
    seen: list[RecordDict] = []

    def app(msg, _context):  # the site's handler: sees plain records, answers with a model
        seen.append(msg.content)
        return _Msg(RecordDict({"arrays": _mixed(), "metrics": MetricRecord({"n": 4})}))

    reply = packed_arrays_mod(_Msg(pack_content(RecordDict({"arrays": _mixed()}))), None, app)
    assert list(seen[-1]["arrays"].keys()) == list(_mixed().keys())
    assert "arrays" + LAYOUT_SUFFIX in reply.content
    reply = packed_arrays_mod(_Msg(RecordDict({"arrays": _mixed()})), None, app)
    assert "arrays" + LAYOUT_SUFFIX not in reply.content  # a coordinator that does not pack
