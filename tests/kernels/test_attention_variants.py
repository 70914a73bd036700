"""The attention kernel's speed variants (config keys ``pipeline_qk``, ``prefetch_idx``) compute what the
plain kernel computes, on the CPU interpreter at odd sizes: quantized (fp8, int8) against the float64
simulation of the recipe and the exact reference, dense and block-sparse (empty query blocks, masked
tails), and the fp16 path against the float64 reference. The sm_90 compilation of every variant is
in test_compile_sm90.py.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import importlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from vdit_accel.block_mask import BlockMask  # noqa: E402
from vdit_accel.quant import dit_like_qkv, reference_quant_attention  # noqa: E402
from vdit_accel.reference import reference_attention  # noqa: E402

_kern = importlib.import_module("vdit_accel.kernels.attention")
if type(_kern._attn_fwd).__name__ != "InterpretedFunction":
    # Imported earlier in this process without TRITON_INTERPRET: rebuild the kernels interpreted.
    importlib.reload(_kern)
_fwd = importlib.import_module("vdit_accel.kernels.attention_fwd")

PIPE = dict(pipeline_qk=True)


def _ids(v):
    return "-".join(f"{k}{int(x)}" for k, x in v.items()) if isinstance(v, dict) else str(v)


def _rel(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def _mask(h, s, block, seed):
    g = torch.Generator().manual_seed(seed)
    nb = -(-s // block)
    dense = torch.rand(1, h, nb, nb, generator=g) < 0.5
    dense[:, 0, 0] = False  # an empty query block
    dense[:, 0, -1] = True  # a full one, tail included
    dense[:, 0, 1, :] = False
    dense[:, 0, 1, 1] = True  # a single key block (the pipelined loop's prologue + epilogue only)
    return BlockMask.from_dense(dense, s, block, block)


@pytest.mark.parametrize("mode,variant", [("fp8", PIPE), ("int8", PIPE)], ids=_ids)
@pytest.mark.parametrize("s,d,sparse", [(137, 64, False), (150, 96, True)])
def test_quantized_variants_match_simulation(mode, variant, s, d, sparse):
    """Within rounding of the simulation, no worse than the plain kernel against the exact reference (the
    same bits: the same arithmetic in another order); empty query blocks give zeros and lse = -inf."""
    q, k, v = dit_like_qkv(2, s, 2, d, seed=s + d + 1, dtype=torch.float16)
    cfg = dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)
    mask = _mask(2, s, 64, seed=s) if sparse else None
    kw = {}
    if mask is not None:
        kw = dict(kv_num_blocks=mask.kv_num_blocks, kv_indices=mask.kv_indices, mask_block_m=64, mask_block_n=64)
    out, lse = _fwd.attention_fwd(q, k, v, config={**cfg, **variant}, quant=mode, return_lse=True, **kw)
    base, base_lse = _fwd.attention_fwd(q, k, v, config=cfg, quant=mode, return_lse=True, **kw)
    sim = reference_quant_attention(q, k, v, mode, mask, block_m=32, block_n=32)
    exact = reference_attention(q.double(), k.double(), v.double(), mask)
    assert out.dtype == q.dtype and not out.isnan().any()
    assert _rel(out, sim) < 2e-3
    assert _rel(out, exact) <= _rel(base, exact) * 1.1 + 1e-3
    assert torch.equal(out, base)
    fin = ~torch.isneginf(base_lse)
    assert torch.equal(torch.isneginf(lse), ~fin)
    assert (lse[fin] - base_lse[fin]).abs().max() <= 1e-3
    if mask is not None:
        assert (out[:, :64, 0] == 0).all() and torch.isneginf(lse[:, 0, :64]).all()


@pytest.mark.parametrize("variant,s,sparse,tma", [
    (PIPE, 77, False, False), (PIPE, 150, True, False), (PIPE, 96, False, True), (PIPE, 130, True, True),
], ids=_ids)
def test_fp16_variants_match_reference(variant, s, sparse, tma):
    """The unquantized path with the same flags: fp16 within 5e-3 of float64 (the plain kernel's
    bound), pointer loads (masked tail) and TMA, even and odd S."""
    if tma:
        pytest.importorskip("triton.tools.tensor_descriptor")
    g = torch.Generator().manual_seed(s)
    q, k, v = (torch.randn(2, s, 2, 64, generator=g).half() for _ in range(3))
    mask = _mask(2, s, 32, seed=s + 1) if sparse else None
    kw = {}
    if mask is not None:
        kw = dict(kv_num_blocks=mask.kv_num_blocks, kv_indices=mask.kv_indices, mask_block_m=32, mask_block_n=32)
    cfg = dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1, tma=tma, **variant)
    out, lse = _fwd.attention_fwd(q, k, v, config=cfg, return_lse=True, **kw)
    ref, ref_lse = reference_attention(q.double(), k.double(), v.double(), mask, return_lse=True)
    assert _rel(out, ref) <= 5e-3
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    fin = ~torch.isneginf(ref_lse)
    torch.testing.assert_close(lse[fin], ref_lse[fin], atol=1e-3, rtol=0)
    assert (out[torch.isneginf(ref_lse).transpose(1, 2)] == 0).all()


def test_variant_config_validation():
    q, k, v = dit_like_qkv(1, 40, 1, 64, seed=2, dtype=torch.float16)
    cfg = dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)
    with pytest.raises(ValueError, match="unknown: \\['exp_poly'\\]"):  # removed: slower everywhere measured
        _fwd.attention_fwd(q, k, v, config={**cfg, "exp_poly": 1})
    with pytest.raises(ValueError, match="warp_specialize"):
        _fwd.attention_fwd(q, k, v, config={**cfg, "pipeline_qk": True, "warp_specialize": True})
    # int4 has no pipelined loop: the flag is dropped, the result is the plain kernel's.
    a = _fwd.attention_fwd(q, k, v, config={**cfg, "pipeline_qk": True}, quant="int4")
    assert torch.equal(a, _fwd.attention_fwd(q, k, v, config=cfg, quant="int4"))


def test_quantized_defaults_per_mode(monkeypatch):
    """On an H100 int8 runs Q·K^T one block ahead (measured faster), fp8 the -q tiles with the sparse index
    prefetch, int4 the shared -q entry, head_dim 64 has no int8 entry of its own."""
    af = importlib.import_module("vdit_accel.kernels.attention_configs")
    monkeypatch.setattr(af, "_arch", lambda device, dtype: "sm90")
    cuda = torch.device("cuda")
    assert af.default_config(128, cuda, quant="int8") == dict(af.DEFAULT_CONFIGS[("sm90-q", 128)], pipeline_qk=True)
    assert af.default_config(128, cuda, quant="fp8") == dict(af.DEFAULT_CONFIGS[("sm90-q", 128)], prefetch_idx=True)
    assert af.default_config(128, cuda, quant="int4") == af.DEFAULT_CONFIGS[("sm90-q", 128)]
    assert af.default_config(64, cuda, quant="int8") == af.DEFAULT_CONFIGS[("sm90-q", 64)]
    assert af.default_config(128, cuda) == af.DEFAULT_CONFIGS[("sm90", 128)]
    assert af.gpu_tiles(128, "int8") == af.gpu_tiles(128, "fp8") == (64, 128)


@pytest.mark.parametrize("quant", [None, "fp8", "int4"])
@pytest.mark.parametrize("s,d,mask_block,block_n", [(150, 96, 32, 32), (203, 64, 64, 32)])
def test_prefetch_idx_is_bit_equal(quant, s, d, mask_block, block_n):
    """prefetch_idx (the next key block's index loaded one block ahead) changes no bit: sparse at odd
    sizes, empty / single-block / full query blocks, a masked tail, and mask key blocks visited as
    SUB = 2 kernel blocks (mask block 64, BLOCK_N 32); dense ignores the flag."""
    g = torch.Generator().manual_seed(s)
    q, k, v = (torch.randn(2, s, 3, d, generator=g).half() for _ in range(3))
    bm = _mask(3, s, mask_block, seed=s)
    cfg = dict(BLOCK_M=32, BLOCK_N=block_n, num_warps=4, num_stages=1)
    for mask in (bm, None):
        args = () if mask is None else (mask.kv_num_blocks, mask.kv_indices, mask_block, mask_block)
        a = _fwd.attention_fwd(q, k, v, *args, config=cfg, quant=quant, return_lse=True)
        b = _fwd.attention_fwd(q, k, v, *args, config={**cfg, "prefetch_idx": True}, quant=quant, return_lse=True)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        if mask is not None and quant is None:  # and both are right
            assert _rel(b[0], reference_attention(q.double(), k.double(), v.double(), mask)) < 2e-3
