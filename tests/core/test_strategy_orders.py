import json

import pytest

from vdit_accel import Strategy
from vdit_accel.orders import Tiled, parse_order
from vdit_accel.strategy import HeadSpec


def test_orders_round_trip_and_defaults(tmp_path):
    heads = [["dense", "window3d:t=1,h=1,w=1"]] * 2
    orders = [["semantic:top_p=0.9,k_clusters=64", None], ["segment", "tiled"]]
    st = Strategy(default=HeadSpec(order="tiled"),
                  layers=[[HeadSpec(p, o) for p, o in zip(ps, os_)] for ps, os_ in zip(heads, orders)])
    path = tmp_path / "s.json"
    st.save(path)
    doc = json.loads(path.read_text())
    assert doc["default"] == {"pattern": "dense", "order": "tiled"}  # automatic parameters are left out
    h = doc["layers"][0]["heads"]
    assert h[0] == {"pattern": "dense", "order": "semantic:k_clusters=64,top_p=0.9"}
    assert h[1] == {"pattern": "window3d:t=1,h=1,w=1", "order": None}  # an explicit raster head under a tiled default
    assert "order" not in doc["layers"][1]["heads"][1]  # the default's own heads do not repeat it
    back = Strategy.load(path)
    assert back == st and back.to_dict() == doc
    assert [x.order for x in back.layer_heads(1, 2)] == [parse_order("segment"), Tiled()]
    assert back.uses_orders() and not back.is_dense()
    assert "order=raster/segment/semantic:k_clusters=64,top_p=0.9/tiled" in back.describe()
    uni = Strategy.uniform("window3d:t=1,h=1,w=1", order="tiled")
    assert [x.order for x in uni.layer_heads(3, 4)] == [Tiled()] * 4
    assert Strategy.from_dict(uni.to_dict()) == uni
    plain = Strategy.uniform("dense")
    assert not plain.uses_orders() and "order" not in plain.to_dict()["default"]
    assert [x.order for x in plain.layer_heads(0, 2)] == [None, None]
    assert not Strategy.uniform("dense", order="semantic").is_dense()  # its blocks are chosen from the data


@pytest.mark.parametrize("doc, match", [
    ({"default": {"order": "spiral"}}, "strategy default: unknown order kind 'spiral'"),
    ({"default": {"order": {"kind": "tiled", "t": 0}}}, "'t' must be an int >= 1"),
    ({"layers": [{"heads": [{"pattern": "dense", "order": {"kind": "semantic", "top_p": 2}}]}]},
     r"layers\[0\].heads\[0\]: order 'semantic': 'top_p' must be a number in \(0, 1\]"),
    ({"layers": [{"heads": [{"pattern": "window3d:t=0,h=1,w=1", "order": "semantic"}]}]},
     "its pattern must be 'dense'"),
])
def test_orders_refused(doc, match):
    base = {"format": "vdit-accel-strategy", "version": 2}
    with pytest.raises(ValueError, match=match):
        Strategy.from_dict({**base, **doc})


def test_orders_refused_in_version_1():
    base = {"format": "vdit-accel-strategy", "version": 1}
    with pytest.raises(ValueError, match="strategy 'order': unknown order kind 'spiral'"):
        Strategy.from_dict({**base, "order": "spiral"})
    with pytest.raises(ValueError, match=r"layers\[0\].heads\[0\]: .*its pattern must be 'dense'"):
        Strategy.from_dict({**base, "layers": [{"heads": [{"pattern": {"kind": "window3d", "t": 0, "h": 1, "w": 1},
                                                           "order": "semantic"}]}]})


def test_order_fields_validated_in_code():
    with pytest.raises(ValueError, match="its pattern must be 'dense'"):
        Strategy.uniform("window3d:t=1,h=1,w=1", order="segment")
    with pytest.raises(ValueError, match=r"layers\[0\].heads\[1\]: .*its pattern must be 'dense'"):
        Strategy(default=HeadSpec(order="semantic"), layers=[["dense", "window3d:t=0,h=1,w=1"]])
    with pytest.raises(ValueError, match="its pattern must be 'dense'"):
        Strategy.from_spec("window3d:t=1,h=1,w=1", order="semantic")
