"""The Triton FP8 flash-attention kernel (sd35fp8.attention_kernel) on the CPU: its arithmetic in Triton's interpreter
against float32 torch at sequence lengths that are not multiples of the blocks, both layouts of V; its sm_90 (and
sm_89) builds without a GPU, with the FP8 tensor-core instructions in the PTX; the op's fake registration
(FakeTensor shapes, torch.compile fullgraph, torch.export); and the GPU micro-benchmark's CPU smoke run."""

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from sd35fp8 import attention_kernel as ak

needs_triton = pytest.mark.skipif(not ak.available(), reason="triton is not installed")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run in a fresh process with TRITON_INTERPRET=1 (the interpreter is chosen when a kernel is defined).
#
# Triton 3.6's interpreter does not cast like the GPU: float32 -> bf16 truncates; float32 -> E4M3 rounds half up,
# drops the carry into the exponent in every other binade (7.9 -> 4.0, not 8.0) and truncates subnormals; the GPU
# (cvt.rn) rounds to nearest even. So the tight check ("own", bound 0.2%, measured 0.012%) is against the kernel's
# own order of operations (online softmax over BLOCK_N key blocks, P * P_SCALE quantized relative to the running
# max, one division by the float32 row sum at the end) with the interpreter's own conversion function: what
# remains is float32 summation order and exp2 vs exp.
# The loose checks compare the kernel's interpreted output with `flash_attention_fp8_reference` (the float32
# arithmetic of sdpa_fp8_reference: P normalized first, then rounded to nearest E4M3) and with bf16 SDPA of the
# dequantized inputs: the broken E4M3 rounding halves some probabilities (measured 4.4-5.1%, bound 8%). The same
# blockwise arithmetic with the GPU's rounding ("gpu_*") is 1.4% from bf16 SDPA (bound 2.5%: P in E4M3 has 3
# mantissa bits, <= 2^-4 relative rounding per probability, unbiased, averaged over many keys) and 3.1% from
# sdpa_fp8_reference's arithmetic (bound 5%), which is itself 2.6-2.9% from bf16 SDPA here: normalizing P before
# the cast makes P * 256 small (256 / S in a flat row: 0.06 at S = 4429, near E4M3's subnormals below 2^-6), while
# the kernel's P relative to the running max is up to S times larger. bench/attention_fp8_micro.py measures the
# error at SD3.5's shapes on the GPU.
INTERPRETER_CODE = r"""
import torch, torch.nn.functional as F
from sd35fp8 import attention_kernel as ak
from sd35fp8.attention import P_SCALE, sdpa_fp8_reference
assert ak.patch_interpreter_for_numpy2() and ak.P_SCALE == P_SCALE

from triton.runtime.interpreter import _convert_float
from triton._C.libtriton import ir
import triton.language as tl

def interpreter_cast(x, dtype, rounding):  # the interpreter's own float32 -> E4M3 / bf16 conversion
    bits = _convert_float(x.contiguous().numpy(), tl.float32, dtype, rounding)
    raw = torch.from_numpy(bits.copy())
    return (raw.view(torch.float8_e4m3fn) if dtype == tl.float8e4nv else raw.view(torch.bfloat16)).float()

def truncate_fp8(x):
    return interpreter_cast(x, tl.float8e4nv, ir.ROUNDING_MODE.RTNE)

def truncate_bf16(x):
    return interpreter_cast(x, tl.bfloat16, None)

def blockwise(q8, k8, v8, dq, dk, dv, scale, block_n):  # the kernel's order of operations, the interpreter's casts
    q, k, v = (t.float().transpose(1, 2) * d for t, d in ((q8, dq), (k8, dk), (v8, dv)))
    s = q @ k.transpose(-1, -2) * scale
    m = torch.full(s.shape[:-1], float("-inf")); l = torch.zeros(s.shape[:-1]); acc = torch.zeros(q.shape)
    for start in range(0, s.shape[-1], block_n):
        block = s[..., start:start + block_n]
        new = torch.maximum(m, block.amax(-1))
        p = torch.exp(block - new[..., None]) * P_SCALE
        alpha = torch.exp(m - new)
        l = l * alpha + p.sum(-1)
        acc = acc * alpha[..., None] + truncate_fp8(p) @ v[..., start:start + block_n, :]
        m = new
    return truncate_bf16((acc / l[..., None]).transpose(1, 2))

def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())

def quantize(x):
    scale = 448.0 / x.abs().amax()
    return (x * scale).to(torch.float8_e4m3fn), (1.0 / scale).reshape(1)

torch.manual_seed(0)
worst = {"own": 0.0, "reference": 0.0, "bf16": 0.0, "gpu_reference": 0.0, "gpu_bf16": 0.0}
cases = [(75, ak.Config(32, 32, 4, 1)), (75, ak.Config(64, 64, 4, 1)), (130, ak.Config(64, 32, 4, 1)),
         (130, ak.Config(32, 64, 4, 1, False))]
for seq, config in cases:
    heads, dim = 2, 64
    q = F.rms_norm(torch.randn(1, seq, heads, dim), (dim,)) * 2.5  # peaky rows as well as flat ones
    k = F.rms_norm(torch.randn(1, seq, heads, dim), (dim,))
    v = torch.randn(1, seq, heads, dim) * 3
    (q8, dq), (k8, dk), (v8, dv) = quantize(q), quantize(k), quantize(v)
    scale = dim ** -0.5
    out = ak.flash_attention_fp8(q8, k8, v8, dq, dk, dv, scale, config=config)
    assert out.dtype == torch.bfloat16 and out.shape == q8.shape and torch.isfinite(out.float()).all()
    transposed = ak.flash_attention_fp8(q8, k8, ak.transpose_v(v8), dq, dk, dv, scale, config=config,
                                        v_transposed=True)
    assert torch.equal(out, transposed), (seq, config)  # the same arithmetic, V read through other strides
    own = rel(out.float(), blockwise(q8, k8, v8, dq, dk, dv, scale, config.block_n))
    exact = ak.flash_attention_fp8_reference(q8, k8, v8, dq, dk, dv, scale)
    reference = rel(out.float(), exact)
    dequantized = [(t.float() * d).to(torch.bfloat16).transpose(1, 2) for t, d in ((q8, dq), (k8, dk), (v8, dv))]
    sdpa = F.scaled_dot_product_attention(*dequantized).transpose(1, 2).float()
    bf16 = rel(out.float(), sdpa)
    gpu = ak.flash_attention_fp8_reference(q8, k8, v8, dq, dk, dv, scale, block_n=config.block_n)  # GPU rounding
    gpu_reference, gpu_bf16 = rel(gpu, exact), rel(gpu, sdpa)
    assert rel(exact, sdpa) < 0.05
    # the module's float32 reference is sdpa_fp8_reference's arithmetic before that one's E4M3 output (scaled by
    # 64 here), whose rounding to nearest is <= 2^-4 relative per element (~2.5% in norm)
    near = rel(sdpa_fp8_reference(q8, k8, v8, dq, dk, dv, torch.tensor(64.0), scale).float() / 64, exact)
    assert near < 0.04, near
    for key, value in (("own", own), ("reference", reference), ("bf16", bf16), ("gpu_reference", gpu_reference),
                       ("gpu_bf16", gpu_bf16)):
        worst[key] = max(worst[key], value)
assert worst["own"] < 2e-3, worst
assert worst["reference"] < 0.08 and worst["bf16"] < 0.08, worst
assert worst["gpu_reference"] < 0.05 and worst["gpu_bf16"] < 0.025, worst

# V scaled per V_GROUP keys (what quantize_qkv writes), groups 30x apart in magnitude: the kernel rescales its
# accumulator between groups, so it matches its own order of operations with per-key descales as tightly
for config in (ak.Config(32, 64, 4, 1), ak.Config(32, 128, 4, 1, False)):
    seq, heads, dim = 300, 2, 64
    q = F.rms_norm(torch.randn(1, seq, heads, dim), (dim,)) * 2.5
    k = F.rms_norm(torch.randn(1, seq, heads, dim), (dim,))
    v = torch.randn(1, seq, heads, dim)
    v[:, ak.V_GROUP:2 * ak.V_GROUP] *= 30
    (q8, dq), (k8, dk) = quantize(q), quantize(k)
    groups = -(-seq // ak.V_GROUP)
    dv = torch.stack([v[:, g * ak.V_GROUP:(g + 1) * ak.V_GROUP].abs().amax(dim=(1, 3)) for g in range(groups)],
                     dim=-1) / 448.0  # (B, H, groups)
    per_key = dv.repeat_interleave(ak.V_GROUP, dim=-1)[..., :seq]  # (B, H, S)
    v8 = (v / per_key.transpose(1, 2)[..., None]).to(torch.float8_e4m3fn)
    out = ak.flash_attention_fp8(q8, k8, ak.transpose_v(v8), dq, dk, dv, dim ** -0.5, config=config,
                                 v_transposed=True)
    own = rel(out.float(), blockwise(q8, k8, v8, dq, dk, per_key[..., None], dim ** -0.5, config.block_n))
    exact = ak.flash_attention_fp8_reference(q8, k8, v8, dq, dk, dv, dim ** -0.5)
    assert own < 2e-3 and rel(out.float(), exact) < 0.08, (config, own, rel(out.float(), exact))
print("ok", worst, flush=True)
"""


