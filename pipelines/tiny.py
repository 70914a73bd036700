"""Tiny diffusers pipelines built entirely offline from configs, with deterministic random weights.

No hub access: the tokenizer is ``ByT5Tokenizer()`` (byte-level, needs no files) and every model is
constructed from a config. The weights are random, so the videos are noise-like; what the pipelines
exercise is the real diffusers code path at a small size: the real transformer class, its attention
processors, the scheduler, the VAE decode.
"""

from __future__ import annotations

import torch

from .defaults import TinyDefaults, cast_pipeline
from .toy.trained import MODELS, build_trained_pipeline, model_spec

TINY_FAMILIES = (
    "wan", "wan2.2", "skyreels_v2", "hunyuan_video", "hunyuan_video_1_5", "cogvideox", "cogvideox_1_5", "ltx", "mochi",
)
# Pipelines with trained weights shipped in the package (pipelines/toy/trained.py), also built by
# build_tiny_pipeline; apart from TINY_FAMILIES because they need their weight files.
TRAINED_FAMILIES = tuple(MODELS)


# 17 frames at 192x192: a (5, 12, 12) token grid, 720 video tokens, 6 blocks of 128.
WAN_DEFAULTS = TinyDefaults(height=192, width=192, frames=17, steps=4, max_sequence_length=32)

# Every other family: the smallest size with a (3, 4, 4) video token grid (or just above it).
_DEFAULTS = {
    "wan": WAN_DEFAULTS,
    "wan2.2": WAN_DEFAULTS,
    "skyreels_v2": WAN_DEFAULTS,
    "hunyuan_video": TinyDefaults(32, 32, 9, 2, 16, {"prompt_template": {"template": "{}", "crop_start": 0}}),
    "hunyuan_video_1_5": TinyDefaults(16, 16, 5, 2, 0),
    "cogvideox": TinyDefaults(64, 64, 9, 2, 16),
    "cogvideox_1_5": TinyDefaults(64, 64, 17, 2, 16),
    "ltx": TinyDefaults(32, 32, 9, 2, 16),
    "mochi": TinyDefaults(64, 64, 13, 2, 16),
}


def _seeded(seed: int, fn):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn()


def _umt5(seed: int, d_model: int = 32):
    """A 2-layer UMT5 text encoder over ByT5's 384-token byte vocabulary."""
    from transformers import UMT5Config, UMT5EncoderModel

    return _seeded(seed, lambda: UMT5EncoderModel(UMT5Config(
        vocab_size=384, d_model=d_model, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32,
    )))


def _wan_transformer(cls, seed: int, text_dim: int):
    return _seeded(seed, lambda: cls(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=64, in_channels=16, out_channels=16,
        text_dim=text_dim, freq_dim=64, ffn_dim=512, num_layers=4, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=256,
    ))


def _wan_vae(seed: int):
    from diffusers import AutoencoderKLWan

    return _seeded(seed, lambda: AutoencoderKLWan(
        base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    ))


def _wan(seed: int, family: str):
    """Wan 2.1 (one transformer), Wan 2.2 (a high-noise ``transformer`` and a low-noise
    ``transformer_2`` split at ``boundary_ratio``) or SkyReels-V2 (Wan's architecture, UniPC)."""
    from diffusers import (FlowMatchEulerDiscreteScheduler, SkyReelsV2Pipeline, SkyReelsV2Transformer3DModel,
                           UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel)
    from transformers import ByT5Tokenizer

    common = dict(tokenizer=ByT5Tokenizer(), text_encoder=_umt5(seed + 2), vae=_wan_vae(seed + 1))
    if family == "skyreels_v2":
        scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=8.0)
        return SkyReelsV2Pipeline(transformer=_wan_transformer(SkyReelsV2Transformer3DModel, seed, 32),
                                  scheduler=scheduler, **common)
    extra = {}
    if family == "wan2.2":
        extra = dict(transformer_2=_wan_transformer(WanTransformer3DModel, seed + 3, 32), boundary_ratio=0.5)
    return WanPipeline(transformer=_wan_transformer(WanTransformer3DModel, seed, 32),
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), **common, **extra)


