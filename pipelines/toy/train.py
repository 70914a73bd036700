"""Train the tiny Wan pipelines ``"wan-trained"`` and ``"wan-rich"`` on procedural toy videos (vdit_accel.pipelines.toy).

Two stages, one checkpoint directory:

1. **VAE** (``AutoencoderKLWan``, pipelines/toy/trained.py): busy clips (1-5 objects of any size,
   ``toy.sample_busy_scenes``) rendered on the device each step at a few short sizes (the causal 3D
   convolutions see every size the same way); loss = L1 + L2 of the pixels before the decoder's clamp,
   object pixels weighted 5x, plus a small KL term; the posterior std starts small (see ``main``). Seen
   on the CPU: this autoencoder learns the background at once and objects only after hundreds of steps
   (sparse objects: slower still), hence busy clips, the weighting and the unclamped loss. After
   ``--vae-minutes`` the check below runs on reconstructions of the check captions' clips; below 90%
   the VAE trains on, 30 s at a time, up to ``--vae-max-minutes``. Then the per-channel latent mean and
   std are measured on training clips of the transformer's sizes.
2. **Transformer + text encoder**: a pool of training clips is rendered and encoded once per command
   (normalised posterior means), then rectified flow as diffusers' ``FlowMatchEulerDiscreteScheduler``
   runs it: ``x_t = (1 - sigma) x_0 + sigma * noise``, target ``noise - x_0``, ``timestep = 1000 sigma``,
   ``sigma`` uniform then shifted by the scheduler's shift (3.0), so training sees the noise levels
   inference visits (``--shift-tokens N``: a clip of n tokens with 3.0 * sqrt(n / N), SD3's
   resolution-dependent shift). Sizes are mixed per step (a fixed token budget per batch): 17x128x128 (the CPU
   default, 1,280 tokens), 17x96x160, 17x64x64, 33x128x128 and 17x256x256 (5,120 tokens); RoPE makes
   one model serve them all. 10% of captions are dropped (classifier-free guidance); 20% of batches pad
   the captions to 512 tokens instead of 128 (WanPipeline's default), so either padding works. EMA of
   the weights (0.999) is what ships. The learning rate follows a cosine over ``--dit-minutes`` of
   training time (not steps), so it ends annealed however fast the GPU is.

bf16 autocast on CUDA, float32 on the CPU. Everything random is seeded: the VAE's clips depend on
(seed, step), so a resumed VAE stage sees the clips it would have seen; the transformer's pool on
(seed, command number), so a second command trains on new clips.

Checkpoint (``--out``, flat, every file < 16 MB): ``transformer.safetensors``, ``vae.safetensors``,
``text_encoder.safetensors`` (fp16, EMA: the shippable weights, loaded by
``build_trained_pipeline(weights_dir)``), ``resume.safetensors`` (the raw training weights, fp16; AdamW's
moments are not kept: a resumed run warms its learning rate up again over 100 steps), ``state.json``
(stage, steps, seconds, loss log, the commands), ``loss.png``. ``--minutes`` bounds the whole command:
the run stops cleanly and saves before it.

GPU (one H100; each command resumes from the previous one's checkpoint, carried back as .ckpt/; the
install lines of benchmarks/gpu_run.sh first, then from the repository root R). The shipped weights
(pipelines/toy/weights/wan-trained/) came from these four, 24.2 min of device time in all
(benchmarks/results/train-tiny-nvidia-h100-80gb-hbm3-20261122.json has their logs):

    cd /tmp && python3 $R/pipelines/toy/train.py --out $OUT/ckpt --minutes 8.9
    cd /tmp && python3 $R/pipelines/toy/train.py --resume $R/.ckpt --out $OUT/ckpt --minutes 8.4
    cd /tmp && python3 $R/pipelines/toy/train.py --resume $R/.ckpt --out $OUT/ckpt --minutes 7.5 --dit-minutes 18
    cd /tmp && python3 $R/pipelines/toy/train.py --resume $R/.ckpt --out $OUT/ckpt --minutes 2.1 --dit-minutes 20

(the fourth resumed from the third's raw weights with its EMA slots set to them: the third's EMA files
did not come back from the device, whose tool returns at most 8 files; keep $OUT to the checkpoint).

``--model wan-rich`` trains the testbed on the rich scenes (``toy.sample_rich_scenes``; the
``RICH`` preset: the VAE on rich and busy clips at 4:7, the transformer from 17x128x224 to its native
65x256x448) -- started from wan-trained's weights with ``--init-from wan-trained`` (:func:`init_from`).
On the device machine through ``benchmarks/gpu_train.sh wan-rich ...`` (install, resume, pack the
checkpoint back in 15 MB parts); the commands so far and their logs are in
``benchmarks/results/train-rich-*.json``. Between sessions the checkpoint is the committed
``pipelines/toy/weights/wan-rich/`` (EMA weights and state.json; the raw weights restart from them).

CPU: ``--smoke`` runs every stage at toy size in seconds and then loads the result through
``build_trained_pipeline``, generates with ``WanPipeline`` and checks the video (untrained: only that it
runs); ``--smoke --dit-steps 300`` shows the flow loss falling. ``--plot-only DIR`` redraws DIR/loss.png.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vdit_accel.pipelines import toy
from vdit_accel.pipelines.toy import trained

_T0 = time.monotonic()


@dataclass
class TrainConfig:
    """One preset. Sizes are (frames, height, width); VAE buckets carry a batch size, transformer buckets a
    share of the steps (each step fills ``tokens_per_step`` video tokens from one bucket). ``model``: the
    :data:`vdit_accel.pipelines.toy.trained.MODELS` entry trained (architecture, caption length, scene set)."""

    model: str = "wan-trained"

    # Single frames (the causal encoder's first-frame path: spatial only) learn fastest, seen on the CPU;
    # a third of the steps are images.
    vae_buckets: list = field(default_factory=lambda: [(1, 128, 128, 64), (9, 128, 128, 16), (1, 96, 160, 64),
                                                       (17, 128, 128, 8), (5, 128, 128, 24), (1, 256, 256, 16),
                                                       (5, 256, 256, 6)])
    vae_lr: float = 3e-4  # H100, 90 s: 20/20 check captions readable at step 246 (1e-3: 7/20 at 216)
    vae_kl: float = 1e-4
    vae_object_weight: float = 4.0
    stats_clips: int = 256
    check_size: tuple = (17, 128, 128)  # reconstructions of the check scenes are checked at this size
    check_count: int = 24  # how many of them
    vae_check_target: float = 0.9  # fraction of single-object reconstructions the check must pass
    dit_buckets: list = field(default_factory=lambda: [(17, 128, 128, 0.4), (17, 96, 160, 0.1), (17, 64, 64, 0.05),
                                                       (33, 128, 128, 0.15), (17, 256, 256, 0.3)])
    tokens_per_step: int = 65536
    pool_clips: int = 16000
    pool_seconds: float = 60.0
    encode_pixels: int = 1 << 24  # pixels per VAE encode call when building the pool
    dit_lr: float = 3e-4
    warmup_steps: int = 300
    resume_warmup_steps: int = 100
    final_lr_fraction: float = 0.1
    caption_dropout: float = 0.1
    long_text_prob: float = 0.2
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    log_every: int = 50
    # None: every size trains with the model's training_shift. N: a clip of n video tokens trains with
    # training_shift * sqrt(n / N), SD3's resolution-dependent shift (Esser et al. 2024, sec. 5.3.2): n
    # tokens of one image see the noise averaged over n, so the same sigma leaves a large clip's layout
    # more visible, and without the shift the high-noise steps where the layout forms are rarely trained.
    shift_tokens: int | None = None
    # 0: the plain flow loss. W > 0: the squared error of a latent position some object covers (in any of
    # the pixels and frames it encodes) weighs 1 + W, the rest 1, normalised by the mean weight. Objects
    # cover 5.4% of a rich clip's latent positions at 17x128x224 and 3.4% at 65x256x448 (16 clips), so in
    # the plain loss the textured, panning backgrounds outweigh them 20-30:1; W = 6 gives the captioned
    # things 20-28% of the weight without changing the per-position optimum (each position's prediction
    # still targets the conditional mean: only how capacity is spent changes).
    dit_object_weight: float = 0.0


SMOKE = TrainConfig(
    vae_buckets=[(5, 32, 32, 1)], stats_clips=2, check_size=(5, 32, 32), check_count=2, dit_buckets=[(5, 32, 32, 0.5), (9, 64, 32, 0.5)],
    tokens_per_step=64, pool_clips=16, pool_seconds=60.0, warmup_steps=20, resume_warmup_steps=5, log_every=20,
)

# wan-rich: the VAE fine-tuned from wan-trained's on rich clips (and busy ones, every other step) at its
# 4:7 aspect; the transformer from its native 65x256x448 (30,464 tokens) down to 17x128x224 (2,240):
# the small sizes teach captions cheaply, the native ones the attention the model is a testbed for.
RICH = TrainConfig(
    model="wan-rich",
    vae_buckets=[(1, 256, 448, 16), (9, 128, 224, 12), (17, 128, 224, 6), (5, 256, 448, 4), (1, 128, 224, 48),
                 (9, 256, 448, 2)],
    vae_lr=1e-4, check_size=(17, 128, 224),
    dit_buckets=[(17, 128, 224, 0.2), (33, 128, 224, 0.2), (65, 128, 224, 0.15), (33, 256, 448, 0.2),
                 (65, 256, 448, 0.25)],
    pool_clips=12000, dit_lr=2e-4, warmup_steps=200,
)
SMOKE_RICH = TrainConfig(
    model="wan-rich", vae_buckets=[(5, 32, 64, 1)], stats_clips=2, check_size=(5, 32, 64), check_count=2,
    dit_buckets=[(5, 32, 64, 0.5), (9, 64, 112, 0.5)], tokens_per_step=64, pool_clips=16, pool_seconds=60.0,
    warmup_steps=20, resume_warmup_steps=5, log_every=20,
)
PRESETS = {("wan-trained", False): TrainConfig(), ("wan-trained", True): SMOKE, ("wan-rich", False): RICH,
           ("wan-rich", True): SMOKE_RICH}


def _spec(cfg: TrainConfig):
    return trained.model_spec(cfg.model)


def _scenes(cfg: TrainConfig, n: int, seed: int) -> list:
    """``n`` training scenes of the model's scene set."""
    if _spec(cfg).scenes == "rich":
        return toy.sample_rich_scenes(n, seed)
    return toy.sample_scenes(n, seed)


