import json

import pytest

from vdit_accel import Strategy
from vdit_accel.patterns import parse_pattern


def _explicit():
    pats = ["dense", "window3d:t=1,h=2,w=2", "skip", "frame_periodic:h=1,w=1,every=2"]
    layers = [[parse_pattern(pats[(l + h) % 4]) for h in range(3)] for l in range(2)]
    stats = [[{"error": 0.01 * (l + h), "density": 0.5} for h in range(3)] for l in range(2)]
    return Strategy(layers=layers, dense_warmup_steps=2, head_stats=stats,
                    model={"class": "WanTransformer3DModel", "head_dim": 64}, search={"prompts": ["a cat"]})


def test_json_round_trip(tmp_path):
    st = _explicit()
    path = tmp_path / "s.json"
    st.save(path)
    doc = json.loads(path.read_text())
    assert doc["format"] == "vdit-accel-strategy" and doc["version"] == 1
    assert doc["model"] == {"class": "WanTransformer3DModel", "head_dim": 64, "num_layers": 2, "num_heads": 3}
    back = Strategy.load(path)
    assert back.to_dict() == st.to_dict()
    assert back.layer_patterns(1, 3)[0] == parse_pattern("window3d:t=1,h=2,w=2")
    uni = Strategy.uniform("window3d:t=1,h=1,w=1+stripes:frames=0", dense_warmup_steps=1)
    uni.save(path)
    back = Strategy.load(path)
    assert back.is_uniform and back.to_dict() == uni.to_dict()
    assert back.layer_patterns(5, 4) == [uni.default] * 4


def test_from_spec_forms(tmp_path):
    assert Strategy.from_spec("dense").is_dense()
    assert Strategy.from_spec("window3d:t=1,h=2,w=2").default["kind"] == "window3d"
    path = tmp_path / "x.json"
    _explicit().save(path)
    assert not Strategy.from_spec(str(path)).is_uniform
    assert Strategy.from_spec(path, dense_warmup_steps=5).dense_warmup_steps == 5
    with pytest.raises(ValueError, match="neither a .json strategy file nor a pattern"):
        Strategy.from_spec("windowww")
    with pytest.raises(ValueError, match="does not exist"):
        Strategy.from_spec(str(tmp_path / "missing.json"))


def test_validate_for_model():
    st = _explicit()
    st.validate_for("WanTransformer3DModel", 2, 3, 64)
    with pytest.raises(ValueError, match="num_layers=2 but the model has num_layers=30"):
        st.validate_for("WanTransformer3DModel", 30, 3, 64)
    with pytest.raises(ValueError, match="num_heads"):
        st.validate_for("WanTransformer3DModel", 2, 12, 64)
    with pytest.raises(ValueError, match="class"):
        st.validate_for("CogVideoXTransformer3DModel", 2, 3, 64)
    Strategy.uniform("skip").validate_for("Anything", 7, 5, 128)  # uniform fits any model
    with pytest.raises(ValueError, match="num_heads=4"):
        Strategy.dense(num_heads=4).validate_for("M", 2, 3)


@pytest.mark.parametrize(
    "doc,match",
    [
        ({"format": "other", "version": 1}, "not a vdit-accel strategy"),
        ({"format": "vdit-accel-strategy", "version": 99}, "version 99"),
        ({"format": "vdit-accel-strategy", "version": 1, "pickle": 1}, "unknown keys"),
        ({"format": "vdit-accel-strategy", "version": 1, "layers": [{"heads": [{"pattern": {"kind": "x"}}]}]},
         r"layers\[0\].heads\[0\]: unknown pattern kind"),
        ({"format": "vdit-accel-strategy", "version": 1,
          "layers": [{"heads": [{"pattern": {"kind": "dense"}}]}, {"heads": []}]}, "non-empty"),
        ({"format": "vdit-accel-strategy", "version": 1, "dense_warmup_steps": -1}, "dense_warmup_steps"),
        ({"format": "vdit-accel-strategy", "version": 1, "model": {"nme": 1}}, "unknown keys"),
    ],
)
def test_load_validation(tmp_path, doc, match):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=match):
        Strategy.load(path)


def test_quant_fields_round_trip_and_validate(tmp_path):
    st = Strategy.uniform("window3d:t=1,h=1,w=1", quant="fp8", quant_bf16_steps=(2, 1))
    assert st.layer_quants(0, 3) == ["fp8"] * 3 and st.is_quantized()
    assert [st.quantized_at(i, 10) for i in range(10)] == [False, False] + [True] * 7 + [False]
    assert st.quantized_at(9, None)  # the last steps need the step count
    path = tmp_path / "s.json"
    st.save(path)
    back = Strategy.load(path)
    assert back.quant == "fp8" and back.quant_bf16_steps == (2, 1) and back.quants is None
    # Per-head modes next to per-head patterns; entries equal to the default are not repeated.
    win = {"kind": "window3d", "t": 1, "h": 1, "w": 1}
    mixed = Strategy(layers=[[win, win], [win, {"kind": "dense"}]], quant="int8", quants=[["int8", None], ["fp8", "int8"]])
    d = mixed.to_dict()
    assert "quant" not in d["layers"][0]["heads"][0] and d["layers"][0]["heads"][1]["quant"] is None
    back = Strategy.from_dict(d)
    assert back.quants == [["int8", None], ["fp8", "int8"]] and back.layer_quants(1, 2) == ["fp8", "int8"]
    assert "quant=None/fp8/int8" in back.describe()
    # --quant on the command line overrides every head.
    assert Strategy.from_spec(back, quant="int4").layer_quants(0, 2) == ["int4", "int4"]
    assert not Strategy.from_spec("dense").is_quantized()


@pytest.mark.parametrize("bad, match", [
    (dict(quant="fp4"), "unknown quantization mode"),
    (dict(quant_bf16_steps=(1,)), "quant_bf16_steps"),
    (dict(quant_bf16_steps=(-1, 0)), "quant_bf16_steps"),
    (dict(quants=[["fp8"]]), "need per-head 'layers'"),
])
def test_quant_fields_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        Strategy(**bad)
    doc = Strategy.uniform("dense").to_dict()
    doc["quant"] = "fp16"
    with pytest.raises(ValueError, match="strategy 'quant'"):
        Strategy.from_dict(doc)
