"""The trained tiny Wan pipeline ``"wan-trained"``: the architecture, its weight files, the loader.

A real ``WanPipeline`` whose components were trained on the procedural clips of
:mod:`vdit_accel.toyvideo` by ``benchmarks/train_tiny.py`` (the command and the loss curve are in
``benchmarks/results/``):

- ``WanTransformer3DModel``: 6 layers, 4 heads x 64 channels (head_dim 64, as the kernels serve it),
  FFN 1024, patch (1, 2, 2), 16 latent channels — 6.9 M parameters;
- ``AutoencoderKLWan``: base 32 channels, ``dim_mult`` (1, 2, 2), 4x spatial / 4x temporal
  compression, z_dim 16 — 2.5 M parameters, trained first; its ``latents_mean`` / ``latents_std`` are
  measured on training clips and stored with its weights. (An 8x-spatial VAE with base 16 did not learn
  the small objects: 7/20 captions readable from its reconstructions after 444 steps on an H100, against
  20/20 for this one after 246; ``benchmarks/train_tiny.py`` says more);
- ``UMT5EncoderModel``: 2 layers, d_model 64, over ``ByT5Tokenizer()``'s 384 byte tokens, trained with
  the transformer (no dropout, so training and inference embed a caption identically);
- ``FlowMatchEulerDiscreteScheduler(shift=SCHEDULER_SHIFT)``: the transformer predicts ``noise - latents`` at
  ``timestep = 1000 * sigma``, the convention the training follows (trained with sigmas shifted by
  ``TRAINING_SHIFT`` = 3; sampled at shift 5, chosen on the validation scenes).

Weights live in ``pipelines/weights/wan-trained/`` as fp16 safetensors (``transformer``, ``vae``,
``text_encoder``), about 19 MB in all, and are loaded into float32 modules. Sizes: :data:`TRAINED_DEFAULTS`
(17 frames at 128x128, a 5 x 16 x 16 = 1,280-token grid, quick on a CPU) and :data:`LARGE_SIZE`
(17 frames at 256x256: 5 x 32 x 32 = 5,120 video tokens, where sparsity matters); the training mixes
both and sizes between them. One video token is 8x8 pixels (VAE 4x, patch 2).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .tiny import TinyDefaults, cast_pipeline

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights" / "wan-trained"
COMPONENTS = ("transformer", "vae", "text_encoder")
# Captions are padded to this many byte tokens, in training and at inference (the cross-attention sees
# the padding, so the length is part of the model). vdit_accel.toyvideo.MAX_CAPTION_BYTES + 1 fits.
MAX_SEQUENCE_LENGTH = 128
# Sampling settings of generate / check_trained / quality: classifier-free guidance (the training drops
# 10% of captions), Euler steps and the scheduler's shift at inference. Chosen on the validation scenes
# (toyvideo.validation_scenes: held-out combinations the check does not use), never on the check:
# H100, 24 settings x 2 seed bases (benchmarks/results/sweep-trained-validation-*.json): guidance 5, 40
# steps, shift 5 -> 0.95 (the best, tied with shift 7); the former guidance 8, 20 steps, shift 3 -> 0.775.
GUIDANCE_SCALE = 5.0
SCHEDULER_SHIFT = 5.0
TRAINED_DEFAULTS = TinyDefaults(height=128, width=128, frames=17, steps=40, max_sequence_length=MAX_SEQUENCE_LENGTH,
                                call_kwargs={"guidance_scale": GUIDANCE_SCALE})
LARGE_SIZE = dict(num_frames=17, height=256, width=256)
# The shift of the training's timestep distribution (sigma = shift * u / (1 + (shift - 1) * u)).
TRAINING_SHIFT = 3.0
_FORMAT = "vdit-accel wan-trained 1"

TRANSFORMER_CONFIG = dict(
    patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=64, in_channels=16, out_channels=16,
    text_dim=64, freq_dim=256, ffn_dim=1024, num_layers=6, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    eps=1e-6, rope_max_seq_len=1024,
)
VAE_CONFIG = dict(base_dim=32, z_dim=16, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[True, True],
                  scale_factor_spatial=4, scale_factor_temporal=4)
TEXT_ENCODER_CONFIG = dict(
    vocab_size=384, d_model=64, d_kv=16, d_ff=256, num_layers=2, num_heads=4, relative_attention_num_buckets=32,
    relative_attention_max_distance=128, dropout_rate=0.0,
)


def build_components(seed: int = 0, latents_mean=None, latents_std=None):
    """``(transformer, vae, text_encoder)`` of the trained architecture with seeded random weights, in
    training mode (the starting point of ``train_tiny.py``; the loader fills them from files).
    ``latents_mean`` / ``latents_std``: the VAE's per-channel latent statistics (16 each; identity if None)."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    z = VAE_CONFIG["z_dim"]
    mean = [0.0] * z if latents_mean is None else [float(v) for v in latents_mean]
    std = [1.0] * z if latents_std is None else [float(v) for v in latents_std]
    if len(mean) != z or len(std) != z or min(std) <= 0:
        raise ValueError(f"latents_mean / latents_std need {z} values each (std > 0), got {len(mean)} / {len(std)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = WanTransformer3DModel(**TRANSFORMER_CONFIG)
        vae = AutoencoderKLWan(**VAE_CONFIG, latents_mean=mean, latents_std=std)
        text_encoder = UMT5EncoderModel(UMT5Config(**TEXT_ENCODER_CONFIG))
    return transformer, vae, text_encoder


def make_pipeline(transformer, vae, text_encoder):
    """A ``WanPipeline`` around the three modules, with the tokenizer and scheduler they are trained for."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
    from transformers import ByT5Tokenizer

    pipe = WanPipeline(tokenizer=ByT5Tokenizer(), text_encoder=text_encoder, vae=vae, transformer=transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=SCHEDULER_SHIFT))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tokenize_captions(captions: list[str], max_sequence_length: int = MAX_SEQUENCE_LENGTH):
    """``(input_ids, attention_mask)`` ``[B, max_sequence_length]``, the same as ``WanPipeline.encode_prompt``
    gets from ``ByT5Tokenizer()`` (token = byte + 3, end token 1, padding 0, truncated to keep the end
    token; tested equal), computed directly: the Python tokenizer takes ~2.5 ms a caption, too slow for
    the training's pool of thousands."""
    ids = torch.zeros(len(captions), max_sequence_length, dtype=torch.long)
    for i, caption in enumerate(captions):
        row = [b + 3 for b in caption.encode("utf-8")][: max_sequence_length - 1] + [1]
        ids[i, : len(row)] = torch.tensor(row)
    return ids, (ids != 0).long()


def caption_embeddings(text_encoder, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Text embeddings ``[B, L, d_model]`` exactly as ``WanPipeline.encode_prompt`` makes them (encoder
    states of the real tokens, zeros after), but differentiable: the training's path."""
    states = text_encoder(input_ids, attention_mask).last_hidden_state
    return states * attention_mask.unsqueeze(-1).to(states.dtype)


def save_trained_weights(out_dir: str | Path, transformer, vae, text_encoder, metadata: dict | None = None) -> list[Path]:
    """Write the three components as fp16 safetensors into ``out_dir`` (the VAE's latent statistics
    and ``metadata`` go into each file's header). Returns the paths."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    header = {"format": _FORMAT, "latents_mean": json.dumps(list(vae.config.latents_mean)),
              "latents_std": json.dumps(list(vae.config.latents_std))}
    header.update({k: json.dumps(v) if not isinstance(v, str) else v for k, v in (metadata or {}).items()})
    paths = []
    for name, module in zip(COMPONENTS, (transformer, vae, text_encoder)):
        state = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in module.state_dict().items()}
        path = out_dir / f"{name}.safetensors"
        save_file(state, str(path), metadata=header)
        paths.append(path)
    return paths


def weights_available(weights_dir: str | Path | None = None) -> bool:
    """Whether ``weights_dir`` (default: the package's) holds the three weight files."""
    weights_dir = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    return all((weights_dir / f"{n}.safetensors").is_file() for n in COMPONENTS)


def load_trained_components(weights_dir: str | Path | None = None):
    """``(transformer, vae, text_encoder)`` in float32, eval mode, from the fp16 files in ``weights_dir``
    (default: the weights shipped in the package)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    weights_dir = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    missing = [n for n in COMPONENTS if not (weights_dir / f"{n}.safetensors").is_file()]
    if missing:
        raise FileNotFoundError(
            f"no trained weights ({', '.join(n + '.safetensors' for n in missing)}) in {str(weights_dir)!r}; "
            "train them with `python benchmarks/train_tiny.py --out DIR` and copy DIR's transformer, vae and "
            f"text_encoder .safetensors into {str(WEIGHTS_DIR)!r}, or pass weights_dir=DIR")
    with safe_open(str(weights_dir / "vae.safetensors"), "pt") as f:
        header = f.metadata() or {}
    if header.get("format") != _FORMAT:
        raise ValueError(f"{str(weights_dir / 'vae.safetensors')!r} is not a {_FORMAT!r} file "
                         f"(format {header.get('format')!r}); retrain with benchmarks/train_tiny.py")
    modules = build_components(0, json.loads(header["latents_mean"]), json.loads(header["latents_std"]))
    for name, module in zip(COMPONENTS, modules):
        state = load_file(str(weights_dir / f"{name}.safetensors"))
        module.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        module.eval().requires_grad_(False)
    return modules


def build_trained_pipeline(weights_dir: str | Path | None = None, dtype: torch.dtype = torch.float32):
    """The trained tiny ``WanPipeline`` (see the module docstring), offline. ``weights_dir``: a directory
    written by ``benchmarks/train_tiny.py`` (default: the weights shipped in the package)."""
    return cast_pipeline(make_pipeline(*load_trained_components(weights_dir)), dtype)
