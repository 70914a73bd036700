import dataclasses
import json
from pathlib import Path

import pytest

from vdit_accel import Strategy
from vdit_accel.patterns import Window3d, parse_pattern
from vdit_accel.quant import QuantMode
from vdit_accel.strategy import HeadSpec


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
    assert doc["format"] == "vdit-accel-strategy" and doc["version"] == 2
    assert doc["model"] == {"class": "WanTransformer3DModel", "head_dim": 64, "num_layers": 2, "num_heads": 3}
    assert doc["layers"][1]["heads"][0] == {"pattern": "window3d:t=1,h=2,w=2", "error": 0.01, "density": 0.5}
    back = Strategy.load(path)
    assert back == st and back.to_dict() == st.to_dict()
    assert back.layer_heads(1, 3)[0] == HeadSpec(Window3d(1, 2, 2))
    uni = Strategy.uniform("window3d:t=1,h=1,w=1+stripes:frames=0", dense_warmup_steps=1)
    uni.save(path)
    back = Strategy.load(path)
    assert back.is_uniform and back == uni and back.to_dict() == uni.to_dict()
    assert back.layer_heads(5, 4) == (uni.default,) * 4


def test_from_spec_forms(tmp_path):
    assert Strategy.from_spec("dense").is_dense()
    assert Strategy.from_spec("window3d:t=1,h=2,w=2").default.pattern == Window3d(1, 2, 2)
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
        ({"format": "vdit-accel-strategy", "version": 99}, "version 99 is not supported .*reads versions 1, 2, 3"),
        ({"format": "vdit-accel-strategy", "version": 1, "pickle": 1}, "unknown keys"),
        ({"format": "vdit-accel-strategy", "version": 2, "quant": "fp8"}, r"version 2\) has unknown keys \['quant'\]"),
        ({"format": "vdit-accel-strategy", "version": 2, "default": "dense"}, "'default' must be a JSON object"),
        ({"format": "vdit-accel-strategy", "version": 2, "default": {"pattern": "window3d:t=1"}},
         "strategy default: pattern 'window3d' needs parameter 'h'"),
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
    assert [h.quant for h in st.layer_heads(0, 3)] == [QuantMode.FP8] * 3 and st.is_quantized()
    assert [st.quantized_at(i, 10) for i in range(10)] == [False, False] + [True] * 7 + [False]
    assert st.quantized_at(9, None)  # the last steps need the step count
    path = tmp_path / "s.json"
    st.save(path)
    back = Strategy.load(path)
    assert back.default.quant == "fp8" and back.quant_bf16_steps == (2, 1) and back.is_uniform
    # Per-head modes in per-head specs; a head's fields equal to the default's are not repeated.
    win = "window3d:t=1,h=1,w=1"
    mixed = Strategy(default=HeadSpec(quant="int8"), layers=[[HeadSpec(win, quant="int8"), HeadSpec(win)],
                                                             [HeadSpec(win, quant="fp8"), HeadSpec(quant="int8")]])
    d = mixed.to_dict()
    assert d["default"] == {"pattern": "dense", "quant": "int8"}
    assert "quant" not in d["layers"][0]["heads"][0] and d["layers"][0]["heads"][1]["quant"] is None
    back = Strategy.from_dict(d)
    assert back == mixed and [h.quant for h in back.layer_heads(1, 2)] == ["fp8", "int8"]
    assert "quant=None/fp8/int8" in back.describe()
    # --quant on the command line overrides every head.
    assert [h.quant for h in Strategy.from_spec(back, quant="int4").layer_heads(0, 2)] == ["int4", "int4"]
    assert not Strategy.from_spec("dense").is_quantized()


