"""The trained tiny Wan pipelines: their architectures, weight files and loader.

Real ``WanPipeline`` s whose components were trained on the procedural clips of
:mod:`vdit_accel.pipelines.toy` by ``pipelines/toy/train.py`` (commands and loss curves in
``benchmarks/results/``). Two models (:data:`MODELS`), each a :class:`TrainedModel`:

- ``"wan-trained"``: ``WanTransformer3DModel`` with 6 layers of 4 heads x 64 channels (FFN 1024, patch
  (1, 2, 2), 16 latent channels; 7.0 M parameters), trained on the basic scenes (one or two flat objects
  on plain, tinted or striped backgrounds) at 1,280 to 5,120 video tokens. Sizes: 17 frames at 128x128
  (a 5 x 16 x 16 grid, quick on a CPU) and, large, 17 frames at 256x256 (5 x 32 x 32 = 5,120 tokens).
- ``"wan-rich"``: the same blocks, 8 layers (32 heads in all; 9.1 M parameters), trained on the rich
  scenes (up to three objects that cross, hide each other, loop around the frame and pass behind
  pillars; textured backgrounds under a panning camera) up to its native size, 65 frames at 256x448:
  17 x 32 x 56 = 30,464 video tokens a forward, where a video DiT's attention dominates its cost.
  Captions up to 255 bytes (256 text tokens). Its transformer and text encoder started from
  ``wan-trained`` 's (two blocks added as copies whose output projections start at zero: the same
  function at step 0), its VAE was fine-tuned from ``wan-trained`` 's on rich clips.

Shared parts: ``AutoencoderKLWan`` (base 32 channels, ``dim_mult`` (1, 2, 2), 4x spatial / 4x temporal,
z_dim 16; 2.5 M parameters; per-channel ``latents_mean`` / ``latents_std`` measured on training clips and
stored with its weights; an 8x-spatial base-16 VAE did not learn the small objects), a 2-layer
``UMT5EncoderModel`` (d_model 64) over ``ByT5Tokenizer()`` 's 384 byte tokens trained with the
transformer (no dropout, so training and inference embed a caption identically), and
``FlowMatchEulerDiscreteScheduler``: the transformer predicts ``noise - latents`` at
``timestep = 1000 * sigma`` (trained with sigmas shifted by ``training_shift``, sampled at
``scheduler_shift``, chosen on the validation scenes). One video token is 8x8 pixels (VAE 4x, patch 2).

Weights live in ``pipelines/toy/weights/<name>/`` as fp16 safetensors (``transformer``, ``vae``,
``text_encoder``) and are loaded into float32 modules.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..defaults import TinyDefaults, cast_pipeline

WEIGHTS_ROOT = Path(__file__).resolve().parent / "weights"
COMPONENTS = ("transformer", "vae", "text_encoder")

_WAN_TRANSFORMER = dict(
    patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=64, in_channels=16, out_channels=16,
    text_dim=64, freq_dim=256, ffn_dim=1024, num_layers=6, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    eps=1e-6, rope_max_seq_len=1024,
)
_WAN_VAE = dict(base_dim=32, z_dim=16, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[True, True],
                scale_factor_spatial=4, scale_factor_temporal=4)
_UMT5 = dict(vocab_size=384, d_model=64, d_kv=16, d_ff=256, num_layers=2, num_heads=4, relative_attention_num_buckets=32,
             relative_attention_max_distance=128, dropout_rate=0.0)


@dataclass(frozen=True)
class TrainedModel:
    """One trained tiny pipeline: its architecture, its data, its sampling settings.

    ``max_sequence_length``: captions are padded to this many byte tokens, in training and at inference
    (the cross-attention sees the padding, so the length is part of the model). ``defaults``: the
    generation size of ``vdit-accel generate`` and the checks; ``large``: the larger size
    (``num_frames``, ``height``, ``width``). ``weights``: where its files are (default the package's
    ``pipelines/toy/weights/<name>``). ``scenes``: ``"basic"`` or ``"rich"``, which of
    :mod:`vdit_accel.pipelines.toy` 's scene sets it learned. ``guidance_scale`` / ``scheduler_shift`` /
    ``defaults.steps``: the sampling settings, chosen on the validation scenes, never on the check.
    """

    name: str
    transformer: dict
    max_sequence_length: int
    defaults: TinyDefaults
    large: dict
    scenes: str
    guidance_scale: float = 5.0
    scheduler_shift: float = 5.0
    training_shift: float = 3.0
    vae: dict = field(default_factory=lambda: dict(_WAN_VAE))
    text_encoder: dict = field(default_factory=lambda: dict(_UMT5))
    weights: Path | None = None  # default: pipelines/toy/weights/<name>

    @property
    def weights_dir(self) -> Path:
        return Path(self.weights) if self.weights is not None else WEIGHTS_ROOT / self.name

    @property
    def format(self) -> str:
        """The format tag in each weight file's header."""
        return f"vdit-accel {self.name} 1"

    def grid(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """The video token grid ``(t, h, w)`` of a generation of that many pixel frames and pixels."""
        px = self.vae["scale_factor_spatial"] * self.transformer["patch_size"][1]
        return (frames - 1) // self.vae["scale_factor_temporal"] + 1, height // px, width // px


def _defaults(frames: int, height: int, width: int, steps: int, max_sequence_length: int, guidance: float) -> TinyDefaults:
    return TinyDefaults(height=height, width=width, frames=frames, steps=steps, max_sequence_length=max_sequence_length,
                        call_kwargs={"guidance_scale": guidance})


# wan-trained: guidance 5, 40 steps, shift 5 read 0.95 of the validation videos right (H100,
# benchmarks/results/sweep-trained-validation-*.json; the former guidance 8, 20 steps, shift 3: 0.775).
WAN_TRAINED = TrainedModel(
    name="wan-trained", transformer=_WAN_TRANSFORMER, max_sequence_length=128,
    defaults=_defaults(17, 128, 128, 40, 128, 5.0), large=dict(num_frames=17, height=256, width=256), scenes="basic",
)
WAN_RICH = TrainedModel(
    name="wan-rich", transformer=dict(_WAN_TRANSFORMER, num_layers=8), max_sequence_length=256,
    defaults=_defaults(65, 256, 448, 40, 256, 5.0), large=dict(num_frames=65, height=256, width=448), scenes="rich",
)
MODELS: dict[str, TrainedModel] = {m.name: m for m in (WAN_TRAINED, WAN_RICH)}

# wan-trained's facts under their former names (its callers: the CLI's --large, the tests).
WEIGHTS_DIR = WAN_TRAINED.weights_dir
MAX_SEQUENCE_LENGTH = WAN_TRAINED.max_sequence_length
GUIDANCE_SCALE = WAN_TRAINED.guidance_scale
SCHEDULER_SHIFT = WAN_TRAINED.scheduler_shift
TRAINING_SHIFT = WAN_TRAINED.training_shift
TRAINED_DEFAULTS = WAN_TRAINED.defaults
LARGE_SIZE = WAN_TRAINED.large
TRANSFORMER_CONFIG = WAN_TRAINED.transformer
VAE_CONFIG = WAN_TRAINED.vae
TEXT_ENCODER_CONFIG = WAN_TRAINED.text_encoder


def model_spec(model: str | TrainedModel = "wan-trained") -> TrainedModel:
    """The :class:`TrainedModel` named ``model`` (one of :data:`MODELS`)."""
    if isinstance(model, TrainedModel):
        return model
    if model not in MODELS:
        raise ValueError(f"unknown trained model {model!r}; available: {', '.join(MODELS)}")
    return MODELS[model]


def build_components(seed: int = 0, latents_mean=None, latents_std=None, model: str | TrainedModel = "wan-trained"):
    """``(transformer, vae, text_encoder)`` of ``model`` 's architecture with seeded random weights, in
    training mode (the starting point of :mod:`.train`; the loader fills them from files).
    ``latents_mean`` / ``latents_std``: the VAE's per-channel latent statistics (16 each; identity if None)."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    spec = model_spec(model)
    z = spec.vae["z_dim"]
    mean = [0.0] * z if latents_mean is None else [float(v) for v in latents_mean]
    std = [1.0] * z if latents_std is None else [float(v) for v in latents_std]
    if len(mean) != z or len(std) != z or min(std) <= 0:
        raise ValueError(f"latents_mean / latents_std need {z} values each (std > 0), got {len(mean)} / {len(std)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = WanTransformer3DModel(**spec.transformer)
        vae = AutoencoderKLWan(**spec.vae, latents_mean=mean, latents_std=std)
        text_encoder = UMT5EncoderModel(UMT5Config(**spec.text_encoder))
    return transformer, vae, text_encoder


def make_pipeline(transformer, vae, text_encoder, model: str | TrainedModel = "wan-trained"):
    """A ``WanPipeline`` around the three modules, with the tokenizer and scheduler they are trained for."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
    from transformers import ByT5Tokenizer

    pipe = WanPipeline(tokenizer=ByT5Tokenizer(), text_encoder=text_encoder, vae=vae, transformer=transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=model_spec(model).scheduler_shift))
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