@needs_triton
def test_kernel_arithmetic_in_tritons_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", INTERPRETER_CODE], env=env, capture_output=True, text=True,
                            timeout=300, cwd=ROOT)
    assert result.returncode == 0 and result.stdout.startswith("ok"), result.stderr[-3000:]


QKV_CODE = r"""
import torch
from diffusers.models.normalization import RMSNorm
from sd35fp8 import attention_kernel as ak
assert ak.patch_interpreter_for_numpy2()
torch.manual_seed(0)
heads, dim = 3, 64
for t_img, t_ctx in ((70, 9), (150, 9), (64, 0)):  # joint attention (one and two V groups), self-attention
    norms = []
    for _ in range(4):
        norm = RMSNorm(dim, eps=1e-6).to(torch.bfloat16)
        norm.weight.data.uniform_(0.5, 2.0)
        norms.append(norm)
    qkv = (torch.randn(2, t_img, 3 * heads * dim) * 3).to(torch.bfloat16)
    context = (torch.randn(2, t_ctx, 3 * heads * dim) * 2).to(torch.bfloat16) if t_ctx else None
    if t_img == 150:
        qkv[:, 128:, 2 * heads * dim:] *= 50  # V's second group of 128 keys 50x larger: its own scale
    scales = torch.tensor([20.0, 25.0])
    used = norms if t_ctx else [norms[0], norms[1], norms[0], norms[1]]
    seq = t_img + t_ctx
    groups = -(-seq // ak.V_GROUP)
    out = [torch.full((2, seq, heads, dim), float("nan")), torch.full((2, seq, heads, dim), float("nan")),
           torch.full((2, heads, dim, -(-seq // 16) * 16), float("nan")),  # float32: the values before the cast
           torch.full((2, heads, groups), float("nan"))]
    ak.launch_quantize_qkv(qkv, context, [n.weight for n in used], 1e-6, heads, scales, *out)
    expected = ak.quantize_qkv_reference(qkv, context, norms if t_ctx else (norms[0], norms[1]), heads, scales,
                                         dtype=torch.float32)
    assert torch.equal(out[3], expected[3]), (out[3], expected[3])  # V's descales: amax / 448 per group
    assert groups == 1 or float(out[3][..., 1].min() / out[3][..., 0].max()) > 10
    assert out[2][..., seq:].eq(0).all()  # V's padding written as zeros
    for name, ours, theirs in zip("qkv", out, expected):
        # the interpreter truncates float32 -> bf16 (the norm's two roundings): within 2 bf16 steps
        assert torch.allclose(ours, theirs, rtol=2 ** -6, atol=1e-2), (name, (ours - theirs).abs().max())
    q8, k8, v8, descale_v = ak._quantize_qkv_op(qkv, context, *[n.weight for n in used], 1e-6, heads, scales)
    assert q8.dtype == torch.float8_e4m3fn and q8.shape == (2, seq, heads, dim) and v8.shape[:3] == (2, heads, dim)
    assert torch.equal(descale_v, expected[3])
print("ok", flush=True)
"""