def _vae_scenes(cfg: TrainConfig, n: int, seed: int, step: int) -> list:
    """The VAE's clips: busy ones (many object pixels); for a rich model rich ones every other step."""
    if _spec(cfg).scenes == "rich" and step % 2 == 1:
        return toy.sample_rich_scenes(n, seed, split="any")
    return toy.sample_busy_scenes(n, seed)


def _elapsed() -> float:
    return time.monotonic() - _T0


def _log(msg: str, **kv):
    extra = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in kv.items())
    print(f"[{_elapsed():7.1f}s] {msg} {extra}".rstrip(), flush=True)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


def _lr(base: float, step: int, warmup: int, progress: float, final_fraction: float) -> float:
    """Linear warm-up over ``warmup`` steps, then a cosine from ``base`` to ``final_fraction * base`` as
    ``progress`` (the fraction of the training time spent) goes from 0 to 1."""
    p = min(max(progress, 0.0), 1.0)
    cos = final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * p))
    return base * cos * min(1.0, (step + 1) / max(1, warmup))


# ---------------------------------------------------------------------------------------------------
# checkpoint


def _save(out: Path, state: dict, transformer, vae, text_encoder, ema_transformer, ema_text_encoder):
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    meta = {"steps": {"vae": state["vae"]["steps"], "dit": state["dit"]["steps"]}, "seed": state["seed"]}
    trained.save_trained_weights(out, ema_transformer, vae, ema_text_encoder, metadata=meta, model=state["model"])
    raw = {}
    parts = [("transformer.", transformer), ("text_encoder.", text_encoder)]
    if not state["vae"]["done"]:  # once done, vae.safetensors holds exactly the weights in use
        parts.append(("vae.", vae))
    for prefix, module in parts:
        raw.update({prefix + k: v.detach().to("cpu", torch.float16).contiguous() for k, v in module.state_dict().items()})
    save_file(raw, str(out / "resume.safetensors"))
    (out / "state.json").write_text(json.dumps(state, indent=1) + "\n")
    try:
        plot_losses(state, out / "loss.png")
    except ImportError as e:  # Pillow missing: the log in state.json is enough to redraw it elsewhere
        _log(f"loss.png not drawn ({e}); redraw with --plot-only")


