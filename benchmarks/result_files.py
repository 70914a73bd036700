"""What every benchmark's result file shares: the device's name and slug, the header, the file name.

A result is ``benchmarks/results/<what>-<device slug>-<yyyymmdd>[<suffix>].json`` holding ``gpu``, ``date``,
``command``, ``versions`` and the benchmark's own fields (``rows`` at least); see BENCHMARKS.md.
"""

from __future__ import annotations

import datetime
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch

from vdit_accel.kernels.measurements import device_name, slug

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
__all__ = ["RESULTS", "device_name", "slug", "git_sha", "run_header", "result_path", "write_result"]


def git_sha() -> str:
    """The checkout's commit (12 hex digits, ``-dirty`` with uncommitted changes to tracked files), or
    ``"unknown"`` outside a git checkout."""
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        if out.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_header(script: str, argv: list[str] | None, device: str | torch.device,
               sha: str | None = None) -> tuple[str, datetime.date, dict]:
    """``(device slug, today, the result document's head)`` of a run of ``benchmarks/<script>``: gpu, date,
    the command, and the versions (torch, triton, diffusers, python, this checkout's commit)."""
    name = device_name(device)
    date = datetime.date.today()
    versions = {"torch": torch.__version__, "python": platform.python_version()}
    for mod in ("triton", "diffusers"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            versions[mod] = None
    versions["vdit_accel"] = sha or git_sha()
    doc = {"gpu": name, "date": date.isoformat(),
           "command": "python " + " ".join([f"benchmarks/{script}"] + (sys.argv[1:] if argv is None else list(argv))),
           "versions": versions}
    return slug(name), date, doc


def result_path(out_dir: Path, what: str, tag: str, date: datetime.date, suffix: str = "") -> Path:
    """``<out_dir>/<what>-<tag>-<yyyymmdd><suffix>.json``."""
    return Path(out_dir) / f"{what}-{tag}-{date.strftime('%Y%m%d')}{suffix}.json"


def write_result(out_dir: Path, what: str, tag: str, date: datetime.date, doc: dict, suffix: str = "") -> Path:
    """``doc`` at :func:`result_path`; prints and returns the path."""
    path = result_path(out_dir, what, tag, date, suffix)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print("wrote", path)
    return path
