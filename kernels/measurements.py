"""Measurements made on this machine's GPU, cached on disk per device.

What the runtime takes from a timing -- the autotuned kernel configs, the search's cost model, the
token orders' per-call overhead -- is measured on the user's GPU when first needed and read back
afterwards, from ``$VDIT_AUTOTUNE_CACHE`` (default ``~/.cache/vdit_accel``), one JSON file per kind of
measurement, device and shape. Imports torch only.
"""

from __future__ import annotations

import contextlib
import json
import os
import re

import torch


def cache_dir() -> str:
    """Where measurements made on this machine are kept ($VDIT_AUTOTUNE_CACHE, else ~/.cache/vdit_accel)."""
    return os.environ.get("VDIT_AUTOTUNE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "vdit_accel"))


def device_name(device) -> str:
    """The GPU's name (``torch.cuda.get_device_name``), or ``"cpu"``."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def slug(name: str) -> str:
    """A device name as file names carry it: ``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def cache_path(what: str, device: str, *key) -> str:
    """``<cache_dir>/<what>-<device slug>[-<key>...].json`` (``device``: a device name)."""
    parts = [what, slug(device), *(str(k) for k in key)]
    return os.path.join(cache_dir(), "-".join(parts) + ".json")


def load(path: str) -> dict | None:
    """A cached measurement, or None (missing or unreadable: then it is measured again)."""
    with contextlib.suppress(OSError, ValueError):
        with open(path) as f:
            doc = json.load(f)
        return doc if isinstance(doc, dict) else None
    return None


def store(path: str, doc: dict) -> None:
    """Keep a measurement (best effort: a read-only home only costs measuring again)."""
    with contextlib.suppress(OSError):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(doc, f, indent=1)