def _load(src: Path):
    """(state, modules) from a checkpoint directory; modules = (transformer, vae, text_encoder,
    ema_transformer, ema_text_encoder), all float32 in training mode."""
    from safetensors.torch import load_file

    state = json.loads((src / "state.json").read_text())
    state.setdefault("model", "wan-trained")
    ema_t, vae, ema_te = trained.load_trained_components(src, model=state["model"])
    transformer, _, text_encoder = trained.build_components(state["seed"], vae.config.latents_mean, vae.config.latents_std,
                                                            model=state["model"])
    if (src / "resume.safetensors").is_file():
        raw = load_file(str(src / "resume.safetensors"))
        for prefix, module in (("transformer.", transformer), ("text_encoder.", text_encoder), ("vae.", vae)):
            if prefix == "vae." and state["vae"]["done"]:
                continue  # vae.safetensors is the VAE in use
            module.load_state_dict({k[len(prefix):]: v.float() for k, v in raw.items() if k.startswith(prefix)},
                                   strict=True)
    elif state["vae"]["done"]:
        # A checkpoint of the shippable (EMA) weights only, as committed between sessions: training goes on
        # from them (the raw weights' last steps are lost; the EMA restarts from itself).
        _log(f"{src} has no resume.safetensors: the raw weights start from the EMA weights")
        transformer.load_state_dict(ema_t.state_dict())
        text_encoder.load_state_dict(ema_te.state_dict())
    else:
        raise FileNotFoundError(f"{src} has no resume.safetensors and its VAE stage is not done: cannot resume")
    for m in (transformer, vae, text_encoder, ema_t, ema_te):
        m.train().requires_grad_(True)
    for m in (ema_t, ema_te):
        m.requires_grad_(False)
    return state, (transformer, vae, text_encoder, ema_t, ema_te)


# ---------------------------------------------------------------------------------------------------
# stage 1: the VAE


