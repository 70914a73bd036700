"""What the README and benchmarks/RESULTS.md show of the committed results, generated from
benchmarks/results/*.json.

    python benchmarks/readme_tables.py            # print the README's table
    python benchmarks/readme_tables.py --write    # update the README's section and write RESULTS.md

README: one short table (the newest GPU e2e file: per shape, dense cuDNN against our fastest row on
the same step, and FlexAttention on the same block masks). RESULTS.md: every result file, newest
first per kind, with the command that made it, what it measured, and its rows; the end-to-end and
quality files as their own tables (speed-ups from ``vdit_accel.cli.bench.markdown_table``).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
README = Path(__file__).resolve().parent.parent / "README.md"
RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"

# What each kind of result file is (the name before -<device>-<date>), in the order RESULTS.md shows them.
KINDS = {
    "e2e": ("One denoising step at real size", "Transformer forward of real configs with random weights (bf16, "
            "batch 1): diffusers' attention against ours and FlexAttention on the same block masks; "
            "self-attention timed by CUDA events around every call (`python benchmarks/e2e.py`)."),
    "quality": ("Quality on the trained tiny Wan", "Accelerated generations against dense ones, same prompts "
                "and seeds (`python benchmarks/quality.py`)."),
    "overhead": ("Host overhead of a patched call", "Host time of a patched self-attention call minus the "
                 "attention kernel's own launch; a CUDA-graph capture of a patched transformer "
                 "(`python benchmarks/overhead.py`)."),
    "attention": ("Kernel speed against peers", "Ours against cuDNN SDPA (dense) and FlexAttention (same 128x128 "
                  "block mask), quantized modes and their error (`python benchmarks/attention.py`)."),
    "attention-sweep": ("Kernel configuration sweeps", "Launch configurations of our kernel per shape "
                        "(`python benchmarks/attention.py --sweep`, `benchmarks/sparse_sweep.py`)."),
    "quant-sweep": ("Quantized kernel variants", "fp8 / int8 variant configurations against cuDNN "
                    "(`python benchmarks/quant_sweep.py`)."),
    "permutation": ("Token orders", "Blocks needed for 95% of the attention mass per order, and the GPU cost "
                    "of reordering (`python benchmarks/permutation.py`)."),
    "prologue": ("Fused Q/K prologue", "Wan's eager RMSNorm + RoPE against the fused kernel "
                 "(`python benchmarks/prologue.py`)."),
    "mask-build": ("Block-mask build time", "A layer's cold mask build (`python benchmarks/mask_build.py`)."),
    "search": ("Search time", "The offline search of Wan2.1-1.3B's real config (`python benchmarks/search_speed.py`); "
               "sharded over P processes against one on the same prompts (`python benchmarks/sharded_search.py`)."),
    "ulysses": ("Ulysses context parallelism", "One step on P GPUs (step and all-to-all times, speed-up and "
                "efficiency against one GPU), and the same output as one GPU in bf16 (`bash benchmarks/gpu_ulysses.sh P`)."),
    "search-targets": ("Searched strategy against uniform families at PSNR targets", "Each row tuned to keep the "
                       "target on every validation prompt, verified end to end (`python benchmarks/search_targets.py`)."),
    "check-trained": ("Caption check of the trained tiny Wan", "Held-out captions, colour and direction read "
                      "back from the frames (`python benchmarks/check_trained.py`)."),
    "check-rich": ("Caption check of the testbed wan-rich", "Held-out captions at its native size (three seed "
                   "sets) and at half the tokens (`bash benchmarks/gpu_measure_rich.sh`)."),
    "sweep-rich-validation": ("Sampling settings of the testbed wan-rich", "Validation captions per setting at "
                              "its native size (`PARTS=sweep bash benchmarks/gpu_measure_rich.sh`)."),
    "sweep-trained-validation": ("Sampling settings of the trained tiny Wan", "Validation captions per setting "
                                 "(`python benchmarks/check_trained.py --sweep`)."),
    "attention-structure": ("Attention structure of the trained testbed", "Blocks per head for 95% of the "
                            "attention mass, per order, and oracle masks (`python benchmarks/attention_structure.py`)."),
    "quant-accuracy": ("Quantized attention's accuracy", "Error of our quantized modes against SageAttention's "
                       "recipes on the same inputs (`python benchmarks/quant_accuracy.py`)."),
    "demo-strategy": ("The demo's shipped strategy", "Candidate strategies for `vdit-accel generate` over the check "
                      "prompts: PSNR against dense and caption checks (`python benchmarks/demo_strategy.py`)."),
    "train-rich": ("Training the testbed wan-rich", "Commands, steps and losses (`bash benchmarks/gpu_train.sh wan-rich`)."),
    "train-tiny": ("Training the tiny Wan", "Commands, steps and losses (`python -m vdit_accel.pipelines.toy.train`)."),
    "diffusers": ("diffusers' own tests with vdit-accel active", "The supported families' transformer and "
                  "pipeline tests, plain / patched dense / patched sparse, per file and per test, with the "
                  "calls that reached us (`python benchmarks/external/diffusers_suite.py`; the `.md` beside it)."),
}


def kind_of(name: str) -> str | None:
    """The :data:`KINDS` entry a result file's name starts with (the longest: ``search-targets-...`` is
    not ``search``), or None."""
    return max((k for k in KINDS if name.startswith(k + "-")), key=len, default=None)


_DATED = re.compile(r"^(?P<kind>.+?)-(?P<device>[a-z0-9-]+?)-(?P<date>\d{8})(?P<suffix>-[\w-]+)?\.json$")


def markers(name: str) -> tuple[str, str]:
    return (f"<!-- {name}:begin (generated by benchmarks/readme_tables.py --write; do not edit by hand) -->",
            f"<!-- {name}:end -->")


BEGIN, END = markers("e2e-table")


def _newest_gpu_e2e(results: Path) -> dict[str, tuple[Path, dict]]:
    by_gpu: dict[str, tuple[Path, dict]] = {}
    for path in sorted(Path(results).glob("e2e-*.json")):  # yyyymmdd in the name: the newest comes last
        doc = json.loads(path.read_text())
        if doc["gpu"] != "cpu":
            by_gpu[doc["gpu"]] = (path, doc)
    return by_gpu


def _e2e_header(path: Path, doc: dict) -> list[str]:
    v = doc["versions"]
    timing = doc.get("attn_timing", "step time minus the noop-attention step")
    lines = [f"{doc['gpu']}, {doc['date']}, `{path.name}` (commit {v['vdit_accel']}, torch {v['torch']}, "
             f"triton {v['triton']}, diffusers {v.get('diffusers')}). Self-attention ms: {timing}.", ""]
    for name, info in doc.get("shapes", {}).items():
        lines.append(f"- `{name}`: {info['what']}; token grid {'×'.join(map(str, info['grid']))}"
                     f"{' + ' + str(info['text_tokens']) + ' text' if info['text_tokens'] != info['text_max'] else ''}; "
                     f"`{info['window']}`; SDPA {info['sdpa']}; {info['reps']} timed forward(s)")
    if doc.get("shapes"):
        lines.append("")
    return lines


def e2e_table(results: Path = RESULTS) -> str:
    """Markdown: for each GPU its newest e2e result file (CPU smoke files are ignored), a line saying
    where and how it was measured, then the rows."""
    from vdit_accel.cli.bench import markdown_table

    lines = []
    for path, doc in _newest_gpu_e2e(results).values():
        lines += _e2e_header(path, doc) + [markdown_table(doc), ""]
    return "\n".join(lines).rstrip() + "\n"


def e2e_summary(results: Path = RESULTS) -> str:
    """Markdown for the README: per GPU (newest e2e file) and shape, dense cuDNN's step against our fastest
    row's, and FlexAttention's on that row's block masks."""
    from vdit_accel.cli.bench import speedups

    lines = []
    for path, doc in _newest_gpu_e2e(results).values():
        lines += [f"{doc['gpu']}, {doc['date']} (`{path.name}`, commit {doc['versions']['vdit_accel']}), one "
                  "transformer step, random weights, bf16:", "",
                  "| shape | dense cuDNN | ours, fastest row | block density | step | vs cuDNN | vs Flex, same masks |",
                  "|---|---|---|---|---|---|---|"]
        rows = doc["rows"]
        ups = speedups(rows)
        for shape in dict.fromkeys(r["shape"] for r in rows):
            here = [(r, u) for r, u in zip(rows, ups) if r["shape"] == shape and r.get("ms") is not None]
            dense = next((r for r, _ in here if r["impl"] == "dense-cudnn"), None)
            ours = [(r, u) for r, u in here if r["impl"].startswith("ours-") and u[0] is not None]
            if dense is None or not ours:
                continue
            best, (vs_dense, vs_flex) = max(ours, key=lambda ru: ru[1][0])
            flex = f"{vs_flex:.2f}×" if vs_flex is not None else "—"
            lines.append(f"| {shape} | {dense['ms']:.0f} ms | `{best['impl']}` | {best.get('density', 1.0):.3f} | "
                         f"{best['ms']:.0f} ms | {vs_dense:.2f}× | {flex} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n" if lines else "(no GPU e2e results yet: run benchmarks/e2e.py)\n"


def quality_table(results: Path = RESULTS) -> str:
    """Markdown: the newest GPU quality file's rows (benchmarks/quality.py; runs of some rows only, with
    ``--only``, are not the table)."""
    docs = {p: json.loads(p.read_text()) for p in sorted(Path(results).glob("quality-*.json"))}
    files = [p for p, d in docs.items() if d["gpu"] != "cpu" and "--only" not in d.get("command", "")]
    if not files:
        return "(no GPU quality results yet: run benchmarks/quality.py)\n"
    return _quality(files[-1], docs[files[-1]])


def _quality(path: Path, doc: dict) -> str:
    size = doc["size"]
    timed = any("attn_speedup" in r for r in doc["rows"])
    lines = [f"{doc['gpu']}, {doc['date']}, `{path.name}`: `{doc.get('model', 'wan-trained')}`, {size['num_frames']}x"
             f"{size['height']}x{size['width']} ({doc['tokens']} video tokens), {doc['steps']} steps, guidance "
             f"{doc['guidance_scale']}, {doc['dtype']}, {doc['prompts']} check captions; PSNR / SSIM against the dense "
             "generation of the same prompt and seed; agreement = the caption check on the row's videos"
             + ("; attention / generation = dense's time over the row's, in the same run." if timed else "."), "",
             "| row | strategy | block density (run) | PSNR dB (min) | SSIM | check agreement |"
             + (" attention | generation |" if timed else ""),
             "|---|---|---|---|---|---|" + ("---|---|" if timed else "")]
    for r in doc["rows"]:
        if "error" in r:
            lines.append(f"| {r['impl']} | error: {r['error']} | | | | |" + (" | |" if timed else ""))
            continue
        strat = r.get("strategy") or "diffusers' attention"
        strat += f", {r['quant']}" if r.get("quant") else ""
        strat += f", order {r['order']}" if r.get("order") else ""
        strat += f", {r['warmup_steps']} steps dense" if r.get("warmup_steps") else ""
        dens = f"{r['density']:.3f}" + (f" ({r['effective_density']:.3f})" if "effective_density" in r else "")
        quality = (f"{r['psnr_db']:.1f} ({r['psnr_db_min']:.1f}) | {r['ssim']:.3f}" if "psnr_db" in r else "— | —")
        speed = ""
        if timed:
            speed = (f" {r['attn_speedup']:.2f}× | {r['gen_speedup']:.2f}× |" if "attn_speedup" in r
                     else " 1.00× | 1.00× |" if r["impl"] == "dense" else " — | — |")
        lines.append(f"| {r['impl']} | {strat} | {dens} | {quality} | {r['agreement']:.2f} |{speed}")
    return "\n".join(lines) + "\n"


def _cell(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return "`" + json.dumps(v, separators=(",", ":"))[:60] + "`"
    return str(v).replace("|", "\\|")


def rows_table(rows: list[dict], max_columns: int = 14) -> str:
    """Markdown of result rows: the scalar fields (and short configs) the rows have, in their order."""
    cols: dict[str, None] = {}
    for r in rows:
        for k, v in r.items():
            if not isinstance(v, list) or len(v) <= 4:
                cols.setdefault(k, None)
    names = list(cols)[:max_columns]
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    lines += ["| " + " | ".join(_cell(r.get(k)) for k in names) + " |" for r in rows]
    return "\n".join(lines)


def results_md(results: Path = RESULTS) -> str:
    """benchmarks/RESULTS.md: every committed result file, grouped by kind, newest first."""
    from vdit_accel.cli.bench import markdown_table

    groups: dict[str, list[tuple[str, Path]]] = {}
    for path in sorted(Path(results).glob("*.json")):
        m = _DATED.match(path.name)
        if m is None:
            continue
        kind = kind_of(path.name) or m["kind"]
        groups.setdefault(kind, []).append((m["date"], path))
    out = ["# Measured results", "",
           "Generated by `python benchmarks/readme_tables.py --write` from the files in `benchmarks/results/` "
           "(do not edit by hand). Each file holds the exact command, the GPU, the versions and the commit it "
           "measured; older files are kept as the history.", ""]
    for kind in [k for k in KINDS if k in groups] + sorted(k for k in groups if k not in KINDS):
        title, what = KINDS.get(kind, (kind, ""))
        out += [f"## {title}", "", what, ""] if what else [f"## {title}", ""]
        for _, path in sorted(groups[kind], key=lambda dp: (dp[0], dp[1].name), reverse=True):
            doc = json.loads(path.read_text())
            v = doc.get("versions", {})
            head = f"### `{path.name}`"
            command = doc.get("command", "?")
            command = "`; `".join(command) if isinstance(command, list) else command
            out += [head, "", f"{doc.get('gpu', '?')}, {doc.get('date', '?')}; commit {v.get('vdit_accel', '?')}, "
                    f"torch {v.get('torch', doc.get('torch', '?'))}, triton {v.get('triton', '?')}. "
                    f"Command: `{command}`", ""]
            if kind == "e2e" and doc.get("gpu") != "cpu":
                out += _e2e_header(path, doc)[2:] + [markdown_table(doc), ""]
            elif kind == "quality" and "size" in doc:
                out += [_quality(path, doc)]
            elif isinstance(doc.get("rows"), list) and doc["rows"]:
                out += [rows_table(doc["rows"]), ""]
            else:
                scalars = {k: val for k, val in doc.items() if k not in ("gpu", "date", "command", "versions", "cuda_graph",
                                                                        "note", "command_note")
                           and not isinstance(val, (dict, list))}
                out += ["; ".join(f"{k}: {_cell(val)}" for k, val in scalars.items()) or "(no rows)", ""]
            for key in ("cuda_graph", "note", "command_note"):
                if key in doc:
                    out += [f"{key}: {_cell(doc[key]) if not isinstance(doc[key], str) else doc[key]}", ""]
    return "\n".join(out).rstrip() + "\n"


def replace_section(text: str, table: str, name: str = "e2e-table") -> str:
    """``text`` with everything between the ``name`` markers replaced by ``table``."""
    begin, end = markers(name)
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise ValueError(f"the README needs exactly one {begin!r} ... {end!r} section")
    head, rest = text.split(begin)
    _, tail = rest.split(end)
    return f"{head}{begin}\n{table}{end}{tail}"


def search_targets_summary(results: Path = RESULTS) -> str:
    """Markdown for the README: the newest GPU date's search-targets files (one per target), as
    ``benchmarks/search_targets.py`` tabulates them."""
    import importlib.util

    docs = [(p, json.loads(p.read_text())) for p in sorted(Path(results).glob("search-targets-*.json"))]
    docs = [(p, d) for p, d in docs if d["gpu"] != "cpu"]
    if not docs:
        return ("(no GPU run yet: `bash benchmarks/gpu_search_targets.sh` on a GPU; a CPU run at "
                "a small size is in [`benchmarks/RESULTS.md`](benchmarks/RESULTS.md))\n")
    newest = max(d["date"] for _, d in docs)
    spec = importlib.util.spec_from_file_location("search_targets", Path(__file__).resolve().parent / "search_targets.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = []
    for path, doc in docs:
        if doc["date"] == newest:
            out.append(f"`{path.name}`, commit {doc['versions']['vdit_accel']}: " + mod.markdown(doc))
    return "\n".join(out)


def render(text: str, results: Path = RESULTS) -> str:
    """``text`` (the README) with its generated sections current."""
    text = replace_section(text, e2e_summary(results), "e2e-summary")
    return replace_section(text, search_targets_summary(results), "search-targets")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write", action="store_true", help="update README.md in place and write RESULTS.md")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--readme", type=Path, default=README)
    ap.add_argument("--results-md", type=Path, default=RESULTS_MD)
    args = ap.parse_args(argv)
    if args.write:
        args.readme.write_text(render(args.readme.read_text(), args.results))
        args.results_md.write_text(results_md(args.results))
    else:
        print(e2e_summary(args.results), end="")


if __name__ == "__main__":
    main()
