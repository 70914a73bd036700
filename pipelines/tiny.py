"""Tiny diffusers pipelines built entirely offline from configs, with deterministic random weights.

No hub access: the tokenizer is ``ByT5Tokenizer()`` (byte-level, needs no files) and every model is
constructed from a config. The weights are random, so the videos are noise-like; what the pipelines
exercise is the real diffusers code path at a small size: the real transformer class, its attention
processors, the scheduler, the VAE decode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TINY_FAMILIES = ("wan",)


@dataclass(frozen=True)
class TinyDefaults:
    """The default generation size of a tiny pipeline (its token grid is printed in the report)."""

    height: int
    width: int
    frames: int
    steps: int
    max_sequence_length: int


# 17 frames at 192x192: a (5, 12, 12) token grid, 720 video tokens, 6 blocks of 128.
WAN_DEFAULTS = TinyDefaults(height=192, width=192, frames=17, steps=4, max_sequence_length=32)


def _seeded(seed: int, fn):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn()


def build_tiny_pipeline(family: str = "wan", seed: int = 0, dtype: torch.dtype = torch.float32):
    """A small offline pipeline of ``family`` (one of :data:`TINY_FAMILIES`).

    The Wan pipeline: a ``WanTransformer3DModel`` with 4 layers of 4 heads x 64 channels (head_dim 64,
    as the kernels serve it), a 3-stage ``AutoencoderKLWan`` (8x spatial, 4x temporal compression), a
    2-layer ``UMT5EncoderModel`` and ``FlowMatchEulerDiscreteScheduler``. Same seed, same weights.
    """
    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown tiny pipeline family {family!r}; available: {', '.join(TINY_FAMILIES)}")
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import ByT5Tokenizer, UMT5Config, UMT5EncoderModel

    text_dim = 32
    transformer = _seeded(seed, lambda: WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=4,
        attention_head_dim=64,
        in_channels=16,
        out_channels=16,
        text_dim=text_dim,
        freq_dim=64,
        ffn_dim=512,
        num_layers=4,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=256,
    ))
    vae = _seeded(seed + 1, lambda: AutoencoderKLWan(
        base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    ))
    text_encoder = _seeded(seed + 2, lambda: UMT5EncoderModel(UMT5Config(
        vocab_size=384, d_model=text_dim, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32,
    )))
    pipe = WanPipeline(
        tokenizer=ByT5Tokenizer(),
        text_encoder=text_encoder,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    for m in (transformer, vae, text_encoder):
        m.eval().requires_grad_(False)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def tiny_defaults(family: str = "wan") -> TinyDefaults:
    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown tiny pipeline family {family!r}; available: {', '.join(TINY_FAMILIES)}")
    return WAN_DEFAULTS
