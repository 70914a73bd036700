"""`vdit-accel bench pipeline` / benchmarks/e2e.py on the CPU at tiny size, the real configs on the meta
device, FlexAttention on our block masks, and the README table generator.

On the CPU FlexAttention runs eagerly (its compiled kernel needs CUDA) through the block mask's
mask_mod; steps and attention calls are timed with perf_counter and peak memory is None.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from vdit_accel import Strategy, VideoGrid
from vdit_accel.attention import HeadRun, attention, planned_attention
from vdit_accel.cli import bench
from vdit_accel.cli.app import app
from vdit_accel.patterns import build_block_mask

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

REPO = Path(__file__).resolve().parent.parent
COMMITTED_SEARCH = sorted((REPO / "benchmarks" / "results").glob("search-strategy-wan1.3b-*.json"))[-1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_real_configs_on_meta():
    """The real configs have the published sizes, grids and text inputs; the committed searched
    strategy fits Wan2.1-1.3B and is refused by the others."""
    want = {  # shape: (params range, video grid, text tokens in the attention call)
        "wan2.1-1.3b-480p": ((1.3e9, 1.5e9), (21, 30, 52), 0),
        "wan2.1-14b-720p": ((13.5e9, 14.5e9), (21, 45, 80), 0),
        "hunyuan-720p": ((12.5e9, 13.1e9), (33, 45, 80), 64),
    }
    for shape, ((lo, hi), grid, text) in want.items():
        model, inputs = bench.build_transformer(shape, "meta", torch.bfloat16)
        n = sum(p.numel() for p in model.parameters())
        assert lo < n < hi, (shape, n)
        g = bench.call_grid(model, inputs, shape)
        assert (g.t, g.h, g.w, g.text_len) == (*grid, text)
        assert inputs["hidden_states"].shape[2:] == bench.SHAPES[shape].latent
        strategy, skip = bench._searched_strategy(COMMITTED_SEARCH, model)
        if shape.startswith("wan2.1-1.3b"):
            assert skip is None and strategy.dense_warmup_steps == 0 and not strategy.is_uniform
        else:
            assert strategy is None and COMMITTED_SEARCH.name in skip
    # HunyuanVideo: 256 text tokens as the pipeline's int64 mask, valid ones first; Wan keeps its float32 modules.
    assert inputs["encoder_hidden_states"].shape[1] == 256 and inputs["encoder_attention_mask"].shape == (1, 256)
    _, tiny = bench.build_transformer("tiny-hunyuan", "cpu", torch.float32)
    mask = tiny["encoder_attention_mask"]
    assert mask.dtype == torch.int64 and mask[0].tolist() == [1] * 5 + [0] * 11
    wan, _ = bench.build_transformer("wan2.1-1.3b-480p", "meta", torch.bfloat16)
    assert wan.blocks[0].scale_shift_table.dtype == torch.float32 and wan.blocks[0].ffn.net[0].proj.weight.dtype == torch.bfloat16
    assert bench.SHAPES["hunyuan-720p"].text_valid == 64 and bench.SHAPES["hunyuan-720p"].text_max == 256


def test_flex_attention_runs_our_block_mask():
    """FlexAttention given our mask (visited blocks as full blocks) equals ours: odd S, per-head patterns, text."""
    grid = VideoGrid(3, 5, 7, 6, "suffix")  # 111 tokens: a partial last block
    mask = build_block_mask([{"kind": "window3d", "t": 0, "h": 1, "w": 1}, {"kind": "frame_periodic", "h": 0, "w": 1, "every": 2},
                             {"kind": "skip"}], grid, 16, 16)
    q, k, v = (torch.randn(1, grid.seq_len, 3, 32) for _ in range(3))
    flex = bench._FlexAttention(compiled=False)
    out = flex(q, k, v, mask.kv_num_blocks, mask.kv_indices, 16, 16, (HeadRun(0, 3, None),), scale=0.2)
    ref = attention(q, k, v, mask, scale=0.2)
    assert (out - ref).abs().max().item() < 1e-5
    assert flex.rel_err < 1e-6
    dense = attention(q, k, v, None, scale=0.2)
    assert (out - dense).abs().max().item() > 1e-2  # the mask does something


def _tiny_searched(tmp_path) -> Path:
    st = Strategy(layers=[[{"kind": "window3d", "t": 0, "h": 1, "w": 1}, {"kind": "dense"}],
                          [{"kind": "skip"}, {"kind": "window3d", "t": 1, "h": 2, "w": 2}]],
                  model={"class": "WanTransformer3DModel", "head_dim": 32}, dense_warmup_steps=2)
    path = tmp_path / "tiny-searched.json"
    st.save(path)
    return path


@pytest.mark.parametrize("shape,tokens,calls", [("tiny-wan", 400, 2), ("tiny-hunyuan", 405, 3)])
def test_rows_tiny(tmp_path, shape, tokens, calls):
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    from vdit_accel.pipelines import op

    backends = dict(_AttentionBackendRegistry._backends)
    rows, info = bench.run_shape(shape, device="cpu", block_size=16, searched_strategy=_tiny_searched(tmp_path), log=lambda m: None)
    assert [r["impl"] for r in rows] == list(bench.VARIANTS)
    by = {r["impl"]: r for r in rows}
    for r in rows:
        assert r["shape"] == shape and r["tokens"] == tokens and "error" not in r, r
        if "skipped" in r:
            assert set(r) == {"shape", "impl", "tokens", "skipped"}
            continue
        assert r["ms"] > 0 and 0 < r["attn_ms"] < r["ms"] and r["peak_mem_gb"] is None
        # Timed calls = the video self-attention layers: Wan's cross-attention, HunyuanVideo's refiner not.
        assert r["attn_calls"] == calls
    # The window row: the candidate nearest 0.15 on the call grid (text included), the same masks for flex.
    grid = VideoGrid(*info["grid"], info["text_tokens"] if shape == "tiny-hunyuan" else 0,
                     "suffix" if shape == "tiny-hunyuan" else "none")
    density = build_block_mask([Strategy.from_spec(info["window"]).default.pattern] * 2, grid, 16, 16).density()
    assert by["ours-window3d-0.15"]["density"] == by["flex-window3d-0.15"]["density"] == pytest.approx(density, abs=1e-4)
    assert abs(density - 0.15) < 0.05
    assert by["flex-window3d-0.15"]["rel_err_vs_ours"] < 1e-5
    assert by["ours-dense"]["density"] == by["noop-attention"]["density"] == 1.0 and "density" not in by["dense-cudnn"]
    fp8 = by["ours-window3d-0.15-fp8"]
    assert ("skipped" in fp8 and "quant" in fp8["skipped"]) or fp8["rel_diff_vs_bf16"] > 0
    if shape == "tiny-wan":
        assert 0 < by["ours-searched"]["density"] < 1 and "dense_warmup_steps=0" in by["ours-searched"]["strategy"]
    else:
        assert "class='WanTransformer3DModel'" in by["ours-searched"]["skipped"]
    assert info["sdpa"] == "default" and info["text_tokens"] == (5 if shape == "tiny-hunyuan" else 8)
    # Everything swapped for the rows is back.
    assert _AttentionBackendRegistry._backends == backends
    assert op.planned_attention is planned_attention


runner = CliRunner()


def test_cli_bench_pipeline(tmp_path):
    res = runner.invoke(app, ["bench", "pipeline", "--shape", "tiny-hunyuan", "--variants", "dense-cudnn,ours-dense",
                              "--variants", "noop-attention", "--block-size", "16", "--device", "cpu", "--out-dir", str(tmp_path)])
    assert res.exit_code == 0, res.output
    [path] = tmp_path.glob("e2e-cpu-*.json")
    doc = json.loads(path.read_text())
    assert doc["command"].startswith("vdit-accel bench pipeline --shape tiny-hunyuan --variants dense-cudnn,ours-dense,noop-attention --block-size 16")
    assert set(doc["versions"]) == {"torch", "triton", "diffusers", "vdit_accel"} and doc["gpu"] == "cpu"
    assert [r["impl"] for r in doc["rows"]] == ["noop-attention", "dense-cudnn", "ours-dense"]
    assert all({"shape", "ms", "attn_ms", "peak_mem_gb"} <= set(r) for r in doc["rows"])
    assert doc["shapes"]["tiny-hunyuan"]["grid"] == [5, 8, 10]
    assert "| tiny-hunyuan | ours-dense | 1.000 |" in res.stdout


@pytest.mark.parametrize("args,match", [
    (["--shape", "wan9-480p"], "unknown shape"),
    (["--shape", "wan2.1-1.3b-480p", "--device", "cpu"], "need a CUDA GPU"),
    (["--shape", "tiny-wan", "--variants", "ours-sparse"], "unknown variant"),
    (["--shape", "tiny-wan", "--reps", "0"], "reps must be >= 1"),
    (["--shape", "tiny-wan", "--searched-strategy", "nope.json"], "does not exist"),
])
def test_cli_bench_bad_input_is_one_line(tmp_path, args, match):
    res = runner.invoke(app, ["bench", "pipeline", *args, "--device", "cpu", "--out-dir", str(tmp_path)])
    assert res.exit_code == 2
    lines = [l for l in res.output.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and match in lines[0], res.output


def test_e2e_script_uses_committed_search(tmp_path, capsys):
    """benchmarks/e2e.py --smoke: the committed Wan2.1-1.3B strategy is offered to ours-searched, and a
    tiny model refuses it with the reason."""
    _load("e2e").main(["--smoke", "--variants", "ours-searched", "--out-dir", str(tmp_path)])
    doc = json.loads(next(tmp_path.glob("e2e-cpu-*.json")).read_text())
    assert doc["command"].endswith("--smoke --variants ours-searched --out-dir " + str(tmp_path))
    for r in doc["rows"]:
        assert r["impl"] == "ours-searched" and COMMITTED_SEARCH.name in r["skipped"]
    assert "skipped:" in capsys.readouterr().out


def _doc(gpu, date, rows, sha="abc"):
    return {"gpu": gpu, "date": date, "command": "python benchmarks/e2e.py", "attn_timing": "CUDA events",
            "versions": {"torch": "2.11", "triton": "3.6", "diffusers": "0.42.1", "vdit_accel": sha},
            "shapes": {"s": {"what": "S", "grid": [2, 3, 4], "text_tokens": 4, "text_max": 8, "window": "window3d:t=1,h=1,w=1",
                             "sdpa": "default", "reps": 2}},
            "rows": rows}


def test_readme_table(tmp_path):
    rt = _load("readme_tables")
    row = lambda impl, ms, attn, **kw: {"shape": "s", "impl": impl, "ms": ms, "attn_ms": attn, "peak_mem_gb": 4.0, **kw}
    new = [row("dense-cudnn", 1000.0, 800.0), row("flex-window3d-0.15", 400.0, 200.0, density=0.15),
           row("ours-window3d-0.15", 320.0, 80.0, density=0.15), row("ours-dense", 980.0, 780.0, density=1.0),
           {"shape": "s", "impl": "ours-window3d-0.15-fp8", "skipped": "no fp8 yet"}]
    (tmp_path / "e2e-gpu-x-20261101.json").write_text(json.dumps(_doc("GPU X", "2026-11-01", new[:1], sha="old")))
    (tmp_path / "e2e-gpu-x-20261123.json").write_text(json.dumps(_doc("GPU X", "2026-11-23", new, sha="new")))
    (tmp_path / "e2e-cpu-20261124.json").write_text(json.dumps(_doc("cpu", "2026-11-24", new)))
    table = rt.e2e_table(tmp_path)
    assert "e2e-gpu-x-20261123.json" in table and "commit new" in table and "old" not in table and "cpu" not in table
    assert "| s | ours-window3d-0.15 | 0.150 | 320 | 80 (25%) | 3.12× | 1.25× | 4.0 |" in table
    assert "| s | flex-window3d-0.15 | 0.150 | 400 | 200 (50%) | 2.50× | — | 4.0 |" in table
    assert "| s | ours-dense | 1.000 | 980 | 780 (80%) | 1.02× | — | 4.0 |" in table
    assert "skipped: no fp8 yet" in table and "2×3×4 + 4 text" in table
    text = f"intro\n{rt.BEGIN}\nstale\n{rt.END}\nrest\n"
    once = rt.replace_section(text, table)
    assert once.startswith("intro\n") and once.endswith(f"{rt.END}\nrest\n") and "stale" not in once
    assert rt.replace_section(once, table) == once
    with pytest.raises(ValueError, match="e2e-table"):
        rt.replace_section("no markers", table)


def test_readme_and_results_md_are_current():
    """The README's table and benchmarks/RESULTS.md are what the committed result files give (regenerate
    with ``python benchmarks/readme_tables.py --write``); the README is a guide of at most ~200 lines that
    starts with the two commands."""
    rt = _load("readme_tables")
    readme = (REPO / "README.md").read_text()
    assert rt.render(readme) == readme
    assert (REPO / "benchmarks" / "RESULTS.md").read_text() == rt.results_md()
    assert len(readme.splitlines()) <= 210
    blocks = readme.split("```bash\n")
    assert blocks[1].startswith("python3.11 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && "
                                "pip install -e . && vdit-accel generate\n")
    assert blocks[2].startswith("python3.11 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && "
                                'pip install -e ".[test]" && python -m pytest -q\n')


def test_results_md_lists_every_result_file(tmp_path):
    rt = _load("readme_tables")
    (tmp_path / "e2e-gpu-x-20261123.json").write_text(json.dumps(_doc("GPU X", "2026-11-23", [
        {"shape": "s", "impl": "dense-cudnn", "ms": 10.0, "attn_ms": 5.0}])))
    (tmp_path / "attention-gpu-x-20261124-quick.json").write_text(json.dumps(
        {"gpu": "GPU X", "date": "2026-11-24", "command": "python benchmarks/attention.py --quick",
         "versions": {"torch": "2", "vdit_accel": "abc"}, "rows": [{"shape": "s", "impl": "ours-dense", "ms": 1.5}]}))
    md = rt.results_md(tmp_path)
    assert "### `e2e-gpu-x-20261123.json`" in md and "### `attention-gpu-x-20261124-quick.json`" in md
    assert "| shape | impl | ms |" in md and "| s | ours-dense | 1.5 |" in md
    assert md.index("## One denoising step") < md.index("## Kernel speed against peers")


def test_flex_on_another_mask_is_an_error(monkeypatch):
    """The flex row is checked against ours: on another mask it records an error and no time."""
    from vdit_accel import BlockMask

    flex_mask = bench._FlexAttention._flex_mask
    monkeypatch.setattr(bench._FlexAttention, "_flex_mask", lambda self, bm: flex_mask(
        self, BlockMask.full(bm.seq_len, bm.num_heads, bm.block_m, bm.block_n)))
    [row] = bench.run_shape("tiny-wan", ["flex-window3d-0.15"], device="cpu", block_size=16, log=lambda m: None)[0]
    assert "not the same block mask" in row["error"] and "ms" not in row


def test_gpu_scripts_name_tests_that_exist():
    """The device scripts run tests by node id (benchmarks/gpu_*.sh): each names a test file and function that
    exist, so a renamed or moved test fails here rather than as 'not found' on the GPU machine."""
    import re

    repo = Path(__file__).resolve().parents[1]
    ids = set()
    for script in (repo / "benchmarks").glob("gpu_*.sh"):
        ids |= set(re.findall(r"(tests/[\w/]+\.py)::(\w+)", script.read_text()))
    assert ids, "no node ids found: the pattern is out of date"
    for path, name in sorted(ids):
        assert re.search(rf"^def {name}\(", (repo / path).read_text(), re.M), f"{path}::{name}"