@needs_triton
def test_qkv_quantization_kernel_in_tritons_interpreter():
    """The fused RMS norm + concatenation + E4M3 quantization of q/k/v (and V's transposed write) matches diffusers'
    RMSNorm and the torch path, for joint attention (image + context tokens) and self-attention."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", QKV_CODE], env=env, capture_output=True, text=True, timeout=300,
                            cwd=ROOT)
    assert result.returncode == 0 and result.stdout.startswith("ok"), result.stderr[-3000:]


@needs_triton
def test_load_time_check_runs_both_kernels_against_their_references():
    """`check` (what speed.py asks before choosing fp8_triton) runs end to end in Triton's interpreter; its verdict
    there is "disagrees" (the interpreter's broken E4M3 rounding: ~92% equal bytes), on a GPU it is None."""
    code = ("import torch; from sd35fp8 import attention_kernel as ak; ak.patch_interpreter_for_numpy2(); "
            "print(ak.check('cpu'))")
    result = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, TRITON_INTERPRET="1"),
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    verdict = result.stdout.strip().splitlines()[-1]
    assert verdict == "None" or verdict.startswith("disagrees with torch: "), verdict


@needs_triton
@pytest.mark.parametrize("capability", [90, 89])
def test_qkv_quantization_kernel_compiles_as_inductor_calls_it(capability):
    """Built for the GPU without one, with the argument types inductor passes (fp64 eps, plain integer strides)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource

    signature = {name: "*bf16" for name in ("img_ptr", "ctx_ptr", "wq_ptr", "wk_ptr", "wcq_ptr", "wck_ptr")}
    signature |= {"scales_ptr": "*fp32", "q_ptr": "*fp8e4nv", "k_ptr": "*fp8e4nv", "vt_ptr": "*fp8e4nv",
                  "dv_ptr": "*fp32"}
    signature |= {name: "i32" for name in ("t_img", "t_ctx", "heads", "padded")} | {"eps": "fp64"}
    signature |= {name: "i32" for name in ("stride_ib", "stride_it", "stride_cb", "stride_ct")}
    constexprs = {"HEAD_DIM": 64, "V_GROUP": ak.V_GROUP, "QKV_BLOCK": ak.QKV_BLOCK, "FP8_MAX": 448.0, "CLAMP": False}
    signature |= {name: "constexpr" for name in constexprs}
    source = ASTSource(fn=ak._quantize_qkv_kernel, signature=signature, constexprs=constexprs,
                       attrs={(i,): [["tt.divisibility", 16]] for i, name in enumerate(signature) if name.endswith("_ptr")})
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options={"num_warps": 4})
    ptx = compiled.asm["ptx"]
    assert compiled.asm["cubin"]
    assert capability != 90 or "cvt.rn.satfinite.e4m3x2.f32" in ptx  # Hopper's E4M3 cast
    # 16-byte loads and stores although the strides come without hints, V's transposed store included (no
    # one-byte stores: with the mask on the unaligned sequence length it was 32 of them a thread)
    assert "ld.global.v4.b32" in ptx and "st.global.v4.b32" in ptx
    assert not re.search(r"ld\.global\.(b16|u16)|st\.global\.(b8|u8)", ptx)


def build(capability: int, v_transposed: bool, config: ak.Config, dim: int = 64, scale_type: str = "fp32",
          stride_hints: bool = True):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource

    signature = {"q_ptr": "*fp8e4nv", "k_ptr": "*fp8e4nv", "v_ptr": "*fp8e4nv", "o_ptr": "*bf16",
                 "descale_q_ptr": "*fp32", "descale_k_ptr": "*fp32", "descale_v_ptr": "*fp32", "attn_scale": scale_type,
                 "seq_len": "i32", "heads": "i32"}
    strides = ["stride_qb", "stride_qs", "stride_qh", "stride_kb", "stride_ks", "stride_kh", "stride_vb", "stride_vs",
               "stride_vh", "stride_vd", "stride_ob", "stride_os", "stride_oh"]
    signature.update({name: "i32" for name in strides})
    constexprs = {"HEAD_DIM": dim, "BLOCK_M": config.block_m, "BLOCK_N": config.block_n, "LOG2_P_SCALE": 8.0,
                  "LOG2E": ak.LOG2E, "V_GROUP": ak.V_GROUP, "V_TRANSPOSED": v_transposed,
                  "PROMOTE_ACC": config.promote_acc, "KEY_ORDER": config.key_order,
                  "stride_vs" if v_transposed else "stride_vd": 1}  # Triton specializes the unit stride
    signature.update({name: "constexpr" for name in constexprs})
    divisible = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(signature)
                 if name.endswith("_ptr") or (stride_hints and name.startswith("stride") and name not in constexprs)}
    source = ASTSource(fn=ak._flash_attention_fp8_kernel, signature=signature, constexprs=constexprs, attrs=divisible)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32),
                          options={"num_warps": config.num_warps, "num_stages": config.num_stages})


@needs_triton
@pytest.mark.parametrize("v_transposed", [True, False])
def test_kernel_compiles_for_hopper_with_fp8_wgmma(v_transposed):
    """Triton builds the kernel for sm_90 without a GPU; both dots are FP8 wgmma (e4m3 x e4m3, float32 accumulators),
    P is cast to E4M3 rounding to nearest. Only V as (B, H, D, S_pad) reaches shared memory by asynchronous copies
    in the software pipeline: V as (B, S, H, D) is loaded into registers inside the loop and stored transposed (the
    layout wgmma's FP8 operands need), a synchronous load on every key block."""
    compiled = build(90, v_transposed, ak.choose_config(64))
    ptx, ttgir = compiled.asm["ptx"], compiled.asm["ttgir"]
    assert compiled.asm["cubin"]
    shapes = set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m64n\d+k32)\.f32\.e4m3\.e4m3", ptx))
    assert len(shapes) == 2, shapes  # Q K^T (n = BLOCK_N) and P V (n = head_dim)
    assert "mma.sync" not in ptx and "cvt.rn.satfinite.e4m3x2.f32" in ptx and "ex2.approx" in ptx
    copies = re.findall(r"ttg\.async_copy_global_to_local %(\w+?)_ptrs", ttgir)
    assert ("v" in copies) == v_transposed and "k" in copies, copies


