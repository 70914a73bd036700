"""Run diffusers' own tests of the supported model families with vdit-accel active, and compare.

    python benchmarks/external/diffusers_suite.py /path/to/diffusers [--modes plain,dense,sparse]
        [--offline-hub] [--files tests/...] [--work DIR] [--reuse] [--timeout 900]

``/path/to/diffusers`` is a diffusers source checkout (its ``tests/`` at least; the version should match
the installed diffusers, or the checkout's ``src/`` is what runs: diffusers' ``tests/conftest.py`` puts
it first on ``sys.path``). The Python running this script runs the tests, so it needs diffusers' test
dependencies (``pip install pytest pytest-timeout parameterized accelerate peft requests-mock``).

Each mode is one pytest process over :data:`SUITE_FILES` with our plugin (``vdit_suite_plugin.py``):
``plain`` is diffusers as installed, ``dense`` patches every model of a supported class at construction,
``sparse`` patches it with ``window3d:t=0,h=1,w=1`` in blocks of 16 tokens (see the plugin). The
comparison, per test file: outcomes per mode, the failures that the plain run does not have (training
tests, which vdit-accel refuses, listed apart), tests that passed without a single attention call
reaching us, and, for sparse, the passing tests whose block masks skipped no block (a latent grid of at
most one block, or one the window covers entirely), which do not count as sparse passes.

Writes ``benchmarks/results/diffusers-suite-cpu-<date>.json`` (per file and per test) and a ``.md``
summary beside it; ``--work`` keeps each mode's per-test records and pytest log (``--reuse`` compares
records already there instead of running a mode again).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from result_files import RESULTS, git_sha, run_header  # noqa: E402
from vdit_suite_plugin import SPARSE_BLOCK, SPARSE_STRATEGY  # noqa: E402

# diffusers' tests of the model classes vdit-accel has adapters for (pipelines/adapters.py). Left out:
# WanVACE, WanAnimate and HunyuanVideoFramepack transformers (and their pipelines) and LTX's latent
# upsampler: classes we do not patch.
SUITE_FILES = [
    "tests/models/transformers/test_models_transformer_wan.py",
    "tests/models/transformers/test_models_transformer_skyreels_v2.py",
    "tests/models/transformers/test_models_transformer_hunyuan_video.py",
    "tests/models/transformers/test_models_transformer_hunyuan_1_5.py",
    "tests/models/transformers/test_models_transformer_cogvideox.py",
    "tests/models/transformers/test_models_transformer_ltx.py",
    "tests/models/transformers/test_models_transformer_mochi.py",
    "tests/pipelines/wan/test_wan.py",
    "tests/pipelines/wan/test_wan_22.py",
    "tests/pipelines/wan/test_wan_image_to_video.py",
    "tests/pipelines/wan/test_wan_22_image_to_video.py",
    "tests/pipelines/wan/test_wan_video_to_video.py",
    "tests/pipelines/skyreels_v2/test_skyreels_v2.py",
    "tests/pipelines/skyreels_v2/test_skyreels_v2_df.py",
    "tests/pipelines/skyreels_v2/test_skyreels_v2_image_to_video.py",
    "tests/pipelines/skyreels_v2/test_skyreels_v2_df_image_to_video.py",
    "tests/pipelines/skyreels_v2/test_skyreels_v2_df_video_to_video.py",
    "tests/pipelines/hunyuan_video/test_hunyuan_video.py",
    "tests/pipelines/hunyuan_video/test_hunyuan_image2video.py",
    "tests/pipelines/hunyuan_video/test_hunyuan_skyreels_image2video.py",
    "tests/pipelines/hunyuan_video1_5/test_hunyuan_1_5.py",
    "tests/pipelines/cogvideo/test_cogvideox.py",
    "tests/pipelines/cogvideo/test_cogvideox_image2video.py",
    "tests/pipelines/cogvideo/test_cogvideox_video2video.py",
    "tests/pipelines/cogvideo/test_cogvideox_fun_control.py",
    "tests/pipelines/ltx/test_ltx.py",
    "tests/pipelines/ltx/test_ltx_image2video.py",
    "tests/pipelines/ltx/test_ltx_condition.py",
    "tests/pipelines/mochi/test_mochi.py",
]
MODES = ("plain", "dense", "sparse")
FAILED = ("failed", "error")
INFERENCE_ONLY = "vdit-accel attention is inference-only"  # our backward error (pipelines/op.py)


def run_mode(mode: str, checkout: Path, files: list[str], work: Path, timeout: int, offline_hub: bool) -> dict:
    """One pytest process over ``files`` in ``mode``; its per-test records land in ``work/<mode>.jsonl``."""
    report, log = work / f"{mode}.jsonl", work / f"{mode}.log"
    report.unlink(missing_ok=True)
    env = {**os.environ, "VDIT_SUITE_MODE": mode, "VDIT_SUITE_REPORT": str(report),
           "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    if offline_hub:
        env.update(VDIT_SUITE_OFFLINE_HUB="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "pytest", "-p", "vdit_suite_plugin", "-p", "no:cacheprovider", "-q",
           f"--timeout={timeout}", *files]
    print(f"[{mode}]", " ".join(cmd), flush=True)
    start = time.time()
    with open(log, "w") as out:
        rc = subprocess.run(cmd, cwd=checkout, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    if rc not in (0, 1):  # 1: some tests failed; anything else: pytest itself did not get through
        raise RuntimeError(f"pytest exited with {rc} in mode {mode}; its log: {log}\n" + log.read_text()[-3000:])
    pytest = " ".join(["python", *cmd[1:]])
    return {"mode": mode, "returncode": rc, "seconds": round(time.time() - start, 1), "pytest": pytest,
            "vdit_accel": git_sha()}  # the commit that ran (a later --reuse may be run from another)


def load(work: Path, mode: str) -> dict[str, dict]:
    path = work / f"{mode}.jsonl"
    if not path.exists():
        return {}
    return {r["nodeid"]: r for r in map(json.loads, path.read_text().splitlines())}


def is_training(nodeid: str, rec: dict) -> bool:
    """A test that trains (a backward through our attention, which refuses it)."""
    return "training" in nodeid.lower() or INFERENCE_ONLY in (rec.get("message") or "")


def compare(records: dict[str, dict[str, dict]]) -> tuple[list[dict], list[dict]]:
    """Per file: outcome counts per mode and what differs from the plain run; and every test's line."""
    plain = records.get("plain", {})
    files: dict[str, dict] = defaultdict(lambda: {"tests": 0, **{m: Counter() for m in records}})
    tests = []
    ids = sorted({i for recs in records.values() for i in recs})
    for nodeid in ids:
        f = files[nodeid.split("::")[0]]
        f["tests"] += 1
        line = {"test": nodeid}
        base = plain.get(nodeid, {}).get("outcome")
        for mode, recs in records.items():
            rec = recs.get(nodeid)
            if rec is None:
                continue
            c, outcome = f[mode], rec["outcome"]
            c[outcome] += 1
            line[mode] = outcome
            if mode == "plain":
                continue
            line[f"{mode}_calls"] = rec["calls"]
            if outcome in FAILED and base not in FAILED:
                c["training_failures" if is_training(nodeid, rec) else "new_failures"] += 1
                line[f"{mode}_message"] = rec["message"]
            if rec["calls"]:
                c["reached_us"] += 1
            elif outcome == "passed":
                c["passed_untouched"] += 1
            if mode == "sparse":
                line["sparse_masked_calls"] = rec["sparse_calls"]
                line["max_grid"] = rec["max_grid"]
                if outcome == "passed" and rec["calls"]:
                    if rec["sparse_calls"]:
                        c["sparse_passes"] += 1
                    elif rec["max_video_tokens"] <= SPARSE_BLOCK:
                        c["grid_within_one_block"] += 1
                    else:
                        c["mask_covers_grid"] += 1
        tests.append(line)
    rows = []
    for name, f in sorted(files.items()):
        row = {"file": name, "tests": f["tests"]}
        for mode in records:
            row[mode] = dict(sorted(f[mode].items()))
        rows.append(row)
    return rows, tests


