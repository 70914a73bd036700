"""diffusers' caching hooks on a patched pipeline: FirstBlockCache, PyramidAttentionBroadcast, MagCache and
TaylorSeer each skip the work they should (counted per (layer, step) through ``PatchState.observers``), the
output stays finite and moves away from the uncached one, and the step counter (advanced by the
transformer's forward pre-hook) stays right through skipped blocks and whole skipped steps."""

from collections import Counter

import pytest
import torch
from diffusers.hooks import (FirstBlockCacheConfig, MagCacheConfig, PyramidAttentionBroadcastConfig,
                             TaylorSeerCacheConfig)

import vdit_accel
from vdit_accel import Strategy
from vdit_accel.pipelines import build_tiny_pipeline, patch_state

STEPS = 4
LAYERS = {"wan": 4, "cogvideox": 2}
# Wan calls the transformer once for cond and once for uncond (two cache contexts per step);
# CogVideoX batches them (one call, one context).
CONTEXTS = {"wan": 2, "cogvideox": 1}
# The first step dense, the rest sparse: a wrong step count shows up as a wrong mask.
STRATEGY = Strategy.uniform("window3d:t=0,h=0,w=0", dense_warmup_steps=1)

_PIPES: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _free_pipes():
    yield
    _PIPES.clear()


def _pipe(family):
    if family not in _PIPES:
        _PIPES[family] = build_tiny_pipeline(family, seed=0)
    return _PIPES[family]


def _run(pipe, family, **kw):
    """Latents of a (3, 4, 4)-grid generation; per (layer, step): attention calls and their mask kind;
    per pipeline step: the patch state's step seen by the step-end callback."""
    state = patch_state(pipe.transformer)
    calls, masks, steps = Counter(), {}, []

    def observe(layer, step, q, k, v):
        calls[layer, step] += 1
        masks.setdefault(step, set()).add(state.plan(layer, q).block_mask() is None)

    def step_end(p, i, t, kwargs):
        steps.append((i, state.step))
        return {}

    state.observers.append(observe)
    try:
        out = pipe(prompt="a red circle moving left", height=64, width=64, num_frames=9, num_inference_steps=STEPS,
                   max_sequence_length=16, output_type="latent", generator=torch.Generator().manual_seed(0),
                   callback_on_step_end=step_end, **kw).frames
    finally:
        state.observers.remove(observe)
    assert steps == [(i, i) for i in range(STEPS)], "the patch state's step must follow the pipeline's"
    assert masks.get(0) in (None, {True}) and all(m == {False} for s, m in masks.items() if s > 0), masks
    return out, calls


def _expected(family, computed: dict[int, set[int]], contexts=None) -> Counter:
    """Attention calls when layer ``l`` runs at steps ``computed[l]``, once per cache context."""
    n = CONTEXTS[family] if contexts is None else contexts
    return Counter({(layer, s): n for layer, steps in computed.items() for s in steps})


def _all_layers(family, steps):
    return {layer: set(steps) for layer in range(LAYERS[family])}


def _fbc(pipe, family):
    # A threshold nothing stays under: from the second step on, only the first block runs.
    first = {0: set(range(STEPS))}
    return FirstBlockCacheConfig(threshold=1e9), {**_all_layers(family, {0}), **first}, {}


def _pab(pipe, family):
    # Self-attention recomputed every 2nd call, at any timestep. PAB counts calls per attention module,
    # not per cache context: run Wan without CFG so that one call is one step.
    cfg = PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                          spatial_attention_timestep_skip_range=(-1, 10_000),
                                          current_timestep_callback=lambda: pipe.current_timestep)
    kw = {"guidance_scale": 1.0} if family == "wan" else {}
    return cfg, _all_layers(family, {0, 2}), kw


def _mag(pipe, family):
    # Flat magnitude ratios: after the retained first step, every other step is skipped (max_skip_steps=1).
    cfg = MagCacheConfig(threshold=0.06, max_skip_steps=1, retention_ratio=0.25, num_inference_steps=STEPS,
                         mag_ratios=[1.0] * STEPS)
    return cfg, _all_layers(family, {0, 2}), {}


def _taylorseer(pipe, family):
    # Self-attention modules computed at steps 0 and 2, predicted (first order) at 1 and 3.
    name = r"blocks\.\d+\.attn1" if family == "wan" else r"transformer_blocks\.\d+\.attn1"
    cfg = TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1, max_order=1,
                                taylor_factors_dtype=torch.float32, cache_identifiers=[name])
    return cfg, _all_layers(family, {0, 2}), {}


HOOKS = {"first_block_cache": _fbc, "pyramid_attention_broadcast": _pab, "mag_cache": _mag, "taylorseer": _taylorseer}


@pytest.mark.parametrize("hook", list(HOOKS))
@pytest.mark.parametrize("family", ["wan", "cogvideox"])
def test_cache_hook_composes_with_patch(family, hook):
    pipe = _pipe(family)
    vdit_accel.patch(pipe, STRATEGY, block_size=16)
    try:
        config, computed, kw = HOOKS[hook](pipe, family)
        contexts = 1 if kw.get("guidance_scale") == 1.0 else None
        uncached, full = _run(pipe, family, **kw)
        assert full == _expected(family, _all_layers(family, range(STEPS)), contexts)
        pipe.transformer.enable_cache(config)
        try:
            cached, calls = _run(pipe, family, **kw)
        finally:
            pipe.transformer.disable_cache()
        assert calls == _expected(family, computed, contexts)
        assert torch.isfinite(cached).all()
        assert (cached - uncached).abs().max().item() > 1e-4 * uncached.abs().max().item()
        # Removing the hook leaves the patched pipeline as it was.
        again, _ = _run(pipe, family, **kw)
        assert torch.equal(again, uncached)
    finally:
        vdit_accel.unpatch(pipe)