@torch.no_grad()
def init_vae_per_frame(vae):
    """Start the VAE as a per-frame 2D autoencoder, as Wan's own VAE was started from an image one: every
    causal 3D convolution sees only the current frame (its kernel's past slices zeroed), the temporal
    downsampling keeps one frame of two and the temporal upsampling repeats each frame (identity time
    convolutions, Wan's ``init_weight`` / ``init_weight2``). Time mixing is then learned from there. Seen
    on the CPU: from the default init a video VAE learns objects far slower than an image one."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanResample

    time_convs = set()
    for m in vae.modules():
        if isinstance(m, WanResample) and m.mode in ("downsample3d", "upsample3d"):
            w = m.time_conv.weight  # [out, in, 3, 1, 1]
            w.zero_()
            m.time_conv.bias.zero_()
            eye = torch.eye(w.shape[1], dtype=w.dtype)
            if m.mode == "downsample3d":  # windows (previous, this, next) with stride 2: keep "this"
                w[:, :, 1, 0, 0] = eye
            else:  # two output frames, both the current input frame
                w[: w.shape[0] // 2, :, -1, 0, 0] = eye
                w[w.shape[0] // 2:, :, -1, 0, 0] = eye
            time_convs.add(m.time_conv)
    for m in vae.modules():
        if isinstance(m, WanCausalConv3d) and m not in time_convs and m.weight.shape[2] > 1:
            m.weight[:, :, :-1] = 0.0


@torch.no_grad()
def init_from(transformer, vae, text_encoder, source: str) -> None:
    """Start from the shipped model ``source`` 's weights: its VAE (with its latent statistics) and text
    encoder as they are; its transformer's embeddings, head and blocks, block ``i`` of the new depth
    ``n`` taken from block ``floor(i * m / n)`` of its ``m``. A block taken a second time is a copy whose
    three output projections (self-attention, cross-attention, feed-forward) start at zero, so it adds
    nothing to the residual stream: the deeper model computes exactly the source's function at step 0,
    and the copies' inputs are meaningful features from the first gradient on."""
    src_t, src_vae, src_te = trained.load_trained_components(model=source)
    vae.load_state_dict(src_vae.state_dict())
    vae.register_to_config(latents_mean=list(src_vae.config.latents_mean), latents_std=list(src_vae.config.latents_std))
    text_encoder.load_state_dict(src_te.state_dict())
    src, dst = src_t.state_dict(), transformer.state_dict()
    m, n = len(src_t.blocks), len(transformer.blocks)
    if n < m:
        raise ValueError(f"init_from needs at least the source's {m} blocks, the model has {n}")
    mapping = [i * m // n for i in range(n)]
    for key in dst:
        if key.startswith("blocks."):
            _, i, rest = key.split(".", 2)
            i = int(i)
            value = src[f"blocks.{mapping[i]}.{rest}"]
            if i > 0 and mapping[i] == mapping[i - 1] and rest.startswith(("attn1.to_out.0.", "attn2.to_out.0.", "ffn.net.2.")):
                value = torch.zeros_like(value)
            dst[key] = value.clone()
        else:
            dst[key] = src[key].clone()
    transformer.load_state_dict(dst)


def _decode_unclamped(vae, z: torch.Tensor) -> torch.Tensor:
    """``vae.decode(z)`` before its clamp to [-1, 1], read off the decoder's per-frame outputs by a forward
    hook: through the clamp a pixel pushed past -1 gets no gradient again, and the dark backgrounds sit
    near -1 (seen on the CPU: the whole output died there)."""
    chunks = []
    handle = vae.decoder.register_forward_hook(lambda module, args, out: chunks.append(out))
    try:
        vae.decode(z)
    finally:
        handle.remove()
    return torch.cat(chunks, 2)


def _kl(dist) -> torch.Tensor:
    mean, logvar = dist.mean.float(), dist.logvar.float()
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()


def train_vae(cfg: TrainConfig, state: dict, vae, opt, device, deadline: float, until_seconds: float,
              schedule_seconds: float, first_step: int, max_steps: int | None) -> bool:
    """Train until ``until_seconds`` of VAE training in all (True), the command's deadline (False) or
    ``max_steps`` (True). The learning rate's cosine spans ``schedule_seconds``; its warm-up starts at
    ``first_step`` (this command's first)."""
    s = state["vae"]
    params = [p for p in vae.parameters() if p.requires_grad]
    window, t_last = [], time.monotonic()
    vae.train()
    while True:
        if max_steps is not None and s["steps"] >= max_steps:
            return True
        if s["seconds"] >= until_seconds:
            return True
        if _elapsed() >= deadline:
            return False
        t0 = time.monotonic()
        step = s["steps"]
        f, h, w, b = cfg.vae_buckets[step % len(cfg.vae_buckets)]
        scenes = _vae_scenes(cfg, b, int(_rng(state["seed"], 1, step).integers(2**31)), step)
        x, mask = toy.render(scenes, f, h, w, device=device, return_mask=True)
        weight = 1.0 + cfg.vae_object_weight * mask
        warmup = 50 if first_step == 0 else cfg.resume_warmup_steps
        lr = _lr(cfg.vae_lr, step - first_step, warmup, s["seconds"] / schedule_seconds, 0.1)
        for g in opt.param_groups:
            g["lr"] = lr
        with _autocast(device):
            dist = vae.encode(x).latent_dist
            z = dist.sample()
            y = _decode_unclamped(vae, z)
        d = (y.float() - x)
        recon = (weight * (d.abs() + d * d)).mean() / weight.mean()
        kl = _kl(dist)
        loss = recon + cfg.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if not torch.isfinite(torch.nn.utils.clip_grad_norm_(params, 1.0)):
            s["skipped"] = s.get("skipped", 0) + 1  # a non-finite gradient: no update, counted
            _log("vae: non-finite gradient, step skipped", step=step, skipped=s["skipped"])
            s["steps"] += 1
            continue
        opt.step()
        if device.type == "cuda" and step % 10 == 0:
            torch.cuda.synchronize()
        s["steps"] += 1
        s["seconds"] += time.monotonic() - t0
        window.append((recon.item(), kl.item()))
        if s["steps"] % cfg.log_every == 0 or s["steps"] == 1:
            r, k = np.mean(window, axis=0)
            s["log"].append([s["steps"], round(float(r), 5), round(float(k), 4)])
            dt = time.monotonic() - t_last
            _log("vae", step=s["steps"], recon=float(r), kl=float(k), lr=lr, steps_per_s=len(window) / max(dt, 1e-9))
            window, t_last = [], time.monotonic()


@torch.no_grad()
def _encode(vae, x: torch.Tensor) -> torch.Tensor:
    return vae.encode(x).latent_dist.mode()


@torch.no_grad()
def latent_stats(cfg: TrainConfig, state: dict, vae, device) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the posterior means over ``stats_clips`` training clips of the
    transformer's sizes."""
    vae.eval()
    total, total_sq, count = 0.0, 0.0, 0
    per = max(1, cfg.stats_clips // len(cfg.dit_buckets))
    for i, (f, h, w, _) in enumerate(cfg.dit_buckets):
        chunk = max(1, min(per, cfg.encode_pixels // (f * h * w)))
        for j in range(0, per, chunk):
            n = min(chunk, per - j)
            scenes = _scenes(cfg, n, int(_rng(state["seed"], 2, i, j).integers(2**31)))
            with _autocast(device):
                z = _encode(vae, toy.render(scenes, f, h, w, device=device)).float()
            total = total + z.sum((0, 2, 3, 4)).double()
            total_sq = total_sq + z.pow(2).sum((0, 2, 3, 4)).double()
            count += z.numel() // z.shape[1]
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(1e-8).sqrt()
    vae.train()
    return [round(float(v), 5) for v in mean], [round(float(v), 5) for v in std]


@torch.no_grad()
def vae_check(vae, device, size: tuple[int, int, int], count: int = 24, scenes: str = "basic") -> dict:
    """The check of vdit_accel.pipelines.toy on VAE reconstructions of (the first ``count`` of) the check
    scenes (``scenes``: the model's set, ``"basic"`` or ``"rich"``): what a perfect transformer could
    score at most; and the reconstructions' PSNR."""
    vae.eval()
    singles, twos = toy.rich_check_scenes() if scenes == "rich" else toy.check_scenes()
    singles, twos = singles[:count], twos[:max(0, count - len(singles))]
    ok, psnr = [], []
    for scene in singles + twos:
        x = toy.render([scene], *size, device=device)
        with _autocast(device):
            y = vae.decode(_encode(vae, x)).sample.float()
        frames = ((y[0].permute(1, 2, 3, 0).cpu().numpy() + 1) * 127.5).clip(0, 255).astype(np.uint8)
        ok.append(toy.check_video(frames, scene.caption)["ok"])
        psnr.append(float(10 * torch.log10(4.0 / (y - x).pow(2).mean())))
    vae.train()
    return {"size": list(size), "single_ok": int(sum(ok[:len(singles)])), "single": len(singles),
            "two_ok": int(sum(ok[len(singles):])), "two": len(twos), "psnr_db": round(float(np.mean(psnr)), 2)}


# ---------------------------------------------------------------------------------------------------
# stage 2: transformer and text encoder


@dataclass
class _Bucket:
    frames: int
    height: int
    width: int
    share: float
    batch: int
    latents: list = field(default_factory=list)  # tensors [n, C, T, h, w], normalised
    ids: list = field(default_factory=list)
    masks: list = field(default_factory=list)
    objects: list = field(default_factory=list)  # bool [n, 1, T, h, w]: latent_object_mask (object weighting only)

    @property
    def size(self) -> int:
        return sum(x.shape[0] for x in self.latents)


def latent_object_mask(cover: torch.Tensor, temporal: int, spatial: int) -> torch.Tensor:
    """Which latent positions an object covers: ``cover`` ``[B, 1, F, H, W]`` (``toy.render``'s mask, F =
    temporal * k + 1) as bool ``[B, 1, 1 + k, H / spatial, W / spatial]``, True where any pixel of any frame
    the position encodes is covered (the causal VAE: latent frame 0 is pixel frame 0, latent frame j > 0
    pixel frames temporal * (j - 1) + 1 .. temporal * j)."""
    first = cover[:, :, :1].expand(-1, -1, temporal - 1, -1, -1)  # pad frame 0 to a full window
    padded = torch.cat([first, cover], 2)
    return F.max_pool3d(padded.float(), (temporal, spatial, spatial)) > 0


def _tokens(cfg: TrainConfig, f: int, h: int, w: int) -> int:
    return int(np.prod(_spec(cfg).grid(f, h, w)))


@torch.no_grad()
def build_pool(cfg: TrainConfig, state: dict, vae, device, seconds: float) -> list[_Bucket]:
    """Render and encode training clips for every bucket, round-robin, until each has its share of
    ``pool_clips`` (shares = expected clips consumed) or ``seconds`` pass."""
    vae.eval()
    mean = torch.tensor(vae.config.latents_mean, device=device).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, device=device).view(1, -1, 1, 1, 1)
    buckets = [_Bucket(f, h, w, share, max(1, cfg.tokens_per_step // _tokens(cfg, f, h, w)))
               for f, h, w, share in cfg.dit_buckets]
    demand = np.array([b.share * b.batch for b in buckets])
    targets = np.maximum(np.ceil(cfg.pool_clips * demand / demand.sum()).astype(int), [b.batch for b in buckets])
    t0, chunk_id = time.monotonic(), 0
    store = torch.bfloat16 if device.type == "cuda" else torch.float32

    def done() -> bool:
        if all(b.size >= t for b, t in zip(buckets, targets)):
            return True
        return time.monotonic() - t0 > seconds and all(b.size >= b.batch for b in buckets)

    while not done():
        for i, b in enumerate(buckets):
            if b.size >= targets[i] or done():
                continue
            n = int(min(targets[i] - b.size, max(1, cfg.encode_pixels // (b.frames * b.height * b.width))))
            scenes = _scenes(cfg, n, int(_rng(state["seed"], 3, state["run"], i, chunk_id).integers(2**31)))
            chunk_id += 1
            x, cover = toy.render(scenes, b.frames, b.height, b.width, device=device, return_mask=True)
            with _autocast(device):
                z = _encode(vae, x).float()
            b.latents.append(((z - mean) / std).to(store))
            if cfg.dit_object_weight:
                b.objects.append(latent_object_mask(cover, vae.config.scale_factor_temporal,
                                                    vae.config.scale_factor_spatial))
            ids, mask = trained.tokenize_captions([s.caption for s in scenes], _spec(cfg).max_sequence_length)
            b.ids.append(ids.to(device))
            b.masks.append(mask.to(device))
    for b in buckets:
        b.latents, b.ids, b.masks = torch.cat(b.latents), torch.cat(b.ids), torch.cat(b.masks)
        b.objects = torch.cat(b.objects) if b.objects else None
    vae.train()
    _log("pool", seconds=time.monotonic() - t0,
         clips=" ".join(f"{b.frames}x{b.height}x{b.width}:{b.latents.shape[0]}(batch {b.batch}, shift "
                        f"{training_shift(cfg, b.latents.shape[2:]):.2f})" for b in buckets))
    return buckets


def _ema_update(ema, model, decay: float):
    with torch.no_grad():
        e = [p for p in ema.parameters()]
        m = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(e, m, 1.0 - decay)


def parse_buckets(items: list[str]) -> list[tuple[int, int, int, float]]:
    """``["17x128x224:0.5", ...]`` as ``[(17, 128, 224, 0.5), ...]``: sizes the VAE and the patch divide (frames
    4k + 1, height and width multiples of 8), positive shares (normalised when the pool is drawn from)."""
    out = []
    for item in items:
        try:
            size, share = item.split(":")
            f, h, w = (int(x) for x in size.split("x"))
            share = float(share)
        except ValueError:
            raise ValueError(f"{item!r} is not FRAMESxHEIGHTxWIDTH:SHARE") from None
        if f % 4 != 1 or h % 8 or w % 8 or min(f, h, w) <= 0 or not share > 0:
            raise ValueError(f"{item!r}: frames must be 4k+1, height and width multiples of 8, the share positive")
        out.append((f, h, w, share))
    return out


def training_shift(cfg: TrainConfig, latent_thw) -> float:
    """The flow-matching shift a clip of latent size ``(T, h, w)`` trains with (see ``shift_tokens``)."""
    base = _spec(cfg).training_shift
    if cfg.shift_tokens is None:
        return base
    p = trained.model_spec(cfg.model).transformer["patch_size"]
    tokens = math.prod(n // k for n, k in zip(latent_thw, p))
    return base * math.sqrt(tokens / cfg.shift_tokens)


def train_dit(cfg: TrainConfig, state: dict, modules, pool: list[_Bucket], device, deadline: float,
              dit_seconds: float, max_steps: int | None):
    transformer, vae, text_encoder, ema_t, ema_te = modules
    s = state["dit"]
    params = list(transformer.parameters()) + list(text_encoder.parameters())
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(params, lr=cfg.dit_lr, betas=(0.9, 0.99), weight_decay=0.01, fused=fused)
    first = s["steps"]
    warmup = cfg.warmup_steps if first == 0 else cfg.resume_warmup_steps
    empty_ids, empty_mask = trained.tokenize_captions([""], _spec(cfg).max_sequence_length)
    empty_ids, empty_mask = empty_ids.to(device), empty_mask.to(device)
    shares = np.array([b.share for b in pool])
    shares = shares / shares.sum()
    window, t_last = [], time.monotonic()
    transformer.train()
    text_encoder.train()
    while True:
        if s["seconds"] >= dit_seconds or _elapsed() >= deadline or (max_steps is not None and s["steps"] >= max_steps):
            break
        t0 = time.monotonic()
        step = s["steps"]
        rng = _rng(state["seed"], 4, step)
        b = pool[int(rng.choice(len(pool), p=shares))]
        gen = torch.Generator(device=device).manual_seed(int(rng.integers(2**62)))
        idx = torch.randint(0, b.latents.shape[0], (b.batch,), device=device, generator=gen)
        x0 = b.latents[idx].float()
        ids, mask = b.ids[idx], b.masks[idx]
        drop = torch.rand(b.batch, device=device, generator=gen) < cfg.caption_dropout
        ids = torch.where(drop[:, None], empty_ids, ids)
        mask = torch.where(drop[:, None], empty_mask, mask)
        if rng.random() < cfg.long_text_prob:  # WanPipeline's default padding: 512 tokens
            ids, mask = F.pad(ids, (0, 512 - ids.shape[1])), F.pad(mask, (0, 512 - mask.shape[1]))
        u = torch.rand(b.batch, device=device, generator=gen)
        shift = training_shift(cfg, b.latents.shape[2:])
        sigma = shift * u / (1 + (shift - 1) * u)
        noise = torch.randn(x0.shape, device=device, generator=gen)
        sig = sigma.view(-1, 1, 1, 1, 1)
        xt = (1 - sig) * x0 + sig * noise
        lr = _lr(cfg.dit_lr, step - first, warmup, s["seconds"] / dit_seconds, cfg.final_lr_fraction)
        for g in opt.param_groups:
            g["lr"] = lr
        with _autocast(device):
            emb = trained.caption_embeddings(text_encoder, ids, mask)
            pred = transformer(hidden_states=xt, timestep=sigma * 1000.0, encoder_hidden_states=emb, return_dict=False)[0]
        if b.objects is None:
            loss = F.mse_loss(pred.float(), noise - x0)
        else:
            weight = 1.0 + cfg.dit_object_weight * b.objects[idx].float()
            loss = (weight * (pred.float() - (noise - x0)).square()).mean() / weight.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if not torch.isfinite(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)):
            s["skipped"] = s.get("skipped", 0) + 1  # a non-finite gradient: no update, counted
            _log("dit: non-finite gradient, step skipped", step=step, skipped=s["skipped"])
            s["steps"] += 1
            continue
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        _ema_update(ema_t, transformer, decay)
        _ema_update(ema_te, text_encoder, decay)
        if device.type == "cuda" and step % 10 == 0:
            torch.cuda.synchronize()
        s["steps"] += 1
        s["seconds"] += time.monotonic() - t0
        window.append(loss.detach())
        if s["steps"] % cfg.log_every == 0 or s["steps"] == 1:
            mean_loss = torch.stack(window).mean().item()
            s["log"].append([s["steps"], round(mean_loss, 5)])
            dt = time.monotonic() - t_last
            _log("dit", step=s["steps"], loss=mean_loss, lr=lr, steps_per_s=len(window) / max(dt, 1e-9),
                 train_min=s["seconds"] / 60)
            window, t_last = [], time.monotonic()


# ---------------------------------------------------------------------------------------------------
# the loss curve (Pillow: diffusers depends on it, so it is there wherever diffusers is)


def plot_losses(state: dict, path: Path, width: int = 900, height: int = 360):
    """Two panels, log-scale loss against step: the VAE's reconstruction loss, the transformer's flow loss,
    with a marked line where a run changed the flow loss's object weight (the curve jumps there because
    the loss changed, not the model)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    marks, weight = [], 0.0
    for run in state.get("runs", []):
        w = run.get("object_weight") or 0.0
        if w != weight:
            marks.append((run["start_dit_steps"], f"object weight {w:g}" if w else "plain loss"))
            weight = w
    panels = [("VAE reconstruction (weighted L1+L2)", state["vae"]["log"], (40, 90, 200), []),
              ("transformer flow-matching MSE", state["dit"]["log"], (200, 60, 40), marks)]
    pw = width // 2
    for k, (title, log, colour, panel_marks) in enumerate(panels):
        x0, y0, x1, y1 = k * pw + 60, 30, (k + 1) * pw - 15, height - 40
        draw.rectangle([x0, y0, x1, y1], outline="black")
        draw.text((x0, 8), title, fill="black")
        pts = [(s, v) for s, v, *_ in log if v > 0]
        if len(pts) < 2:
            draw.text((x0 + 10, y0 + 10), "no data yet", fill="gray")
            continue
        steps = np.array([p[0] for p in pts], float)
        vals = np.log10(np.array([p[1] for p in pts], float))
        lo, hi = math.floor(vals.min() * 4) / 4, math.ceil(vals.max() * 4) / 4
        hi = hi if hi > lo else lo + 0.25
        smax = steps.max()

        def xy(s, v):
            return x0 + (x1 - x0) * s / smax, y1 - (y1 - y0) * (v - lo) / (hi - lo)

        ticks = [m * 10.0 ** p for p in range(math.floor(lo) - 1, math.ceil(hi) + 1) for m in (1, 2, 5)]
        for t in ticks:
            if lo <= math.log10(t) <= hi:
                _, yy = xy(0, math.log10(t))
                draw.line([(x0, yy), (x1, yy)], fill=(225, 225, 225))
                draw.text((x0 - 45, yy - 6), f"{t:g}", fill="black")
        for frac in (0.0, 0.5, 1.0):
            xx, _ = xy(smax * frac, lo)
            draw.text((xx - 10, y1 + 5), f"{int(smax * frac)}", fill="black")
        draw.text(((x0 + x1) // 2 - 15, y1 + 20), "step", fill="black")
        draw.line([xy(s, v) for s, v in zip(steps, vals)], fill=colour, width=2)
        for step, label in panel_marks:
            xx, _ = xy(step, lo)
            draw.line([(xx, y0), (xx, y1)], fill=(90, 90, 90))
            draw.text((xx + 3, y0 + 3), label, fill=(90, 90, 90))
    img.save(path)


# ---------------------------------------------------------------------------------------------------


def _smoke_check(out: Path, device, cfg: TrainConfig) -> dict:
    """Load what was saved through the package's loader, generate with WanPipeline, run the check."""
    spec = _spec(cfg)
    pipe = trained.build_trained_pipeline(out, model=spec).to(device)
    caption = (toy.rich_check_scenes() if spec.scenes == "rich" else toy.check_scenes())[0][0].caption
    f, h, w = cfg.check_size
    video = pipe(prompt=caption, num_frames=f, height=h, width=w, num_inference_steps=2,
                 max_sequence_length=spec.max_sequence_length, output_type="np",
                 generator=torch.Generator("cpu").manual_seed(0)).frames[0]
    result = toy.check_video(video, caption)
    _log("smoke check (untrained: only that it runs)", caption=caption, ok=result["ok"], shape=str(video.shape))
    return result


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="checkpoint directory to write (resumed from if it has state.json)")
    ap.add_argument("--resume", type=Path, help="checkpoint directory to resume from (default: --out)")
    ap.add_argument("--minutes", type=float, default=9.0, help="wall-clock budget of this command, saving included")
    ap.add_argument("--vae-minutes", type=float, default=3.5, help="VAE training time over all commands, at least")
    ap.add_argument("--vae-max-minutes", type=float, default=4.5,
                    help="... and at most: between the two while its reconstructions fail the check (see vae_check)")
    ap.add_argument("--dit-minutes", type=float, default=11.5,
                    help="transformer training time over all commands (the learning-rate cosine spans it)")
    ap.add_argument("--vae-more-minutes", type=float, default=None,
                    help="resuming: train the (done) VAE this much more first, e.g. after the scenes changed; its "
                         "latent statistics are measured again and the transformer goes on in the new latents")
    ap.add_argument("--vae-steps", type=int, help="stop the VAE stage after this many steps (CPU runs)")
    ap.add_argument("--dit-steps", type=int, help="stop the transformer stage after this many steps (CPU runs)")
    ap.add_argument("--model", default="wan-trained", choices=sorted(trained.MODELS),
                    help="which trained model (pipelines/toy/trained.py: its architecture, captions and scenes)")
    ap.add_argument("--init-from", default=None, choices=sorted(trained.MODELS), metavar="MODEL",
                    help="start from a shipped model's weights (init_from) instead of random ones: its VAE and text "
                         "encoder, its transformer's blocks spread over the new depth")
    ap.add_argument("--shift-tokens", type=int, default=None, metavar="N",
                    help="train a clip of n tokens with the model's training shift times sqrt(n / N) (SD3's "
                         "resolution-dependent shift; default: the preset's, None for both models: one shift)")
    ap.add_argument("--object-weight", type=float, default=None, metavar="W",
                    help="weigh the flow loss at latent positions that objects cover 1 + W (TrainConfig."
                         "dit_object_weight; default: the preset's, 0 for both models: the plain loss)")
    ap.add_argument("--dit-buckets", nargs="+", default=None, metavar="FxHxW:SHARE",
                    help="the transformer's sizes and their shares of the steps instead of the preset's, e.g. "
                         "17x128x224:0.5 33x128x224:0.3 65x128x224:0.2 (a curriculum: captions first at small "
                         "sizes, where a step holds many clips)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--smoke", action="store_true", help="toy sizes and a few steps on the CPU, then load, generate, check")
    ap.add_argument("--plot-only", type=Path, metavar="DIR", help="redraw DIR/loss.png from DIR/state.json and exit")
    args = ap.parse_args(argv)
    global _T0
    _T0 = time.monotonic()  # the budget runs from here (imports took ~10 s before; the reserve covers them)

    if args.plot_only:
        plot_losses(json.loads((args.plot_only / "state.json").read_text()), args.plot_only / "loss.png")
        return {}
    if args.out is None:
        ap.error("--out is required")
    cfg = PRESETS[(args.model, args.smoke)]
    if args.shift_tokens is not None:
        cfg = dataclasses.replace(cfg, shift_tokens=args.shift_tokens)
    if args.object_weight is not None:
        if args.object_weight < 0:
            ap.error("--object-weight must be >= 0")
        cfg = dataclasses.replace(cfg, dit_object_weight=args.object_weight)
    if args.dit_buckets:
        try:
            cfg = dataclasses.replace(cfg, dit_buckets=parse_buckets(args.dit_buckets))
        except ValueError as e:
            ap.error(f"--dit-buckets: {e}")
    if args.smoke:
        args.vae_steps = 2 if args.vae_steps is None else args.vae_steps
        args.dit_steps = 3 if args.dit_steps is None else args.dit_steps
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    deadline = args.minutes * 60.0 - (5.0 if args.smoke else 40.0)  # left for imports before main and saving
    src = args.resume or (args.out if (args.out / "state.json").is_file() else None)

    if src is not None:
        state, modules = _load(src)
        if state["model"] != args.model:
            ap.error(f"{src} holds a {state['model']!r} checkpoint; pass --model {state['model']}")
        state["run"] += 1
        if args.vae_more_minutes:
            state["vae"].update(done=False, until=state["vae"]["seconds"] + 60.0 * args.vae_more_minutes)
            args.vae_max_minutes = max(args.vae_max_minutes, state["vae"]["until"] / 60.0)
        _log(f"resumed from {src}", vae_steps=state["vae"]["steps"], dit_steps=state["dit"]["steps"])
    else:
        transformer, vae, text_encoder = trained.build_components(args.seed, model=args.model)
        if args.init_from:
            init_from(transformer, vae, text_encoder, args.init_from)
        else:
            init_vae_per_frame(vae)
            with torch.no_grad():
                # Posterior std starts at 0.007 instead of 1: with unit noise on latents of scale ~0.1 the decoder
                # sees noise only, and Adam needs thousands of steps to walk the log-variance down (seen on the
                # CPU: reconstruction stuck at the mean image). The KL term lets it grow again where it can.
                z = vae.config.z_dim
                vae.quant_conv.bias[z:] = -10.0
        modules = (transformer, vae, text_encoder, copy.deepcopy(transformer).requires_grad_(False),
                   copy.deepcopy(text_encoder).requires_grad_(False))
        state = {"version": 1, "model": args.model, "init_from": args.init_from, "seed": args.seed, "run": 0,
                 "config": asdict(cfg), "runs": [],
                 "vae": {"steps": 0, "seconds": 0.0, "done": False, "log": []},
                 "dit": {"steps": 0, "seconds": 0.0, "log": []}, "latents_mean": None, "latents_std": None}
    modules = tuple(m.to(device) for m in modules)
    transformer, vae, text_encoder, ema_t, ema_te = modules
    run = {"command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "shift_tokens": cfg.shift_tokens, "object_weight": cfg.dit_object_weight,
           "dit_buckets": [list(b) for b in cfg.dit_buckets], "start_vae_steps": state["vae"]["steps"], "start_dit_steps": state["dit"]["steps"]}
    n = sum(p.numel() for p in transformer.parameters())
    _log("model", transformer_params=n, vae_params=sum(p.numel() for p in vae.parameters()),
         text_encoder_params=sum(p.numel() for p in text_encoder.parameters()), device=str(device))

    if not state["vae"]["done"]:
        # At least --vae-minutes; then, while the check of reconstructions misses its target, 30 s more at a
        # time up to --vae-max-minutes (the learning-rate cosine spans the maximum).
        opt = torch.optim.AdamW([p for p in vae.parameters() if p.requires_grad], lr=cfg.vae_lr, betas=(0.9, 0.99),
                                weight_decay=0.0)
        first, until = state["vae"]["steps"], max(args.vae_minutes * 60.0, state["vae"].get("until", 0.0))
        vae_max = max(args.vae_max_minutes * 60.0, until)
        while True:
            state["vae"]["until"] = until
            if not train_vae(cfg, state, vae, opt, device, deadline, until, vae_max, first, args.vae_steps):
                break  # out of time in this command: saved, resumed by the next
            check = vae_check(vae, device, cfg.check_size, cfg.check_count, _spec(cfg).scenes)
            _log("vae reconstructions checked", **check)
            if check["single_ok"] >= cfg.vae_check_target * check["single"] or until >= vae_max or args.vae_steps:
                state["vae"]["done"] = True
                break
            until = min(until + 30.0, vae_max)
        del opt
        if state["vae"]["done"]:
            # Ship and use the fp16-rounded VAE from here on, so the latents the transformer learns are the
            # shipped VAE's.
            with torch.no_grad():
                for p in vae.parameters():
                    p.copy_(p.half().float())
            mean, std = latent_stats(cfg, state, vae, device)
            vae.register_to_config(latents_mean=mean, latents_std=std)
            state.update(latents_mean=mean, latents_std=std)
            _log("latent stats", mean=str(mean), std=str(std))
            state["vae"]["check"] = vae_check(vae, device, cfg.check_size, cfg.check_count, _spec(cfg).scenes)
            _log("vae done; reconstructions checked", **state["vae"]["check"])
    if state["vae"]["done"] and _elapsed() < deadline:
        vae.requires_grad_(False)
        remaining = deadline - _elapsed()
        pool = build_pool(cfg, state, vae, device, min(cfg.pool_seconds, max(5.0, 0.3 * remaining)))
        train_dit(cfg, state, modules, pool, device, deadline, args.dit_minutes * 60.0, args.dit_steps)
        del pool
    run.update(end_vae_steps=state["vae"]["steps"], end_dit_steps=state["dit"]["steps"], wall_s=round(_elapsed(), 1))
    state["runs"].append(run)
    for m in (transformer, vae, text_encoder, ema_t, ema_te):
        m.to("cpu")
    _save(args.out, state, transformer, vae, text_encoder, ema_t, ema_te)
    _log(f"saved {args.out}", vae_steps=state["vae"]["steps"], dit_steps=state["dit"]["steps"])
    if args.smoke:
        state["smoke_check"] = _smoke_check(args.out, torch.device("cpu"), cfg)
    return state


if __name__ == "__main__":
    main()
