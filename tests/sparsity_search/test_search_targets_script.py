"""benchmarks/search_targets.py's pieces: the uniform families' ladders, the table, the README section."""

import importlib.util
import json
from pathlib import Path

import pytest

from vdit_accel import VideoGrid
from vdit_accel.sparsity_search.accounting import HeadDensity
from vdit_accel.strategy import HeadSpec

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("family", ["window3d-raster", "window3d-tiled", "radial", "sta"])
def test_family_ladders_ascend_in_density(family):
    st = _load("search_targets")
    grid, block = VideoGrid(5, 16, 16), 32
    ladder = st.family_ladder(family, grid, block)
    density = HeadDensity(grid, block)
    d = [density(HeadSpec(*m)) for m in ladder]
    assert len(ladder) >= 3 and d == sorted(d) and len(set(d)) == len(d) and d[-1] < 1.0
    if family in ("window3d-tiled", "sta"):
        assert all(order == "tiled" for _, order in ladder)


def test_table_and_readme_section(tmp_path):
    st, rt = _load("search_targets"), _load("readme_tables")
    row = {"target_db": 30.0, "row": "searched", "holds": True, "effective_density": 0.3, "expected_attention_speedup": 3.2,
           "attention_speedup_measured": 2.4, "run_speedup_measured": 1.9, "validation_psnr_db_min": 31.2,
           "validation_psnr_db_mean": 33.0}
    semantic = dict(row, row="semantic", effective_density=None, expected_attention_speedup=None)
    doc = {"gpu": "GPU X", "date": "2026-12-04", "model": "wan-rich", "size": [65, 256, 448], "tokens": 30464, "steps": 40,
           "validation": 4, "versions": {"vdit_accel": "abc"}, "rows": [row, semantic]}
    table = st.markdown(doc)
    assert "| 30 dB | searched | yes | 0.300 | 3.20× | 2.40× | 1.90× | 31.2 / 33.0 |" in table
    assert "| 30 dB | semantic | yes | — | — | 2.40× |" in table
    assert "no GPU run yet" in rt.search_targets_summary(tmp_path)
    (tmp_path / "search-targets-gpu-x-20261204-30db.json").write_text(json.dumps(doc))
    (tmp_path / "search-targets-cpu-20261204.json").write_text(json.dumps(dict(doc, gpu="cpu")))
    section = rt.search_targets_summary(tmp_path)
    assert "search-targets-gpu-x-20261204-30db.json" in section and "cpu" not in section.split("\n")[0].lower()