@needs_triton
def test_key_order_keeps_p_inside_each_thread():
    """With K read in `_wgmma_key_order`, P goes from the first dot's accumulators to the second dot's register
    operand without a shuffle between threads (sm_90 PTX: no shfl.sync.idx; the natural order needs 32 per key
    block, 48 instructions of 497 in the loop's SASS), and the loop keeps its asynchronous copies."""
    default = ak.choose_config(64)
    assert default.key_order
    ordered, shuffled = build(90, True, default), build(90, True, default._replace(key_order=False))
    assert "shfl.sync.idx" not in ordered.asm["ptx"] and "shfl.sync.idx" in shuffled.asm["ptx"]
    copies = re.findall(r"ttg\.async_copy_global_to_local %(\w+?)_ptrs", ordered.asm["ttgir"])
    assert "k" in copies and "v" in copies, copies


@needs_triton
def test_kernel_keeps_its_fast_path_with_the_arguments_inductor_passes():
    """Inside torch.compile with dynamic shapes, inductor hands the kernel `attn_scale` as fp64 and the strides
    without Triton's divisible-by-16 specialization (seen on the H200: first the build failed, the softmax state
    turning fp64; then the kernel ran at 1.54 ms instead of 0.77, no asynchronous copies of K and V). The kernel
    keeps float32 arithmetic and rounds the strides to 16, so K and V still arrive by asynchronous copies."""
    for config in (ak.choose_config(64), ak.Config(64, 128, 4, 3)):
        compiled = build(90, True, config, scale_type="fp64", stride_hints=False)
        copies = re.findall(r"ttg\.async_copy_global_to_local %(\w+?)_ptrs", compiled.asm["ttgir"])
        assert compiled.asm["cubin"] and "k" in copies and "v" in copies, copies


