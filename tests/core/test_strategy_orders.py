import json

import pytest

from vdit_accel import Strategy
from vdit_accel.permutation import parse_order


def test_orders_round_trip_and_defaults(tmp_path):
    layers = [[{"kind": "dense"}, {"kind": "window3d", "t": 1, "h": 1, "w": 1}]] * 2
    orders = [[parse_order("semantic:top_p=0.9,k_clusters=64"), None], [parse_order("segment"), parse_order("tiled")]]
    st = Strategy(layers=layers, order="tiled", orders=orders)
    path = tmp_path / "s.json"
    st.save(path)
    doc = json.loads(path.read_text())
    assert doc["order"] == {"kind": "tiled"}  # automatic parameters are left out of the file
    heads = doc["layers"][0]["heads"]
    assert heads[0]["order"] == {"kind": "semantic", "k_clusters": 64, "top_p": 0.9, "iters": 0, "refresh": 1}
    assert heads[1]["order"] is None  # an explicit raster head under a tiled default
    assert "order" not in doc["layers"][1]["heads"][1]  # the default's own heads do not repeat it
    back = Strategy.load(path)
    assert back.order == st.order and back.orders == orders and back.to_dict() == doc
    assert back.layer_orders(1, 2) == orders[1] and back.uses_orders() and not back.is_dense()
    assert "order=raster/segment/semantic:k_clusters=64,top_p=0.9/tiled" in back.describe()
    uni = Strategy.uniform("window3d:t=1,h=1,w=1", order="tiled")
    assert uni.layer_orders(3, 4) == [parse_order("tiled")] * 4
    assert Strategy.from_dict(uni.to_dict()).order == uni.order
    plain = Strategy.uniform("dense")
    assert not plain.uses_orders() and "order" not in plain.to_dict() and plain.layer_orders(0, 2) == [None, None]
    assert not Strategy.uniform("dense", order="semantic").is_dense()  # its blocks are chosen from the data


@pytest.mark.parametrize("doc, match", [
    ({"order": "spiral"}, "strategy 'order': unknown order kind 'spiral'"),
    ({"order": {"kind": "tiled", "t": 0}}, "'t' must be an int >= 1"),
    ({"layers": [{"heads": [{"pattern": {"kind": "dense"}, "order": {"kind": "semantic", "top_p": 2}}]}]},
     r"layers\[0\].heads\[0\]: order 'semantic': 'top_p' must be a number in \(0, 1\]"),
    ({"layers": [{"heads": [{"pattern": {"kind": "window3d", "t": 0, "h": 1, "w": 1}, "order": "semantic"}]}]},
     "its pattern must be 'dense'"),
])
def test_orders_refused(doc, match):
    base = {"format": "vdit-accel-strategy", "version": 1}
    with pytest.raises(ValueError, match=match):
        Strategy.from_dict({**base, **doc})


def test_order_fields_validated_in_code():
    with pytest.raises(ValueError, match="need per-head 'layers'"):
        Strategy(orders=[[None]])
    with pytest.raises(ValueError, match="one order per head"):
        Strategy(layers=[[{"kind": "dense"}] * 2], orders=[[None]])
    with pytest.raises(ValueError, match="its pattern must be 'dense'"):
        Strategy.uniform("window3d:t=1,h=1,w=1", order="segment")
