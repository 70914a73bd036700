"""The strategy `generate` runs on wan-trained by default: it fits the model, is sparse somewhere, is
what `generate` picks, and the figures in its file are the committed measurement's."""

import json
from pathlib import Path

from vdit_accel import Strategy
from vdit_accel.cli.generate import SHIPPED_STRATEGIES, GenerateOptions, measured_summary, prepare
from vdit_accel.pipelines.toy import trained

REPO = Path(__file__).resolve().parents[2]


def test_shipped_strategy_fits_wan_trained_and_is_sparse():
    st = Strategy.load(SHIPPED_STRATEGIES["wan-trained"])
    cfg = trained.TRANSFORMER_CONFIG
    st.validate_for("WanTransformer3DModel", cfg["num_layers"], cfg["num_attention_heads"], cfg["attention_head_dim"])
    assert not st.is_dense() and 0 < st.dense_warmup_steps < trained.TRAINED_DEFAULTS.steps


def test_generate_defaults_to_it_and_overrides_are_said(tmp_path):
    plan = prepare(GenerateOptions(out=tmp_path / "v.mp4"), print)
    assert plan.shipped and plan.strategy.to_dict() == Strategy.load(SHIPPED_STRATEGIES["wan-trained"]).to_dict()
    plan = prepare(GenerateOptions(out=tmp_path / "v.mp4", dense_warmup_steps=0), print)
    assert not plan.shipped and "changed by --dense-warmup-steps" in plan.strategy_source
    assert not prepare(GenerateOptions(out=tmp_path / "v.mp4", strategy="dense"), print).shipped


def test_measured_figures_are_the_committed_result():
    st = Strategy.load(SHIPPED_STRATEGIES["wan-trained"])
    m = st.search["measured"]
    doc = json.loads((REPO / m["file"]).read_text())
    [row] = [r for r in doc["rows"] if r["strategy"] == m["row"]]
    assert REPO / row["strategy"] == SHIPPED_STRATEGIES["wan-trained"] and row["describe"] == st.describe()
    assert [doc["size"][k] for k in ("num_frames", "height", "width")] == m["size"] and doc["steps"] == m["steps"]
    for key in ("psnr_db_mean", "psnr_db_min", "agreement", "dense_agreement", "same_verdict_as_dense", "density_over_run"):
        assert row[key] == m[key], key
    assert m["prompts"] == len(doc["prompts"]) >= 8
    assert m["psnr_db_min"] >= 30 and m["same_verdict_as_dense"] == m["prompts"]  # the demo keeps the video
    assert "not measured here" not in measured_summary(st, m["size"], m["steps"])
    assert "not measured here" in measured_summary(st, [17, 256, 256], m["steps"])