def test_launcher_refuses_strides_the_kernel_cannot_round():
    if not ak.available():
        pytest.skip("triton is not installed")
    q8, k8, v8, dq, dk, dv = fp8_inputs(batch=1, seq=20, heads=1, dim=64)
    out = torch.empty(q8.shape, dtype=torch.bfloat16)
    odd = torch.empty(1, 20, 1, 72, dtype=torch.float8_e4m3fn)[..., :64]  # rows 72 apart: not a multiple of 16
    with pytest.raises(ValueError, match="multiple of 16"):
        ak.launch_flash_attention_fp8(odd, k8, v8, dq, dk, dv, 0.125, out, ak.choose_config(64))


@needs_triton
@pytest.mark.parametrize("capability,dim", [(90, 128), (89, 64)])
def test_kernel_compiles_for_other_shapes_and_ada(capability, dim):
    compiled = build(capability, True, ak.choose_config(dim), dim)
    pattern = r"wgmma\.mma_async\S*e4m3\.e4m3" if capability == 90 else r"mma\.sync\.aligned\.m16n8k32\S*e4m3\.e4m3"
    assert compiled.asm["cubin"] and re.search(pattern, compiled.asm["ptx"])


def fp8_inputs(batch=2, seq=77, heads=3, dim=64, device="cpu"):
    q8, k8, v8 = (torch.randn(batch, seq, heads, dim, device=device).to(torch.float8_e4m3fn) for _ in range(3))
    return q8, k8, v8, *(torch.ones(1, device=device) for _ in range(3))


