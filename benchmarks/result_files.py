"""What every benchmark's result file shares: the device's name and slug, the header, the file name.

A result is ``benchmarks/results/<what>-<device slug>-<yyyymmdd>[<suffix>].json`` holding ``gpu``, ``date``,
``command``, ``versions`` and the benchmark's own fields (``rows`` at least); see BENCHMARKS.md.
"""

from __future__ import annotations

import datetime
import json
import platform
import re
import subprocess
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def device_name(device: str | torch.device) -> str:
    """The GPU's name (``torch.cuda.get_device_name``), or ``"cpu"``."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def slug(name: str) -> str:
    """A device name as it appears in file names: ``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def git_sha() -> str | None:
    """The checkout's commit (short), or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


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