def _cell(c: dict, mode: str) -> str:
    parts = [f"{c.get('passed', 0)} pass", f"{c.get('failed', 0) + c.get('error', 0)} fail",
             f"{c.get('skipped', 0)} skip"]
    if mode != "plain":
        parts.append(f"+{c.get('new_failures', 0)} new")
        if c.get("training_failures"):
            parts.append(f"+{c['training_failures']} training")
        parts.append(f"{c.get('reached_us', 0)} reached us, {c.get('passed_untouched', 0)} passed untouched")
    if mode == "sparse":
        parts.append(f"{c.get('sparse_passes', 0)} sparse / {c.get('grid_within_one_block', 0)} grid<=block / "
                     f"{c.get('mask_covers_grid', 0)} mask full")
    return ", ".join(parts)


def markdown(doc: dict) -> str:
    modes = [m for m in MODES if m in doc["runs"]]
    out = [f"# diffusers' own tests with vdit-accel active ({doc['date']})", "",
           f"Command: `{doc['command']}`", "",
           f"diffusers tests: {doc['diffusers_tests']}; installed diffusers {doc['versions'].get('diffusers')}, torch "
           f"{doc['versions']['torch']}, vdit-accel {doc['versions']['vdit_accel']}; device {doc['gpu']}.", "",
           "Modes: " + "; ".join(f"{r['mode']} {r['seconds']:.0f} s (pytest rc {r['returncode']}"
                                 + (f", vdit-accel {r['vdit_accel']}" if r['mode'] != "plain" and r.get("vdit_accel")
                                    else "") + ")"
                                 for r in doc["runs"].values()) + ".", "",
           "Per file: pass / fail (failed + error) / skip; for dense and sparse, failures the plain run does "
           "not have (`new`; training tests apart), tests with at least one attention call through vdit-accel "
           "(`reached us`), passed tests without one (`passed untouched`: they run no forward, or only a "
           "class-scoped fixture's forward, counted for the test that built it); for sparse, passed tests "
           "whose masks skipped blocks (`sparse`), whose latent grid fits in one "
           f"{SPARSE_BLOCK}-token block (`grid<=block`), or whose window covered the whole grid (`mask full`): "
           "the last two ran dense in effect.", "",
           "| file | tests | " + " | ".join(modes) + " |", "|---|---|" + "---|" * len(modes)]
    for row in doc["files"]:
        name = row["file"].replace("tests/", "")
        out.append(f"| {name} | {row['tests']} | " + " | ".join(_cell(row.get(m, {}), m) for m in modes) + " |")
    total = doc["totals"]
    out += ["", "Totals: " + "; ".join(f"{m}: {_cell(total[m], m)}" for m in modes), ""]
    new = [t for t in doc["tests"] for m in modes[1:] if t.get(f"{m}_message") and not is_training(t["test"], {
        "message": t[f"{m}_message"]})]
    out.append(f"Failures beyond the plain run's, training tests excepted: {len(new)}")
    out += [f"- `{t['test']}`: {' / '.join(t.get(f'{m}_message') or '' for m in modes[1:])}" for t in new]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkout", type=Path, help="a diffusers source checkout (its tests/ folder is what runs)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--files", nargs="*", help=f"test files relative to the checkout (default: the {len(SUITE_FILES)} "
                                               "files of the supported families)")
    ap.add_argument("--offline-hub", action="store_true",
                    help="replace the hub's tiny test tokenizers and configs by offline stand-ins (see the plugin)")
    ap.add_argument("--work", type=Path, default=Path("diffusers-suite-work"))
    ap.add_argument("--reuse", action="store_true", help="compare the records already in --work, run no mode again")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per test (pytest-timeout)")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    checkout = args.checkout.resolve()
    files = args.files or [f for f in SUITE_FILES if (checkout / f).exists()]
    missing = sorted(set(args.files or SUITE_FILES) - {f for f in files if (checkout / f).exists()})
    if missing:
        print("not in this checkout:", ", ".join(missing))
    modes = [m for m in args.modes.split(",") if m]
    if "plain" not in modes:
        print("note: without the plain mode nothing says which failures are diffusers' own")
    args.work.mkdir(parents=True, exist_ok=True)
    runs_path = args.work / "runs.json"
    runs = json.loads(runs_path.read_text()) if runs_path.exists() else {}
    for mode in modes:
        if not (args.reuse and (args.work / f"{mode}.jsonl").exists()):
            runs[mode] = run_mode(mode, checkout, files, args.work, args.timeout, args.offline_hub)
            runs_path.write_text(json.dumps(runs, indent=1))
    records = {m: load(args.work, m) for m in modes if load(args.work, m)}
    rows, tests = compare(records)

    tag, date, doc = run_header("external/diffusers_suite.py", argv, "cpu")
    git = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                         text=True)
    stamp = checkout / "MIRROR_COMMIT"  # a checkout exported without .git may say where it came from
    doc["diffusers_tests"] = (git.stdout.strip() if git.returncode == 0 else
                              stamp.read_text().strip() if stamp.exists() else "unknown") + f" ({len(files)} files)"
    doc["files_run"] = files
    doc["sparse"] = {"strategy": SPARSE_STRATEGY, "block_size": SPARSE_BLOCK}
    doc["offline_hub"] = args.offline_hub
    doc["runs"] = {m: runs[m] for m in records if m in runs}
    totals = {m: sum((Counter(r.get(m, {})) for r in rows), Counter()) for m in records}
    doc.update(totals={m: dict(sorted(c.items())) for m, c in totals.items()}, files=rows, tests=tests)
    doc["note"] = "; ".join(f"{m}: {_cell(doc['totals'][m], m)}" for m in records)  # RESULTS.md shows it
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"diffusers-suite-{tag}-{date.strftime('%Y%m%d')}.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    md = markdown(doc)
    path.with_suffix(".md").write_text(md)
    print(md)
    print("wrote", path, "and", path.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
