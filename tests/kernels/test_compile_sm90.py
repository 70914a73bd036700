"""The Triton kernels compile for Hopper (sm_90) on this CPU machine.

The interpreter runs kernel bodies as NumPy and accepts things the GPU compiler refuses (e.g. one name
bound to a scalar in one branch of a runtime ``if`` and to a vector in the other); compiling for a GPU
target needs no GPU (triton ships ptxas), so every variant the GPU runs is compiled here, in one fresh
process (the test session sets TRITON_INTERPRET=1, under which kernels cannot be compiled).
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

_COMPILE = """
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
failed = []
for module, name, types, consts in json.loads(sys.argv[1]):
    fn = getattr(importlib.import_module(module), name)
    sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
    try:
        triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32))
    except Exception as e:
        failed.append(f"{name} {consts}: {type(e).__name__}: {str(e)[:1500]}")
print(json.dumps(failed))
"""
QZ, AT = "vdit_accel.kernels.quantize", "vdit_accel.kernels.attention"


def _attention(quant, sparse, tma=False, **flags):
    q = {0: "*bf16", 1: "*bf16", 2: "*bf16", 3: "*u8"}[quant]
    k = {0: "*bf16", 1: "*fp8e4nv", 2: "*i8", 3: "*u8"}[quant]
    v = "*fp8e4nv" if quant in (1, 3) else "*bf16"  # int8 keeps V as given (16-bit P V)
    types = {"Q": q, "K": k, "V": v, "Out": "*bf16", "Lse": "*fp32", "KV_num": "*i32", "KV_idx": "*i32",
             "K_desc": k, "V_desc": v, "QScale": "*fp32", "KScale": "*fp32", "VScale": "*fp32", "QMean": "*fp32",
             "QIdx": "*i32", "qk_scale": "fp32"}
    if tma:  # host-side descriptors, one box per load (the launcher's shapes: quantized (B, H, S_pad, D) K, (B, H, D, S_pad) V)
        types["K_desc"] = f"tensordesc<{k[1:]}[1,1,128,128]>" if quant else "tensordesc<bf16[1,128,1,128]>"
        types["V_desc"] = f"tensordesc<{v[1:]}[1,1,128,128]>" if quant in (1, 3) else "tensordesc<bf16[1,128,1,128]>"
    consts = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_D=128, HEAD_DIM=96 if not tma else 128, MASK_BLOCK_M=128,
                  MASK_BLOCK_N=128, SPARSE=sparse, EVEN_N=False, RETURN_LSE=True, INPUT_PRECISION=None,
                  WARP_SPECIALIZE=False, USE_TMA=tma, QUANT=quant, EMULATE_FP8=False)
    consts.update(dict(PIPELINE_QK=False, Q_INDEXED=False, PREFETCH_IDX=False), **flags)  # defaults too: else a runtime i32
    return [AT, "_attn_fwd", types, consts]


VARIANTS = [_attention(0, False), _attention(0, True), _attention(1, False), _attention(1, True),
            _attention(2, True), _attention(3, True)]
# Q·K^T one block ahead (config pipeline_qk; the int8 default on Hopper), as the GPU runs it.
VARIANTS += [_attention(1, False, tma=True, PIPELINE_QK=True), _attention(2, True, tma=True, PIPELINE_QK=True),
             _attention(2, True, PIPELINE_QK=True), _attention(0, False, tma=True, PIPELINE_QK=True)]
# Queries read and outputs written through a token index (q_index), as the semantic order runs it.
VARIANTS += [_attention(0, True, tma=True, Q_INDEXED=True), _attention(1, True, tma=True, Q_INDEXED=True),
             _attention(3, True, Q_INDEXED=True)]
# Sparse with the next block index loaded one block ahead (config prefetch_idx).
VARIANTS += [_attention(0, True, tma=True, PREFETCH_IDX=True), _attention(1, True, tma=True, PREFETCH_IDX=True)]
VARIANTS += [
    ["vdit_accel.kernels.rope", "_qk_norm_rope_kernel",
     {"Q": "*bf16", "K": "*bf16", "QO": "*bf16", "KO": "*bf16", "WQ": "*bf16", "WK": "*bf16", "Cos": "*fp32",
      "Sin": "*fp32", "eps_q": "fp32", "eps_k": "fp32"},
     dict(HEAD_DIM=128, BLOCK_T=4, BLOCK_H=16, BLOCK_D=128, NORM=True, F64=False)],
]
VARIANTS += [
    [QZ, "_kv_stats_kernel", {"K": "*bf16", "V": "*bf16", "Part": "*fp32"}, dict(CHUNK=1024, ROWS=32, BLOCK_D=128, HEAD_DIM=96)],
    *[[QZ, "_kv_quantize_kernel",
       {"K": "*bf16", "V": "*bf16", "Part": "*fp32", "K8": "*fp8e4nv" if mode == 1 else "*i8", "KScale": "*fp32",
        "KMean": "*fp32", "V8": "*fp8e4nv", "VScale": "*fp32"},
       dict(ROWS=128, MODE=mode, PART_STEP=16, BLOCK_D=128, HEAD_DIM=96, EMULATE_FP8=False)] for mode in (1, 2)],
    [QZ, "_channel_stats_kernel", {"X": "*bf16", "Sum": "*fp32", "Max": "*fp32", "Min": "*fp32"},
     dict(CHUNK=512, ROWS=32, BLOCK_D=128, HEAD_DIM=96)],
    [QZ, "_quantize_v_kernel", {"V": "*bf16", "Scale": "*fp32", "Out": "*fp8e4nv"},
     dict(ROWS=128, BLOCK_D=128, HEAD_DIM=96, EMULATE_FP8=False)],
    [QZ, "_quantize_rows_kernel",
     {"X": "*bf16", "Mean": "*fp32", "ChanMul": "*fp32", "Out": "*u8", "Scale": "*fp32", "GroupMean": "*fp32",
      "scale_mul": "fp32"},
     dict(GROUP=1, ROWS=64, MODE=3, SUB_MEAN=True, CHAN_MUL=True, SUB_GROUP_MEAN=True, BLOCK_D=128, HEAD_DIM=96,
          EMULATE_FP8=False)],
]


# The Gluon Hopper kernel (kernels/attention_hopper.py): compiled to PTX and cubin for sm_90 with the installed
# triton and, where a second interpreter with triton 3.6 (the GPU machine's) is found, with that one too.
_GLUON_COMPILE = """
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource
fwd = importlib.import_module("vdit_accel.kernels.attention_fwd")
kern = importlib.import_module("vdit_accel.kernels.attention_hopper")
fn = kern._attn_fwd_hopper
failed, shown = [], []
for d, dt, sparse, q_indexed, block_n, even_n in json.loads(sys.argv[1]):
    gdt = {"bf16": gl.bfloat16, "fp16": gl.float16}[dt]
    def desc(rows):
        layout = gl.NVMMASharedLayout.get_default_for([1, rows, 1, d], gdt)
        return f"tensordesc<{dt}[1,{rows},1,{d}],{layout!r}>"
    consts = dict(BLOCK_M=fwd._HOPPER_BLOCK_M, BLOCK_N=block_n, HEAD_DIM=d, MASK_BLOCK_M=128, MASK_BLOCK_N=128,
                  SPARSE=sparse, EVEN_N=even_n, RETURN_LSE=True, Q_INDEXED=q_indexed, NUM_STAGES=fwd._HOPPER_STAGES[d])
    sig = {n: "constexpr" if n in consts else "i32" for n in fn.arg_names}
    sig.update(q_desc=desc(fwd._HOPPER_BLOCK_M), k_desc=desc(block_n), v_desc=desc(block_n), Q="*" + dt, Out="*" + dt,
               Lse="*fp32", KV_num="*i32", KV_idx="*i32", QIdx="*i32", qk_scale="fp32")
    try:
        c = triton.compile(GluonASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=4, maxnreg=kern.MAX_REGS))
        ptx = c.asm["ptx"]
        # The schedule survived lowering: async wgmma with one group left in flight, TMA, mbarriers,
        # register reallocation between the partitions, and no spills to local memory.
        for needle in ("wgmma.mma_async", "wgmma.wait_group.sync.aligned 1", "cp.async.bulk.tensor",
                       "mbarrier.try_wait", "setmaxnreg"):
            if needle not in ptx:
                failed.append(f"D{d} {dt} sparse={sparse} q_indexed={q_indexed}: no {needle!r} in the PTX")
        if "ld.local" in ptx or "st.local" in ptx:
            failed.append(f"D{d} {dt} sparse={sparse}: local memory (spills) in the PTX")
    except Exception as e:
        failed.append(f"D{d} {dt} sparse={sparse} q_indexed={q_indexed} block_n={block_n}: {type(e).__name__}: {str(e)[:1500]}")
