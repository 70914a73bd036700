"""Checks of the commands' inputs, made before any work, and model loading.

Every check raises ``ValueError`` with one line that names the option, the value and the fix; the
commands turn it into ``error: ...`` and exit status 2. Nothing here writes a file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16")
# A Hugging Face hub id: "org/name" (letters, digits, '-', '_', '.').
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def check_at_least(option: str, value: int | None, least: int = 1) -> None:
    """``value`` (None: the option was left out) must be >= ``least``; 0 is an error, never "default"."""
    if value is not None and value < least:
        leave_out = " (leave the option out for the model's default)" if least == 1 else ""
        raise ValueError(f"{option} must be >= {least}, got {value}{leave_out}")


def check_block_size(block_size: int) -> None:
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"--block-size must be a power of two >= 16 (e.g. 64, 128), got {block_size}")


def resolve_device_dtype(device: str | None, dtype: str | None) -> tuple[str, str]:
    """``(device, dtype)``: cuda if available else cpu; bfloat16 on cuda, float32 on cpu."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    kind = device.split(":")[0]
    if kind not in ("cuda", "cpu"):
        raise ValueError(f"--device must be cuda (cuda:N) or cpu, got {device!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is available here; use --device cpu")
    dtype = dtype or ("bfloat16" if kind == "cuda" else "float32")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be {', '.join(DTYPES[:-1])} or {DTYPES[-1]}, got {dtype!r}")
    return device, dtype


def check_writable(option: str, given: Path, paths: list[Path]) -> None:
    """Every file of ``paths`` (the outputs of ``option`` = ``given``) can be written: each is absent or
    a writable file, and the nearest existing folder above it is a folder we may write to (missing
    folders are created later, when the outputs are written)."""
    for path in paths:
        if path.is_dir():
            raise ValueError(f"{option} {str(given)!r}: {str(path)!r} is a folder; give a file name")
        if path.exists() and not os.access(path, os.W_OK):
            raise ValueError(f"{option} {str(given)!r}: {str(path)!r} exists and is not writable")
        folder = path.parent
        while not folder.exists():
            if folder.is_symlink():  # a dangling link
                raise ValueError(f"{option} {str(given)!r}: {str(folder)!r} is a broken link")
            folder = folder.parent
        if not folder.is_dir():
            raise ValueError(f"{option} {str(given)!r}: {str(folder)!r} is a file, not a folder")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ValueError(f"{option} {str(given)!r}: the folder {str(folder)!r} is not writable; choose another place")


# -- models --------------------------------------------------------------------------------------


def builtin_models() -> tuple[str, ...]:
    from vdit_accel.pipelines.tiny import TINY_FAMILIES, TRAINED_FAMILIES

    return TRAINED_FAMILIES + TINY_FAMILIES


def default_model(say) -> str:
    """The built-in model a command uses without ``--model``: the trained tiny Wan where its weights are
    installed, else the random-weight tiny Wan (said through ``say``)."""
    from vdit_accel.pipelines.toy import trained

    if trained.weights_available():
        return "wan-trained"
    say(f"no trained weights in {trained.WEIGHTS_DIR}: using the random-weight tiny Wan 'wan'")
    return "wan"


def check_model(model: str) -> None:
    """``model`` is a built-in name, an existing diffusers pipeline folder, or looks like a hub id."""
    if model in builtin_models():
        return
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"--model {model!r} is a file; give a diffusers pipeline folder (with model_index.json)")
        if not (path / "model_index.json").is_file():
            raise ValueError(f"--model {model!r} has no model_index.json: not a diffusers pipeline folder")
        return
    if model.startswith(("/", ".", "~")) or model.endswith("/") or not _HUB_ID.match(model):
        raise ValueError(f"--model {model!r}: no such folder, and not a built-in model "
                         f"({', '.join(builtin_models())}) or a hub id (org/name)")


def load_pipeline(model: str, device: str, dtype_name: str):
    """``(pipe, defaults)`` of a built-in model (a tiny family name) or a diffusers folder / hub id."""
    import torch

    from vdit_accel.pipelines.tiny import TinyDefaults

    dtype = getattr(torch, dtype_name)
    if model in builtin_models():
        from vdit_accel.pipelines import build_tiny_pipeline, tiny_defaults

        pipe, defaults = build_tiny_pipeline(model, dtype=dtype), tiny_defaults(model)
    else:
        from diffusers import DiffusionPipeline

        try:
            pipe = DiffusionPipeline.from_pretrained(str(Path(model).expanduser()) if Path(model).expanduser().exists()
                                                     else model, torch_dtype=dtype)
        except Exception as e:  # diffusers raises many kinds here; report them on one line
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise ValueError(f"--model {model!r}: could not load a diffusers pipeline: {type(e).__name__}: {first}") from None
        defaults = TinyDefaults(height=480, width=832, frames=81, steps=50, max_sequence_length=512)
    pipe.set_progress_bar_config(disable=True)  # ours are rich bars
    return pipe.to(device), defaults


def transformers_of(pipe) -> list:
    return [t for t in (getattr(pipe, "transformer", None), getattr(pipe, "transformer_2", None)) if t is not None]


def check_size(pipe, frames: int, height: int, width: int) -> None:
    """Frames, height and width a pipeline can generate: ``frames = k * temporal + 1`` and height, width
    multiples of one token's pixels (the VAE's spatial factor times the patch), where the pipeline says
    its factors (Wan-style pipelines do)."""
    temporal = getattr(pipe, "vae_scale_factor_temporal", None)
    if temporal and (frames - 1) % temporal:
        examples = ", ".join(str(k * temporal + 1) for k in range(5))
        raise ValueError(f"--frames must be {temporal}k+1 for this model ({examples}, ...), got {frames}")
    spatial = getattr(pipe, "vae_scale_factor_spatial", None)
    tr = transformers_of(pipe)
    patch = getattr(tr[0].config, "patch_size", None) if tr else None
    if spatial and patch is not None:
        token = spatial * (patch[-1] if isinstance(patch, (tuple, list)) else patch)
        if height % token or width % token:
            raise ValueError(f"--height and --width must be multiples of {token} pixels (one token) for this model, "
                             f"got {height}x{width}")


def video_tokens(pipe, frames: int, height: int, width: int) -> int | None:
    """The video tokens of a generation of that size, where the pipeline says its VAE factors and the
    transformer its patch sizes (Wan- and HunyuanVideo-style pipelines); None where it does not."""
    temporal = getattr(pipe, "vae_scale_factor_temporal", None)
    spatial = getattr(pipe, "vae_scale_factor_spatial", None)
    tr = transformers_of(pipe)
    patch = getattr(tr[0].config, "patch_size", None) if tr else None
    if not temporal or not spatial or patch is None:
        return None
    if isinstance(patch, (tuple, list)):
        p_t, p_h, p_w = patch
    else:
        p_t, p_h, p_w = getattr(tr[0].config, "patch_size_t", None) or 1, patch, patch
    t = ((frames - 1) // temporal + 1) // p_t
    return t * (height // spatial // p_h) * (width // spatial // p_w)


def check_ulysses_size(pipe, degree: int, frames: int, height: int, width: int) -> None:
    """``--ulysses degree`` can run this pipeline at this size (:func:`~vdit_accel.pipelines.parallel.check_ulysses`
    on each transformer: a family with a plan, heads and video tokens that ``degree`` divides)."""
    if degree == 1:
        return
    from vdit_accel.pipelines.parallel import check_ulysses

    tokens = video_tokens(pipe, frames, height, width)
    for tr in transformers_of(pipe):
        check_ulysses(tr, degree, tokens)