def save_trained_weights(out_dir: str | Path, transformer, vae, text_encoder, metadata: dict | None = None,
                         model: str | TrainedModel = "wan-trained") -> list[Path]:
    """Write the three components as fp16 safetensors into ``out_dir`` (the VAE's latent statistics,
    the model's format tag and ``metadata`` go into each file's header). Returns the paths."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    header = {"format": model_spec(model).format, "latents_mean": json.dumps(list(vae.config.latents_mean)),
              "latents_std": json.dumps(list(vae.config.latents_std))}
    header.update({k: json.dumps(v) if not isinstance(v, str) else v for k, v in (metadata or {}).items()})
    paths = []
    for name, module in zip(COMPONENTS, (transformer, vae, text_encoder)):
        state = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in module.state_dict().items()}
        path = out_dir / f"{name}.safetensors"
        save_file(state, str(path), metadata=header)
        paths.append(path)
    return paths


def weights_available(weights_dir: str | Path | None = None, model: str | TrainedModel = "wan-trained") -> bool:
    """Whether ``weights_dir`` (default: the package's folder of ``model``) holds the three weight files."""
    weights_dir = Path(weights_dir) if weights_dir is not None else model_spec(model).weights_dir
    return all((weights_dir / f"{n}.safetensors").is_file() for n in COMPONENTS)


def load_trained_components(weights_dir: str | Path | None = None, model: str | TrainedModel = "wan-trained"):
    """``(transformer, vae, text_encoder)`` of ``model`` in float32, eval mode, from the fp16 files in
    ``weights_dir`` (default: the weights shipped in the package)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    spec = model_spec(model)
    weights_dir = Path(weights_dir) if weights_dir is not None else spec.weights_dir
    missing = [n for n in COMPONENTS if not (weights_dir / f"{n}.safetensors").is_file()]
    if missing:
        raise FileNotFoundError(
            f"no trained weights of {spec.name!r} ({', '.join(n + '.safetensors' for n in missing)}) in "
            f"{str(weights_dir)!r}; train them with `python -m vdit_accel.pipelines.toy.train --model {spec.name} --out DIR` "
            f"and copy DIR's transformer, vae and text_encoder .safetensors into {str(spec.weights_dir)!r}, or pass "
            "weights_dir=DIR")
    with safe_open(str(weights_dir / "vae.safetensors"), "pt") as f:
        header = f.metadata() or {}
    if header.get("format") != spec.format:
        raise ValueError(f"{str(weights_dir / 'vae.safetensors')!r} is not a {spec.format!r} file "
                         f"(format {header.get('format')!r}); retrain with pipelines/toy/train.py --model {spec.name}")
    modules = build_components(0, json.loads(header["latents_mean"]), json.loads(header["latents_std"]), model=spec)
    for name, module in zip(COMPONENTS, modules):
        state = load_file(str(weights_dir / f"{name}.safetensors"))
        module.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        module.eval().requires_grad_(False)
    return modules


def build_trained_pipeline(weights_dir: str | Path | None = None, dtype: torch.dtype = torch.float32,
                           model: str | TrainedModel = "wan-trained"):
    """The trained tiny ``WanPipeline`` ``model`` (see the module docstring), offline. ``weights_dir``: a
    directory written by ``pipelines/toy/train.py`` (default: the weights shipped in the package)."""
    spec = model_spec(model)
    return cast_pipeline(make_pipeline(*load_trained_components(weights_dir, spec), model=spec), dtype)