print(json.dumps([triton.__version__, failed]))
"""
GLUON_VARIANTS = [  # (head_dim, dtype, sparse, q_indexed, BLOCK_N, EVEN_N)
    (128, "bf16", False, False, 128, False), (128, "bf16", True, True, 128, False), (64, "bf16", False, False, 128, True),
    (64, "fp16", True, False, 128, False), (128, "fp16", True, False, 64, True), (64, "bf16", True, True, 64, False),
]


def _triton36_python():
    """An interpreter with triton 3.6 (the GPU machine's version): $VDIT_TRITON36_PYTHON, or .venv36/ in the
    checkout (``python -m venv .venv36 && .venv36/bin/pip install triton==3.6.0`` plus a .pth line to the
    main venv's site-packages for torch, and ``pip install --no-deps -e .``)."""
    from pathlib import Path

    cand = os.environ.get("VDIT_TRITON36_PYTHON") or str(Path(__file__).resolve().parents[2] / ".venv36" / "bin" / "python")
    return cand if os.path.exists(cand) else None


@pytest.mark.parametrize("which", ["installed", "triton-3.6"])
def test_gluon_hopper_kernel_compiles_for_sm90(which):
    pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper")
    python = sys.executable if which == "installed" else _triton36_python()
    if python is None:
        pytest.skip("no triton 3.6 interpreter: set VDIT_TRITON36_PYTHON or make .venv36 (see _triton36_python)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([python, "-c", _GLUON_COMPILE, json.dumps(GLUON_VARIANTS)], capture_output=True, text=True,
                         env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    version, failed = json.loads(res.stdout.strip().splitlines()[-1])
    if which == "triton-3.6":
        assert version.startswith("3.6"), version
    if failed and all("ptxas" in f.lower() and "not found" in f.lower() for f in failed):
        pytest.skip("no ptxas on this machine")
    assert not failed, "\n".join(failed)


def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _COMPILE, json.dumps(VARIANTS)], capture_output=True, text=True,
                         env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    failed = json.loads(res.stdout.strip().splitlines()[-1])
    if failed and all("ptxas" in f.lower() and "not found" in f.lower() for f in failed):
        pytest.skip("no ptxas on this machine")
    assert not failed, "\n".join(failed)