@needs_triton
def test_fake_registration_gives_shape_and_dtype():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q8, k8, v8, dq, dk, dv = fp8_inputs(2, 4429, 38, 64)
        out = ak.flash_attention_fp8(q8, k8, ak.transpose_v(v8), dq, dk, dv, 0.125, v_transposed=True)
        assert out.shape == (2, 4429, 38, 64) and out.dtype == torch.bfloat16
        out = ak.flash_attention_fp8(q8, k8, v8, dq, dk, dv, 0.125, config=ak.CONFIGS[2])
        assert out.shape == (2, 4429, 38, 64) and out.dtype == torch.bfloat16


@needs_triton
def test_op_compiles_fullgraph_and_exports_as_one_op(monkeypatch):
    """torch.compile (fullgraph) and torch.export see the op, not its Python body; on the CPU its kernel is replaced
    by a torch stand-in (the real kernel runs on CUDA, or in the interpreter test above)."""
    calls = []

    def stand_in(q8, k8, v8, descale_q, descale_k, descale_v, attn_scale, out, config, v_transposed=False):
        calls.append(config)
        out.copy_(ak.flash_attention_fp8_reference(q8, k8, v8, descale_q, descale_k, descale_v, attn_scale))

    monkeypatch.setattr(ak, "launch_flash_attention_fp8", stand_in)
    q8, k8, v8, dq, dk, dv = fp8_inputs()

    def attend(q8, k8, v8, dq, dk, dv):
        return ak.flash_attention_fp8(q8, k8, v8, dq, dk, dv, 0.125).float() * 2

    expected = attend(q8, k8, v8, dq, dk, dv)
    torch._dynamo.reset()
    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(q8, k8, v8, dq, dk, dv), expected)

    class Attend(torch.nn.Module):
        def forward(self, *args):
            return attend(*args)

    exported = torch.export.export(Attend(), (q8, k8, v8, dq, dk, dv))
    targets = [str(node.target) for node in exported.graph.nodes if node.op == "call_function"]
    assert "sd35fp8.flash_attention_fp8.default" in targets, targets
    assert calls and all(c == ak.choose_config(64) for c in calls)


def test_availability_and_layout_helpers():
    v8 = fp8_inputs(1, 75, 2, 64)[2]
    assert "needs a CUDA GPU" in ak.unavailable("cpu", 64)
    transposed = ak.transpose_v(v8)
    assert transposed.shape == (1, 2, 64, 80) and transposed.stride(-1) == 1
    assert torch.equal(transposed[..., :75].permute(0, 3, 1, 2).view(torch.uint8), v8.view(torch.uint8))
    assert transposed[..., 75:].view(torch.uint8).eq(0).all()
    assert ak.choose_config(64) in ak.CONFIGS and ak.choose_config(128) in ak.CONFIGS
    assert len(set(ak.CONFIGS)) == len(ak.CONFIGS) >= 6


@needs_triton
def test_micro_benchmark_smoke_run_on_the_cpu(tmp_path):
    """`--tiny` under the interpreter: every row written, no errors, the FP8 rows near 16-bit SDPA."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-m", "bench.attention_fp8_micro", "--tiny", "--out", str(tmp_path)],
                            env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "attention_fp8_micro.json").read_text())
    rows = report["rows"]
    fp8 = [r for r in rows if r["kernel"] == "triton_fp8"]
    assert not [r for r in rows if "error" in r], rows
    assert {r["v_layout"] for r in fp8} == {"bhds", "bshd"} and len(fp8) == 4
    assert sum(r["config"].endswith("_shuffled") for r in fp8) == 1  # the best config without the key order
    assert all(r["rel_error"] < 0.15 for r in fp8)  # the interpreter's truncating casts; see the test above
    assert report["best"]["tiny"]["config"] and not report["stopped_at_deadline"]


def test_micro_benchmark_imports_no_pipeline_packages():
    code = textwrap.dedent("""
        import sys
        import bench.attention_fp8_micro
        import sd35fp8.attention, sd35fp8.fp8
        print(sorted({m.split('.')[0] for m in sys.modules} & {'diffusers', 'transformers', 'optimum', 'gradio'}))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr[-2000:] + result.stdout