def _hunyuan_video(seed: int):
    """HunyuanVideo: 2 dual-stream + 2 single-stream blocks, tiny Llama and CLIP encoders."""
    from diffusers import (AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline,
                           HunyuanVideoTransformer3DModel)
    from transformers import ByT5Tokenizer, CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    transformer = _seeded(seed, lambda: HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_single_layers=2, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=32, pooled_projection_dim=16, rope_axes_dim=(4, 6, 6),
    ))
    vae = _seeded(seed + 1, lambda: AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("HunyuanVideoDownBlock3D",) * 4, up_block_types=("HunyuanVideoUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4, spatial_compression_ratio=8,
        temporal_compression_ratio=4, mid_block_add_attention=True,
    ))
    text_encoder = _seeded(seed + 2, lambda: LlamaModel(LlamaConfig(
        vocab_size=384, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=3,
        bos_token_id=0, eos_token_id=1, pad_token_id=0,
    )))
    text_encoder_2 = _seeded(seed + 3, lambda: CLIPTextModel(CLIPTextConfig(
        vocab_size=384, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=2,
        projection_dim=16, bos_token_id=0, eos_token_id=1, pad_token_id=0,
    )))
    return HunyuanVideoPipeline(
        text_encoder=text_encoder, tokenizer=ByT5Tokenizer(), transformer=transformer, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=text_encoder_2,
        tokenizer_2=ByT5Tokenizer(),
    )


def _hunyuan_video_1_5(seed: int):
    """HunyuanVideo 1.5: 3 blocks; a tiny Qwen2.5-VL text model behind a byte-level chat template."""
    from diffusers import (AutoencoderKLHunyuanVideo15, FlowMatchEulerDiscreteScheduler, HunyuanVideo15Pipeline,
                           HunyuanVideo15Transformer3DModel)
    from diffusers.guiders import ClassifierFreeGuidance
    from transformers import ByT5Tokenizer, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel, T5Config, T5EncoderModel

    transformer = _seeded(seed, lambda: HunyuanVideo15Transformer3DModel(
        in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=3,
        num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=16,
        text_embed_2_dim=32, image_embed_dim=12, rope_axes_dim=(4, 6, 6), target_size=16, task_type="t2v",
    ))
    vae = _seeded(seed + 1, lambda: AutoencoderKLHunyuanVideo15(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16), layers_per_block=1,
        spatial_compression_ratio=4, temporal_compression_ratio=2, downsample_match_channel=False,
        upsample_match_channel=False,
    ))
    text_encoder = _seeded(seed + 2, lambda: Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(
        vocab_size=384, hidden_size=16, intermediate_size=16, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=2, rope_theta=1000000.0, bos_token_id=0, eos_token_id=1, pad_token_id=0,
        rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
    )))
    text_encoder_2 = _seeded(seed + 3, lambda: T5EncoderModel(T5Config(
        vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32,
    )))
    tokenizer = ByT5Tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    pipe = HunyuanVideo15Pipeline(
        text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=text_encoder_2,
        tokenizer_2=ByT5Tokenizer(), guider=ClassifierFreeGuidance(guidance_scale=4.0),
    )
    # Sized for the tiny byte-level tokenizer: no system prompt to crop, short text.
    pipe.system_message, pipe.prompt_template_encode_start_idx = "", 0
    pipe.tokenizer_max_length, pipe.tokenizer_2_max_length = 24, 8
    return pipe