@pytest.mark.parametrize("bad, match", [
    (lambda: Strategy.uniform("dense", quant="fp4"), "unknown quantization mode 'fp4'"),
    (lambda: Strategy(quant_bf16_steps=(1,)), "quant_bf16_steps"),
    (lambda: Strategy(quant_bf16_steps=(-1, 0)), "quant_bf16_steps"),
    (lambda: Strategy(head_stats=[[{"error": 0.1}]]), "need per-head 'layers'"),
    (lambda: HeadSpec(quant="fp16"), "unknown quantization mode 'fp16'"),
])
def test_quant_fields_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()
    doc = Strategy.uniform("dense").to_dict()
    doc["default"]["quant"] = "fp16"
    with pytest.raises(ValueError, match="strategy default: unknown quantization mode 'fp16'"):
        Strategy.from_dict(doc)
    v1 = {"format": "vdit-accel-strategy", "version": 1, "quant": "fp16"}
    with pytest.raises(ValueError, match="strategy 'quant': unknown quantization mode 'fp16'"):
        Strategy.from_dict(v1)


V1_EXPLICIT = {
    "format": "vdit-accel-strategy", "version": 1,
    "model": {"class": "WanTransformer3DModel", "num_layers": 2, "num_heads": 2, "head_dim": 64},
    "dense_warmup_steps": 1, "default": {"kind": "dense"}, "quant": "int8", "quant_bf16_steps": [1, 0],
    "order": {"kind": "tiled"},
    "layers": [{"heads": [{"pattern": {"kind": "window3d", "t": 1, "h": 2, "w": 2}, "error": 0.01, "density": 0.3},
                          {"pattern": {"kind": "dense"}, "quant": None, "order": {"kind": "semantic", "top_p": 0.9}}]},
               {"heads": [{"pattern": {"kind": "union", "of": [{"kind": "window3d", "t": 0, "h": 1, "w": 1},
                                                             {"kind": "stripes", "frames": [0], "tokens": []}]}},
                          {"pattern": {"kind": "skip"}, "quant": "fp8", "order": None}]}],
    "search": {"prompts": ["a cat"]},
}


def test_version_1_files_load(tmp_path):
    """Files written before version 2 load: version 1's top-level default pattern, quant and order become
    the default head spec, and each listed head takes them where it does not say otherwise."""
    path = tmp_path / "v1.json"
    path.write_text(json.dumps(V1_EXPLICIT))
    st = Strategy.load(path)
    assert st.default == HeadSpec("dense", "tiled", "int8")
    assert st.layer_heads(0, 2) == (HeadSpec("window3d:t=1,h=2,w=2", "tiled", "int8"),
                                    HeadSpec("dense", "semantic:top_p=0.9", None))
    assert st.layer_heads(1, 2) == (HeadSpec("window3d:t=0,h=1,w=1+stripes:frames=0", "tiled", "int8"),
                                    HeadSpec("skip", None, "fp8"))
    assert st.head_stats[0][0] == {"error": 0.01, "density": 0.3} and st.dense_warmup_steps == 1
    assert st.quant_bf16_steps == (1, 0) and st.search == {"prompts": ["a cat"]}
    again = tmp_path / "v2.json"
    st.save(again)
    assert json.loads(again.read_text())["version"] == 2 and Strategy.load(again) == st
    # The committed search result (written as version 1) still loads.
    committed = sorted((Path(__file__).resolve().parents[2] / "benchmarks" / "results").glob("search-strategy-*.json"))
    assert committed and all(Strategy.load(p).layers is not None for p in committed)


def test_strategy_is_frozen_and_typed():
    st = Strategy(layers=[["window3d:t=1,h=1,w=1", {"kind": "dense"}]])
    assert st.layer_heads(0, 2)[0].pattern == Window3d(1, 1, 1) and isinstance(st.layers, tuple)
    with pytest.raises(dataclasses.FrozenInstanceError):
        st.dense_warmup_steps = 3
    assert hash(st.layer_heads(0, 2)) == hash(Strategy(layers=[["window3d:t=1,h=1,w=1", "dense"]]).layer_heads(0, 2))