def _cogvideox(seed: int, family: str):
    """CogVideoX 1.0 (5B-style: rotary positions) or 1.5 (temporal patches of 2)."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel
    from transformers import ByT5Tokenizer

    transformer = _seeded(seed, lambda: CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=32, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        patch_size_t=2 if family == "cogvideox_1_5" else None, temporal_compression_ratio=4,
        max_text_seq_length=16, use_rotary_positional_embeddings=True,
    ))
    vae = _seeded(seed + 1, lambda: AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4,
    ))
    return CogVideoXPipeline(tokenizer=ByT5Tokenizer(), text_encoder=_umt5(seed + 2), vae=vae,
                             transformer=transformer, scheduler=CogVideoXDDIMScheduler())


def _ltx(seed: int):
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline, LTXVideoTransformer3DModel
    from transformers import ByT5Tokenizer

    transformer = _seeded(seed, lambda: LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=16,
        cross_attention_dim=32, num_layers=2, caption_channels=32,
    ))
    vae = _seeded(seed + 1, lambda: AutoencoderKLLTXVideo(
        latent_channels=8, block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
        spatio_temporal_scaling=(True, True, False, False), decoder_spatio_temporal_scaling=(True, True, False, False),
        layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1), patch_size=1, patch_size_t=1,
        encoder_causal=True, decoder_causal=False,
    ))
    vae.use_framewise_encoding = vae.use_framewise_decoding = False
    return LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=_umt5(seed + 2),
                       tokenizer=ByT5Tokenizer(), transformer=transformer)


def _mochi(seed: int):
    """Mochi, with its scheduler's timesteps rising as in genmo/mochi-1-preview (invert_sigmas)."""
    from diffusers import AutoencoderKLMochi, FlowMatchEulerDiscreteScheduler, MochiPipeline, MochiTransformer3DModel
    from transformers import ByT5Tokenizer

    transformer = _seeded(seed, lambda: MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=2, pooled_projection_dim=16,
        in_channels=12, qk_norm="rms_norm", text_embed_dim=32, time_embed_dim=4, activation_fn="swiglu",
        max_sequence_length=16,
    ))
    vae = _seeded(seed + 1, lambda: AutoencoderKLMochi(
        latent_channels=12, out_channels=3, encoder_block_out_channels=(32, 32, 32, 32),
        decoder_block_out_channels=(32, 32, 32, 32), layers_per_block=(1, 1, 1, 1, 1),
    ))
    return MochiPipeline(scheduler=FlowMatchEulerDiscreteScheduler(invert_sigmas=True), vae=vae,
                         text_encoder=_umt5(seed + 2), tokenizer=ByT5Tokenizer(), transformer=transformer)


def build_tiny_pipeline(family: str = "wan", seed: int = 0, dtype: torch.dtype = torch.float32):
    """A small offline pipeline of ``family`` (one of :data:`TINY_FAMILIES`).

    Real diffusers classes built from configs with seeded random weights (same seed, same weights),
    byte-level ``ByT5Tokenizer()`` tokenizers (no files), tiny text encoders. The Wan pipeline: a
    ``WanTransformer3DModel`` with 4 layers of 4 heads x 64 channels (head_dim 64, as the kernels serve
    it), a 3-stage ``AutoencoderKLWan`` (8x spatial, 4x temporal compression), a 2-layer
    ``UMT5EncoderModel`` and ``FlowMatchEulerDiscreteScheduler``. The others use 2 heads of 16 channels
    and 2-4 layers; at :func:`tiny_defaults` sizes every video token grid is at least 3 x 4 x 4.
    ``"wan-trained"`` and ``"wan-rich"`` are the trained tiny Wans of :mod:`vdit_accel.pipelines.toy.trained`
    (weights from the package).
    """
    if family in TRAINED_FAMILIES:
        return build_trained_pipeline(dtype=dtype, model=family)  # trained weights: ``seed`` does not apply
    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown tiny pipeline family {family!r}; available: {', '.join(TINY_FAMILIES + TRAINED_FAMILIES)}")
    if family in ("wan", "wan2.2", "skyreels_v2"):
        pipe = _wan(seed, family)
    elif family in ("cogvideox", "cogvideox_1_5"):
        pipe = _cogvideox(seed, family)
    else:
        pipe = {"hunyuan_video": _hunyuan_video, "hunyuan_video_1_5": _hunyuan_video_1_5, "ltx": _ltx,
                "mochi": _mochi}[family](seed)
    pipe.set_progress_bar_config(disable=True)
    for m in pipe.components.values():
        if isinstance(m, torch.nn.Module):
            m.eval().requires_grad_(False)
    return cast_pipeline(pipe, dtype)


# Tiny families that are a version of another family's architecture (same adapter).
_ADAPTER_FAMILY = {"wan2.2": "wan", "cogvideox_1_5": "cogvideox", "wan-trained": "wan", "wan-rich": "wan"}


def supported_models() -> list[tuple[str, tuple[str, ...]]]:
    """``(family, diffusers transformer class names)`` for every family :func:`build_tiny_pipeline` builds."""
    from .adapters import ADAPTERS

    by_family = {a.family: a.class_names for a in ADAPTERS}
    return [(f, by_family[_ADAPTER_FAMILY.get(f, f)]) for f in TINY_FAMILIES + TRAINED_FAMILIES]


def tiny_defaults(family: str = "wan") -> TinyDefaults:
    if family in TRAINED_FAMILIES:
        return model_spec(family).defaults
    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown tiny pipeline family {family!r}; available: {', '.join(TINY_FAMILIES + TRAINED_FAMILIES)}")
    return _DEFAULTS[family]
