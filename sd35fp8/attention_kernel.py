"""FP8 (E4M3) flash-attention forward in Triton, written for Hopper (H100/H200, SM 9.0); runs on SM >= 8.9.

`flash_attention_fp8(q8, k8, v8, descale_q, descale_k, descale_v, attn_scale)` computes non-causal, unmasked
attention over (B, S, H, D) E4M3 tensors with per-tensor float32 descales for Q and K and, for V, one per tensor or
one per `V_GROUP` keys of each (batch, head) (what `quantize_qkv` writes), and returns bf16 (B, S, H, D). Registered as the `torch.library.triton_op`
`sd35fp8::flash_attention_fp8`: torch.compile and torch.export see one op; inductor calls the kernel from its code.

Algorithm (one program = BLOCK_M query rows of one (batch, head); a loop over the keys in BLOCK_N blocks):
  * S = q8 . k8^T as an FP8 tensor-core dot with float32 accumulation, times descale_q * descale_k * attn_scale *
    log2(e): the softmax runs in base 2 (`exp2`, one MUFU instruction), the scale folded into one FMA per element
    (the running row max is kept in those scaled units; the scale is positive, so max and scale commute).
  * Online softmax in float32: running max m, running sum l, the accumulator rescaled by exp2(m_old - m_new).
  * P = exp2(S - m) <= 1 is quantized to E4M3 as P * P_SCALE (P_SCALE = 256, the scale `sd35fp8.attention`'s FP8
    backends use too, a power of two: the scaling is exact). The multiply is folded into the exponent: exp2(S - (m - log2 P_SCALE)) = P *
    P_SCALE, so l accumulates P_SCALE * sum(P) and the final division by l also divides by P_SCALE.
  * P reaches the second dot inside each thread: a wgmma accumulator (and mma.sync's, on Ada) gives a thread
    columns 2q, 2q+1 of every 8, while an 8-bit A operand wants columns 4q..4q+3 of every 16 (q = lane % 4), so
    in key order P would cross threads (32 shuffles and 32 selects / byte permutes a key block, 10% of the loop).
    The kernel reads K's rows in `_wgmma_key_order` instead (column 16h + 8a + 2q + b of S holds key
    16h + 4q + 2a + b, whole 64-byte rows: the copies stay vectorized), so the columns a thread holds are the
    keys its A operand needs, and `_keys_in_order` is a reordering of its own registers (FlashAttention-3 permutes
    for the same reason). The masks follow the keys; max and sum do not care about the order.
  * acc += P8 . V8 as an FP8 dot (float32 accumulation), acc kept in units of the current V group's descale:
    when a key block starts a group with another descale, acc is multiplied by old / new descale together with the
    softmax's rescaling (one multiply a row); out = acc * descale_v / l, stored as bf16.
  * The sequence needs not be a multiple of the blocks: all key blocks but the last run without masks, the last
    one masks the columns >= S to -inf (and loads zeros there); rows >= S are computed on zero queries and not
    stored. The descales are read from device memory (no host sync; CUDA-graph capturable).

Layout of V (the second dot's B operand). PTX's `wgmma.mma_async` takes FP8 (e4m3/e5m2) operands from shared
memory only K-major: the transpose-on-load it offers is for 16-bit types only (PTX ISA, wgmma descriptors and
"imm-trans" restrictions; FlashAttention-3 and FlashInfer transpose V in shared memory for FP8 for this reason,
and Triton's attention tutorial passes V with the sequence innermost for FP8). For P @ V the reduction (K)
dimension is the key sequence, so V in (B, S, H, D) is N-major (head_dim innermost) and the wrong way round;
K in (B, S, H, D) is right for Q @ K^T (its K dimension is head_dim, which is innermost). So the kernel takes V
in either layout:
  * `v_transposed=False`: v8 (B, S, H, D) as produced today. Triton 3.6 still emits FP8 wgmma for P @ V, but (its
    sm_90 TTGIR, checked by the tests) each V tile is then loaded into registers inside the loop and stored to
    shared memory transposed: a synchronous load per key block, outside the software pipeline that brings K in
    by asynchronous copies (cp.async, num_stages buffers); bench/attention_fp8_micro.py measures the cost;
  * `v_transposed=True`: v8 (B, H, D, S_pad) with S_pad = S rounded up to 16 (`transpose_v` builds it; the
    quantization kernel that writes v8 can write this layout directly at no cost). 16-element padding keeps every
    row of V^T 16-byte aligned for vectorized / async copies (S = 4429 is odd); the padding is never read
    unmasked. This is the layout FP8 wgmma wants: V tiles come through the same pipelined asynchronous copies as
    K, and the transpose is a free view of shared memory. This is the layout to use (the quantization of V
    writing it); the other one is kept for callers holding (B, S, H, D) data.
P @ V's accumulation: by default (`Config.promote_acc`) each key block's FP8 products are summed by the tensor
core into fresh registers and added to the float32 accumulator (the "acc + dot" form, which Triton keeps as two
operations); `promote_acc=False` lets wgmma accumulate into acc across all key blocks, as FlashAttention-3 does,
inside the tensor core's reduced-precision FP8 accumulation (one add and 32 registers a thread fewer).

Configurations: `choose_config(head_dim)` picks one of `CONFIGS` (no autotuning: launch settings are fixed,
compilations are cached by Triton, and torch.compile sees a fixed kernel); `config=` overrides it (the benchmark
sweeps `CONFIGS`). Importable without Triton: `available()` is False and `unavailable()` says so.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: callers use another attention backend
    triton = None

from .fp8 import FP8_MAX

P_SCALE = 256.0  # P quantized as P * P_SCALE: probabilities are <= 1; a power of two keeps the scaling exact
LOG2E = 1.4426950408889634
HEAD_DIMS = (64, 128)
V_GROUP = 128  # V is scaled per V_GROUP keys of one (batch, head): the scale `quantize_qkv` writes with each block


class Config(NamedTuple):
    """Launch settings of the kernel."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    promote_acc: bool = True  # P @ V summed per key block by the tensor core, then added to acc in float32
    key_order: bool = True  # K read in `_wgmma_key_order`: P reaches the second dot without crossing threads

    def label(self) -> str:
        return (f"m{self.block_m}_n{self.block_n}_w{self.num_warps}_s{self.num_stages}"
                + ("" if self.promote_acc else "_chained") + ("" if self.key_order else "_shuffled"))


# A small fixed set, swept by bench/attention_fp8_micro.py. BLOCK_M rows are split over warpgroups of 4 warps
# (wgmma's M is 64 per warpgroup); S tile registers per thread = BLOCK_M * BLOCK_N / (32 * num_warps).
# ptxas (sm_90a) for head_dim 64, none spilling: 188 registers a thread at 128 x 128 / 8 warps (one CTA per SM),
# 127 at 128 x 64 / 8 warps (two), 168 at 64 x 128 / 4 warps, 253-255 at 256 x 64 / 8 and 128 x 64 / 4, 128 at
# 256 x 128 / 16; 128 x 128 / 4 warps spills and is left out. For head_dim 128 the 4-warp 128-row and the 256-row
# configs spill.
CONFIGS = (
    Config(128, 128, 8, 2),
    Config(128, 128, 8, 3),
    Config(128, 128, 8, 4),
    Config(128, 64, 8, 4),
    Config(128, 64, 4, 3),
    Config(64, 128, 4, 3),
    Config(64, 128, 4, 3, promote_acc=False),
    Config(256, 64, 8, 2),
    Config(256, 128, 16, 2),
)


def choose_config(head_dim: int) -> Config:
    """The default launch settings for a head dimension. head_dim 64 (SD3.5): 64 x 128 tiles on 4 warps, P @ V
    accumulated in the tensor core across key blocks, the fastest of the sweep on the H200 (0.77 ms at
    2x38x4429x64, 0.48 ms at Medium's 2x24x4429x64 with one V scale; 0.79 / 0.51 ms with V scaled per group;
    bench/results/gpu_h200_attention_fp8.json). head_dim 128:
    128 x 128 on 8 warps, chosen from register counts (no spills), not measured."""
    return Config(64, 128, 4, 3, promote_acc=False) if head_dim <= 64 else Config(128, 128, 8, 2)


def available() -> bool:
    """True where the kernel can be built: Triton importable (the device is checked by `unavailable`)."""
    return triton is not None


def unavailable(device: torch.device | str, head_dim: int) -> str | None:
    """None where the kernel runs: a CUDA GPU with FP8 tensor cores (compute capability >= 8.9), Triton, head_dim
    64 or 128; else why not."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"needs a CUDA GPU, not {device.type}"
    if not available():
        return "triton is not installed"
    if head_dim not in HEAD_DIMS:
        return f"head_dim {head_dim} (the kernel takes {' or '.join(map(str, HEAD_DIMS))})"
    if torch.cuda.get_device_capability(device) < (8, 9):
        return "needs FP8 tensor cores (compute capability 8.9+)"
    return None


def transpose_v(v8: torch.Tensor) -> torch.Tensor:
    """(B, S, H, D) E4M3 -> the kernel's K-major V: (B, H, D, S_pad), S_pad = S rounded up to 16, zero padded.
    (Through bytes: torch has no FP8 pad / copy kernels on every device.)"""
    batch, seq, heads, dim = v8.shape
    padded = -(-seq // 16) * 16
    out = torch.zeros((batch, heads, dim, padded), dtype=torch.uint8, device=v8.device)
    out[..., :seq] = v8.view(torch.uint8).permute(0, 2, 3, 1)
    return out.view(torch.float8_e4m3fn)


def patch_interpreter_for_numpy2() -> bool:
    """Make Triton 3.6's CPU interpreter run loops whose bound is a kernel argument under NumPy >= 2.4: it stores
    scalars as 1-element arrays and converts them with `int(array)`, which NumPy 2.4 refuses for ndim > 0. Only
    for TRITON_INTERPRET=1 (the tests, the benchmark's --tiny run); returns whether it patched."""
    if triton is None:
        return False
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_sd35fp8_numpy2", False):
        return True

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._sd35fp8_numpy2 = True
    interpreter._patch_lang_tensor = patched
    return True


if triton is not None:

    @triton.jit
    def _wgmma_key_order(BLOCK_N: tl.constexpr):
        """The key each column of S holds (within a block): column 16h + 8a + 2q + b holds key 16h + 4q + 2a + b."""
        c = tl.arange(0, BLOCK_N)
        return (c // 16) * 16 + ((c // 2) % 4) * 4 + ((c // 8) % 2) * 2 + c % 2

    @triton.jit
    def _keys_in_order(p):
        """P with S's columns in `_wgmma_key_order` -> P with the keys in order: (16h, 8a, 2q, b) -> (16h, 4q, 2a, b)."""
        p5 = tl.reshape(p, [p.shape[0], p.shape[1] // 16, 2, 4, 2])
        return tl.reshape(tl.permute(p5, [0, 1, 3, 2, 4]), [p.shape[0], p.shape[1]])

    @triton.jit
    def _attend_block(acc, l_i, m_i, dv_i, q, k_block, v_block, dv_block, start_n, seq_len, qk_scale, stride_ks,
                      stride_vs, stride_vd, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                      LOG2_P_SCALE: tl.constexpr, V_GROUP: tl.constexpr, V_TRANSPOSED: tl.constexpr,
                      PROMOTE_ACC: tl.constexpr, KEY_ORDER: tl.constexpr, MASKED: tl.constexpr):
        """One key block: S = q k^T, online-softmax update, acc += P8 v (acc kept in units of this block's V
        descale dv_i: rescaled by the ratio when the block's V group has another descale)."""
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        keys = start_n + _wgmma_key_order(BLOCK_N) if KEY_ORDER else offs_n  # the keys S's columns hold
        keys_inside = keys < seq_len
        k_ptrs = k_block + keys[:, None] * stride_ks + offs_d[None, :]
        if V_TRANSPOSED:  # (D, BLOCK_N) tile, the sequence contiguous: K-major for the second dot
            v_ptrs = v_block + offs_d[:, None] * stride_vd + offs_n[None, :]
        else:  # (BLOCK_N, D) tile, head_dim contiguous
            v_ptrs = v_block + offs_n[:, None] * stride_vs + offs_d[None, :]
        if MASKED:
            inside = offs_n < seq_len
            k = tl.load(k_ptrs, mask=keys_inside[:, None], other=0.0)
            if V_TRANSPOSED:
                v = tl.load(v_ptrs, mask=inside[None, :], other=0.0)
            else:
                v = tl.load(v_ptrs, mask=inside[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        if V_TRANSPOSED:
            v = tl.trans(v)
        qk = tl.dot(q, tl.trans(k))  # float32 accumulation of E4M3 products
        if MASKED:
            qk = tl.where(keys_inside[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        # P * P_SCALE in one FMA + exp2: exp2(s * scale - (m - log2 P_SCALE))
        p = tl.math.exp2(qk * qk_scale - (m_new - LOG2_P_SCALE)[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        dv_new = tl.load(dv_block + start_n // V_GROUP)
        acc = acc * (alpha * (dv_i / dv_new))[:, None]
        p8 = p.to(tl.float8e4nv)
        if KEY_ORDER:  # back to the keys' order: a reordering of each thread's own registers
            p8 = _keys_in_order(p8)
        if PROMOTE_ACC:  # the FP8 products of this block summed by the tensor core, added to acc in float32
            acc = acc + tl.dot(p8, v)
        else:  # the tensor core accumulates into acc across all blocks (its reduced-precision FP8 accumulation)
            acc = tl.dot(p8, v, acc)
        return acc, l_i, m_new, dv_new

    @triton.jit
    def _flash_attention_fp8_kernel(q_ptr, k_ptr, v_ptr, o_ptr, descale_q_ptr, descale_k_ptr, descale_v_ptr,
                                    attn_scale, seq_len, heads, stride_qb, stride_qs, stride_qh, stride_kb,
                                    stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_vd, stride_ob,
                                    stride_os, stride_oh, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                                    BLOCK_N: tl.constexpr, LOG2_P_SCALE: tl.constexpr, LOG2E: tl.constexpr,
                                    V_GROUP: tl.constexpr, V_TRANSPOSED: tl.constexpr,
                                    PROMOTE_ACC: tl.constexpr, KEY_ORDER: tl.constexpr):
        # q, k, o: (B, S, H, D) with D contiguous; v: the same, or (B, H, D, S_pad) with S contiguous (V_TRANSPOSED);
        # descale_v: (B, H, cdiv(S, V_GROUP)) contiguous, one descale per V_GROUP keys of one (batch, head)
        # Every stride but the unit ones is a multiple of 16 (the launcher checks). Rounding them to 16 tells Triton:
        # inside torch.compile with dynamic shapes inductor passes them as plain integers, and without that Triton can
        # prove no alignment, drops the asynchronous copies of K and V and runs twice as slow (1.54 ms a call on the
        # H200 against 0.77). (`tl.multiple_of` does not reach kernel arguments.)
        stride_qb, stride_qs, stride_qh = stride_qb // 16 * 16, stride_qs // 16 * 16, \
            stride_qh // 16 * 16
        stride_kb, stride_ks, stride_kh = stride_kb // 16 * 16, stride_ks // 16 * 16, \
            stride_kh // 16 * 16
        stride_ob, stride_os, stride_oh = stride_ob // 16 * 16, stride_os // 16 * 16, \
            stride_oh // 16 * 16
        stride_vb, stride_vh = stride_vb // 16 * 16, stride_vh // 16 * 16
        if V_TRANSPOSED:
            stride_vd = stride_vd // 16 * 16
        else:
            stride_vs = stride_vs // 16 * 16
        start_m = tl.program_id(0) * BLOCK_M  # consecutive programs share (batch, head): K/V stay in L2
        batch_head = tl.program_id(1)
        batch = (batch_head // heads).to(tl.int64)
        head = (batch_head % heads).to(tl.int64)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        q_block = q_ptr + batch * stride_qb + head * stride_qh
        q = tl.load(q_block + offs_m[:, None] * stride_qs + offs_d[None, :], mask=(offs_m < seq_len)[:, None],
                    other=0.0)
        k_block = k_ptr + batch * stride_kb + head * stride_kh
        v_block = v_ptr + batch * stride_vb + head * stride_vh
        # inductor passes Python floats to user kernels as fp64: keep the softmax arithmetic in float32
        qk_scale = (tl.load(descale_q_ptr) * tl.load(descale_k_ptr) * attn_scale * LOG2E).to(tl.float32)
        dv_block = descale_v_ptr + batch_head * tl.cdiv(seq_len, V_GROUP)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        dv_i = tl.load(dv_block)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        full = (seq_len // BLOCK_N) * BLOCK_N
        for start_n in range(0, full, BLOCK_N):
            acc, l_i, m_i, dv_i = _attend_block(acc, l_i, m_i, dv_i, q, k_block, v_block, dv_block, start_n, seq_len,
                                                qk_scale, stride_ks, stride_vs, stride_vd, BLOCK_N, HEAD_DIM,
                                                LOG2_P_SCALE, V_GROUP, V_TRANSPOSED, PROMOTE_ACC, KEY_ORDER, False)
        if full < seq_len:
            acc, l_i, m_i, dv_i = _attend_block(acc, l_i, m_i, dv_i, q, k_block, v_block, dv_block, full, seq_len,
                                                qk_scale, stride_ks, stride_vs, stride_vd, BLOCK_N, HEAD_DIM,
                                                LOG2_P_SCALE, V_GROUP, V_TRANSPOSED, PROMOTE_ACC, KEY_ORDER, True)
        out = acc * (dv_i / l_i)[:, None]  # l holds P_SCALE * sum(P): one division does both
        o_block = o_ptr + batch * stride_ob + head * stride_oh
        tl.store(o_block + offs_m[:, None] * stride_os + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=(offs_m < seq_len)[:, None])

    def launch_flash_attention_fp8(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, descale_q: torch.Tensor,
                                   descale_k: torch.Tensor, descale_v: torch.Tensor, attn_scale: float,
                                   out: torch.Tensor, config: Config, v_transposed: bool = False) -> None:
        """Run the kernel into a preallocated (B, S, H, D) output (bf16; float32 reads the values before the
        bf16 rounding). q8/k8 (B, S, H, D) with D contiguous; v8 likewise, or (B, H, D, S_pad) if `v_transposed`."""
        batch, seq, heads, dim = q8.shape
        if v_transposed:
            stride_vb, stride_vh, stride_vd, stride_vs = v8.stride()
            # The length is checked only when it is a plain int: under torch.export with a dynamic token range a
            # symbolic "S rounded up to 16 >= S" becomes a guard the export cannot prove for every S, and fails
            # (measured on the H200). The op allocates V that way itself.
            if stride_vs != 1 or v8.shape[:3] != (batch, heads, dim) or (isinstance(seq, int) and v8.shape[3] < seq):
                raise ValueError(f"v_transposed wants V as (B, H, D, S_pad >= S) with S contiguous, got "
                                 f"{tuple(v8.shape)} strides {v8.stride()}")
        else:
            stride_vb, stride_vs, stride_vh, stride_vd = v8.stride()
            if stride_vd != 1 or v8.shape != q8.shape:
                raise ValueError(f"V must be (B, S, H, D) with D contiguous like q, got {tuple(v8.shape)}")
        for name, t in (("q", q8), ("k", k8), ("out", out)):
            if t.shape != q8.shape or t.stride(3) != 1:
                raise ValueError(f"{name} must be (B, S, H, D) = {tuple(q8.shape)} with D contiguous")
        strides = [*q8.stride()[:3], *k8.stride()[:3], *out.stride()[:3], stride_vb, stride_vh,
                   stride_vd if v_transposed else stride_vs]
        if any(isinstance(stride, int) and stride % 16 for stride in strides):  # the kernel rounds them to 16
            raise ValueError(f"flash_attention_fp8 needs every non-unit stride to be a multiple of 16, got {strides}")
        groups = (batch, heads, -(-seq // V_GROUP))
        if tuple(descale_v.shape) != groups or not descale_v.is_contiguous() or V_GROUP % config.block_n:
            raise ValueError(f"descale_v must be contiguous {groups} (one per {V_GROUP} keys) and block_n must "
                             f"divide {V_GROUP}, got {tuple(descale_v.shape)} and block_n {config.block_n}")
        grid = (triton.cdiv(seq, config.block_m), batch * heads)
        torch.library.wrap_triton(_flash_attention_fp8_kernel)[grid](
            q8, k8, v8, out, descale_q, descale_k, descale_v, attn_scale, seq, heads,
            q8.stride(0), q8.stride(1), q8.stride(2), k8.stride(0), k8.stride(1), k8.stride(2),
            stride_vb, stride_vs, stride_vh, stride_vd, out.stride(0), out.stride(1), out.stride(2),
            HEAD_DIM=dim, BLOCK_M=config.block_m, BLOCK_N=config.block_n, LOG2_P_SCALE=math.log2(P_SCALE),
            LOG2E=LOG2E, V_GROUP=V_GROUP, V_TRANSPOSED=v_transposed, PROMOTE_ACC=config.promote_acc,
            KEY_ORDER=config.key_order, num_warps=config.num_warps,
            num_stages=config.num_stages)

    @torch.library.triton_op("sd35fp8::flash_attention_fp8", mutates_args=())
    def _flash_attention_fp8_op(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, descale_q: torch.Tensor,
                                descale_k: torch.Tensor, descale_v: torch.Tensor, attn_scale: float,
                                v_transposed: bool, block_m: int, block_n: int, num_warps: int,
                                num_stages: int, promote_acc: bool, key_order: bool) -> torch.Tensor:
        """The op: bf16 (B, S, H, D) attention of E4M3 inputs; block_m == 0 picks `choose_config`."""
        config = (Config(block_m, block_n, num_warps, num_stages, promote_acc, key_order) if block_m
                  else choose_config(q8.shape[-1]))
        out = torch.empty(q8.shape, dtype=torch.bfloat16, device=q8.device)
        launch_flash_attention_fp8(q8, k8, v8, descale_q, descale_k, descale_v, attn_scale, out, config,
                                   v_transposed)
        return out


def quantize_qkv_reference(qkv: torch.Tensor, context_qkv: torch.Tensor | None, norms: tuple, heads: int,
                           scales: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What `quantize_qkv` computes, in torch: the fused projections' outputs (B, T, 3*H*D) of the image tokens and
    (optionally) the context tokens -> E4M3 q8, k8 (B, S, H, D) (RMS-normed by `norms` = (norm_q, norm_k,
    norm_added_q, norm_added_k), diffusers' arithmetic, scaled by the float32 `scales` (q, k)), v8 (B, H, D, S_pad)
    scaled per `V_GROUP` keys of each (batch, head) by 448 / amax, and those groups' descales (B, H, cdiv(S,
    V_GROUP)). `dtype=torch.float32` returns the scaled values before the E4M3 cast."""
    parts = []
    for index, x in enumerate((qkv, context_qkv)):
        if x is None:
            continue
        q, k, v = (t.view(x.shape[0], x.shape[1], heads, -1) for t in x.chunk(3, dim=-1))
        parts.append((norms[2 * index](q), norms[2 * index + 1](k), v))
    q, k, v = (torch.cat(tensors, dim=1) for tensors in zip(*parts))
    return (scale_to_e4m3(q, scales[0], dtype), scale_to_e4m3(k, scales[1], dtype), *quantize_v_grouped(v, dtype))


def quantize_v_grouped(v: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S, H, D) 16-bit V -> (v8, descale_v): E4M3 V^T (B, H, D, S_pad) scaled per `V_GROUP` keys of each
    (batch, head) by 448 / amax, and the descales amax / 448 (B, H, cdiv(S, V_GROUP)): how `quantize_qkv` writes V,
    in torch (fused by inductor under torch.compile)."""
    batch, seq, heads = v.shape[:3]
    groups = -(-seq // V_GROUP)
    grouped = F.pad(v.float().abs(), (0, 0, 0, 0, 0, groups * V_GROUP - seq)).view(batch, groups, V_GROUP, heads, -1)
    amax = grouped.amax(dim=(2, 4)).clamp(min=1e-12)  # (B, G, H)
    per_key = (FP8_MAX / amax).repeat_interleave(V_GROUP, dim=1)[:, :seq, :, None]  # (B, S, H, 1)
    v8 = v_transposed(v.float() * per_key, torch.ones((), device=v.device), dtype)
    return v8, (amax / FP8_MAX).transpose(1, 2).contiguous()


def scale_to_e4m3(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn) -> torch.Tensor:
    """`x * scale` clamped to E4M3's range and cast (`dtype=torch.float32`: the values before the cast)."""
    return (x.float() * scale).clamp(-FP8_MAX, FP8_MAX).to(dtype)


def v_transposed(v: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn) -> torch.Tensor:
    """(B, S, H, D) 16-bit V -> the kernel's K-major V: `scale_to_e4m3` of it as (B, H, D, S_pad), S_pad = S
    rounded up to 16 and zero padded."""
    return scale_to_e4m3(F.pad(v.permute(0, 2, 3, 1), (0, -v.shape[1] % 16)), scale, dtype).contiguous()


QKV_BLOCK = 32  # tokens of one head a q/k program of `quantize_qkv` normalizes and quantizes


if triton is not None:

    @triton.jit
    def _token_rows(img_ptr, ctx_ptr, batch, offs_t, t_img, stride_ib, stride_it, stride_cb, stride_ct):
        """Pointers to the rows of tokens `offs_t`: image rows, then context rows (one load reads either). The
        strides are multiples of 8 (the launcher checks): `// 8 * 8` tells Triton so when inductor passes them as
        plain integers, which keeps the loads 16 bytes wide."""
        image = img_ptr + (stride_ib // 8 * 8) * batch + offs_t.to(tl.int64) * (stride_it // 8 * 8)
        context = ctx_ptr + (stride_cb // 8 * 8) * batch + (offs_t - t_img).to(tl.int64) * (stride_ct // 8 * 8)
        return tl.where(offs_t < t_img, image, context)

    @triton.jit
    def _rms_norm(x, weight, eps, HEAD_DIM: tl.constexpr):
        """diffusers' RMSNorm: x * rsqrt(mean(x^2) + eps) rounded to bf16, times its bf16 weight, rounded."""
        rstd = (1.0 / tl.sqrt(tl.sum(x * x, axis=1) / HEAD_DIM + eps)).to(tl.float32)  # eps may come as fp64
        normed = (x * rstd[:, None]).to(tl.bfloat16).to(tl.float32)
        return (normed * weight).to(tl.bfloat16).to(tl.float32)

    @triton.jit
    def _quantize_qkv_kernel(img_ptr, ctx_ptr, wq_ptr, wk_ptr, wcq_ptr, wck_ptr, scales_ptr, q_ptr, k_ptr, vt_ptr,
                             dv_ptr, t_img, t_ctx, heads, padded, eps, stride_ib, stride_it, stride_cb, stride_ct,
                             HEAD_DIM: tl.constexpr, V_GROUP: tl.constexpr, QKV_BLOCK: tl.constexpr,
                             FP8_MAX: tl.constexpr, CLAMP: tl.constexpr):
        # grid (batch * heads, V groups, 1 + V_GROUP // QKV_BLOCK), heads fastest (programs running together read
        # whole token rows). Program role 0 quantizes V_GROUP tokens of V by their amax, writes them transposed
        # (B, H, D, padded) and the group's descale; roles 1.. RMS-norm and quantize QKV_BLOCK tokens of q and k.
        batch_head, group, role = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        batch = (batch_head // heads).to(tl.int64)
        head = (batch_head % heads).to(tl.int64)
        seq = t_img + t_ctx
        width = heads * HEAD_DIM
        offs_d = tl.arange(0, HEAD_DIM)
        columns = (head * HEAD_DIM + offs_d)[None, :]
        if role == 0:
            tokens = group * V_GROUP + tl.arange(0, V_GROUP)
            v_src = _token_rows(img_ptr, ctx_ptr, batch, tokens, t_img, stride_ib, stride_it, stride_cb, stride_ct)
            v = tl.load(v_src[:, None] + 2 * width + columns, mask=(tokens < seq)[:, None], other=0.0).to(tl.float32)
            amax = tl.maximum(tl.max(tl.max(tl.abs(v), axis=1), axis=0), 1e-12)
            tl.store(dv_ptr + batch_head * tl.cdiv(seq, V_GROUP) + group, tl.math.div_rn(amax, FP8_MAX))
            v = v * tl.math.div_rn(FP8_MAX, amax)
            if CLAMP:  # float32 outputs only: the E4M3 cast (cvt.rn.satfinite) saturates by itself
                v = tl.clamp(v, -FP8_MAX, FP8_MAX)
            row = padded // 16 * 16  # a mask on multiples of 16 keeps the transposed store 16 bytes wide
            v_dst = vt_ptr + (batch * heads + head) * HEAD_DIM * row  # V^T: the sequence innermost; zeros past seq
            tl.store(v_dst + offs_d[None, :] * row + tokens[:, None], v.to(vt_ptr.dtype.element_ty),
                     mask=(tokens < row)[:, None])
        else:
            offs_t = group * V_GROUP + (role - 1) * QKV_BLOCK + tl.arange(0, QKV_BLOCK)
            in_img = (offs_t < t_img)[:, None]
            inside = (offs_t < seq)[:, None]
            w_q = tl.where(in_img, tl.load(wq_ptr + offs_d)[None, :], tl.load(wcq_ptr + offs_d)[None, :])
            w_k = tl.where(in_img, tl.load(wk_ptr + offs_d)[None, :], tl.load(wck_ptr + offs_d)[None, :])
            q_scale, k_scale = tl.load(scales_ptr), tl.load(scales_ptr + 1)
            src = _token_rows(img_ptr, ctx_ptr, batch, offs_t, t_img, stride_ib, stride_it, stride_cb, stride_ct)
            q = tl.load(src[:, None] + columns, mask=inside, other=0.0).to(tl.float32)
            k = tl.load(src[:, None] + width + columns, mask=inside, other=0.0).to(tl.float32)
            q = _rms_norm(q, w_q.to(tl.float32), eps, HEAD_DIM) * q_scale
            k = _rms_norm(k, w_k.to(tl.float32), eps, HEAD_DIM) * k_scale
            if CLAMP:
                q, k = tl.clamp(q, -FP8_MAX, FP8_MAX), tl.clamp(k, -FP8_MAX, FP8_MAX)
            dst = ((batch * seq + offs_t.to(tl.int64)) * width)[:, None] + columns
            tl.store(q_ptr + dst, q.to(q_ptr.dtype.element_ty), mask=inside)
            tl.store(k_ptr + dst, k.to(k_ptr.dtype.element_ty), mask=inside)

    def launch_quantize_qkv(qkv: torch.Tensor, context_qkv: torch.Tensor | None, weights: tuple, eps: float,
                            heads: int, scales: torch.Tensor, q8: torch.Tensor, k8: torch.Tensor,
                            v8: torch.Tensor, descale_v: torch.Tensor) -> None:
        """Run the kernel into preallocated outputs (float32 outputs keep the values before the E4M3 cast)."""
        batch, t_img, width3 = qkv.shape
        dim = width3 // (3 * heads)
        context = qkv[:, :0] if context_qkv is None else context_qkv
        seq = t_img + context.shape[1]
        for name, t in (("qkv", qkv), ("context_qkv", context)):
            if t.stride(-1) != 1 or any(isinstance(s, int) and s % 8 for s in t.stride()[:2]):
                raise ValueError(f"{name} must have contiguous rows and strides that are multiples of 8, "
                                 f"got {t.stride()}")
        if v8.shape[-1] % 16 or tuple(descale_v.shape) != (batch, heads, -(-seq // V_GROUP)):
            raise ValueError(f"v8 must be padded to 16 and descale_v (B, H, groups), got {tuple(v8.shape)}, "
                             f"{tuple(descale_v.shape)}")
        w_q, w_k, w_cq, w_ck = (w.contiguous() for w in weights)
        grid = (batch * heads, triton.cdiv(seq, V_GROUP), 1 + V_GROUP // QKV_BLOCK)
        torch.library.wrap_triton(_quantize_qkv_kernel)[grid](
            qkv, context, w_q, w_k, w_cq, w_ck, scales, q8, k8, v8, descale_v, t_img, context.shape[1], heads,
            v8.shape[-1], eps, qkv.stride(0), qkv.stride(1), context.stride(0), context.stride(1),
            HEAD_DIM=dim, V_GROUP=V_GROUP, QKV_BLOCK=QKV_BLOCK, FP8_MAX=FP8_MAX,
            CLAMP=q8.dtype != torch.float8_e4m3fn, num_warps=4)

    @torch.library.triton_op("sd35fp8::quantize_qkv", mutates_args=())
    def _quantize_qkv_op(qkv: torch.Tensor, context_qkv: torch.Tensor | None, w_q: torch.Tensor, w_k: torch.Tensor,
                         w_cq: torch.Tensor, w_ck: torch.Tensor, eps: float, heads: int, scales: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The op: E4M3 (q8, k8, v8) and V's group descales from the fused projections' outputs (`quantize_qkv`)."""
        batch, t_img, width3 = qkv.shape
        seq = t_img + (0 if context_qkv is None else context_qkv.shape[1])
        dim = width3 // (3 * heads)
        q8 = torch.empty((batch, seq, heads, dim), dtype=torch.float8_e4m3fn, device=qkv.device)
        k8 = torch.empty_like(q8)
        v8 = torch.empty((batch, heads, dim, -(-seq // 16) * 16), dtype=torch.float8_e4m3fn, device=qkv.device)
        descale_v = torch.empty((batch, heads, -(-seq // V_GROUP)), dtype=torch.float32, device=qkv.device)
        launch_quantize_qkv(qkv, context_qkv, (w_q, w_k, w_cq, w_ck), eps, heads, scales, q8, k8, v8, descale_v)
        return q8, k8, v8, descale_v


def quantize_qkv(qkv: torch.Tensor, context_qkv: torch.Tensor | None, norms: tuple, heads: int,
                 scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The attention's inputs in one pass: read the fused q/k/v projections' 16-bit outputs of the image tokens
    (B, T, 3*H*D) and of the context tokens (or None), RMS-norm q and k per head with `norms` (norm_q, norm_k,
    norm_added_q, norm_added_k: diffusers RMSNorms with weights and one eps), concatenate along the sequence and
    write E4M3 q8, k8 (B, S, H, D) with the float32 `scales` (q, k), V^T v8 (B, H, D, S_pad) scaled per `V_GROUP`
    keys of each (batch, head) by its amax (no separate pass over V for a global amax) and those descales
    (B, H, cdiv(S, V_GROUP)), what `flash_attention_fp8` takes. `quantize_qkv_reference` is the same arithmetic
    in torch."""
    if triton is None:
        raise RuntimeError("quantize_qkv needs Triton (check sd35fp8.attention_kernel.available())")
    if context_qkv is None:  # the kernel reads the context norms' weights regardless
        norms = (norms[0], norms[1], norms[0], norms[1])
    weights = [norm.weight for norm in norms]
    return torch.ops.sd35fp8.quantize_qkv(qkv, context_qkv, *weights, float(norms[0].eps), heads,
                                          scales.reshape(2).float())


def qkv_norms_fusable(norms: tuple) -> bool:
    """Whether `quantize_qkv` computes these norms: diffusers RMSNorms with bf16 weights, no bias, one eps."""
    return (all(type(n).__name__ == "RMSNorm" and getattr(n, "weight", None) is not None
                and n.weight.dtype == torch.bfloat16 and getattr(n, "bias", None) is None for n in norms)
            and len({n.eps for n in norms}) == 1)


def flash_attention_fp8(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, descale_q: torch.Tensor,
                        descale_k: torch.Tensor, descale_v: torch.Tensor, attn_scale: float, *,
                        config: Config | tuple | None = None, v_transposed: bool = False) -> torch.Tensor:
    """FP8 attention: softmax(q k^T * descale_q * descale_k * attn_scale) (v * descale_v) as bf16 (B, S, H, D).

    q8, k8: (B, S, H, D) float8_e4m3fn; v8 the same, or (B, H, D, S_pad) from `transpose_v` with
    `v_transposed=True`; descale_q, descale_k: float32 scalars (one-element tensors on the inputs' device);
    descale_v: a scalar too, or one descale per `V_GROUP` keys of each (batch, head), (B, H, cdiv(S, V_GROUP)),
    as `quantize_qkv` writes. `config`: a `Config` (block_m, block_n, num_warps, num_stages[, promote_acc,
    key_order]), default `choose_config(D)`."""
    if triton is None:
        raise RuntimeError("flash_attention_fp8 needs Triton (check sd35fp8.attention_kernel.available())")
    chosen = Config(*config) if config is not None else Config(0, 0, 0, 0)
    batch, seq, heads, _ = q8.shape
    return torch.ops.sd35fp8.flash_attention_fp8(q8, k8, v8, descale_q.reshape(1).float(),
                                                  descale_k.reshape(1).float(),
                                                  v_group_descales(descale_v, batch, heads, seq),
                                                  float(attn_scale), bool(v_transposed), *chosen)


def v_group_descales(descale_v: torch.Tensor, batch: int, heads: int, seq: int) -> torch.Tensor:
    """V's descales as the kernel reads them: float32 (B, H, cdiv(S, V_GROUP)), a scalar broadcast to it."""
    groups = (batch, heads, -(-seq // V_GROUP))
    if descale_v.numel() == 1:
        return descale_v.float().reshape(1, 1, 1).expand(groups).contiguous()
    return descale_v.float().reshape(groups).contiguous()


_CHECKS: dict[str, str | None] = {}


def check(device: torch.device | str) -> str | None:
    """Run `quantize_qkv` and `flash_attention_fp8` once on `device` (a CUDA GPU) against their torch references;
    None if they agree, else why not (cached). `sd35fp8.speed` calls it before choosing the fp8_triton backend, so
    a GPU or Triton that cannot build or run the kernels falls back to 16-bit attention instead of failing."""
    key = str(torch.device(device))
    if key not in _CHECKS:
        _CHECKS[key] = _check(torch.device(device))
    return _CHECKS[key]


def _check(device: torch.device) -> str | None:
    from diffusers.models.normalization import RMSNorm

    from .errors import error_summary
    from .kernels import agreement
    from .metrics import relative_error

    heads, dim, t_img, t_ctx = 2, 64, 200, 9  # 209 keys: two V groups, the second partly filled
    generator = torch.Generator().manual_seed(0)
    norms = []
    for _ in range(4):
        norm = RMSNorm(dim, eps=1e-6).to(device, torch.bfloat16)
        norm.weight.data.copy_(torch.rand(dim, generator=generator) + 0.5)
        norms.append(norm)
    qkv, context = ((torch.randn(2, t, 3 * heads * dim, generator=generator) * 3).to(device, torch.bfloat16)
                    for t in (t_img, t_ctx))
    scales = torch.tensor([20.0, 25.0], device=device)
    seq = t_img + t_ctx
    try:
        with torch.no_grad():
            q8, k8, v8, descale_v = quantize_qkv(qkv, context, norms, heads, scales)
            expected = quantize_qkv_reference(qkv, context, norms, heads, scales)
            same = min(agreement(ours, theirs)[0] for ours, theirs in
                       ((q8, expected[0]), (k8, expected[1]), (v8[..., :seq], expected[2][..., :seq])))
            # torch on CUDA divides by a Python number through its reciprocal: 1 ulp from the kernel's division
            same_descales = torch.allclose(descale_v, expected[3], rtol=1e-6, atol=0)
            out = flash_attention_fp8(q8, k8, v8, 1 / scales[0], 1 / scales[1], descale_v, dim ** -0.5,
                                      v_transposed=True)
            reference = flash_attention_fp8_reference(*expected[:2], expected[2][..., :seq].permute(0, 3, 1, 2),
                                                      1 / scales[0], 1 / scales[1], expected[3], dim ** -0.5)
            error = relative_error(out.float(), reference)
    except Exception as failure:  # noqa: BLE001 - a Triton or driver that cannot build or run them
        return error_summary(failure)
    if same < 0.99 or not same_descales or not error < 0.1:
        return (f"disagrees with torch: {same:.1%} equal q/k/v bytes, V descales "
                f"{'equal' if same_descales else 'differ'}, attention error {error:.1%}")
    return None


def flash_attention_fp8_reference(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, descale_q: torch.Tensor,
                                  descale_k: torch.Tensor, descale_v: torch.Tensor, attn_scale: float,
                                  block_n: int | None = None) -> torch.Tensor:
    """What the kernel computes, in float32 torch (any device; v8 (B, S, H, D)); float32 output.

    Without `block_n`: `sd35fp8.attention.sdpa_fp8_reference`'s arithmetic (P normalized, then quantized to E4M3
    with P_SCALE). With `block_n`: the kernel's own order, P quantized relative to the running max of the key
    blocks seen so far (the kernel's online softmax), which rounds P differently. descale_v: a scalar or
    (B, H, cdiv(S, V_GROUP)) as for `flash_attention_fp8`."""
    batch, seq, heads, _ = v8.shape
    q = q8.float().transpose(1, 2) * descale_q.reshape(()).float()
    k = k8.float().transpose(1, 2) * descale_k.reshape(()).float()
    per_key = v_group_descales(descale_v, batch, heads, seq).repeat_interleave(V_GROUP, dim=-1)[..., :seq]
    v = v8.float().transpose(1, 2) * per_key[..., None]
    scores = (q @ k.transpose(-1, -2)) * attn_scale
    if block_n is None:
        probabilities = torch.softmax(scores, dim=-1)
        probabilities = (probabilities * P_SCALE).to(torch.float8_e4m3fn).float() / P_SCALE
        return (probabilities @ v).transpose(1, 2)
    seq = scores.shape[-1]
    running_max = torch.full(scores.shape[:-1], float("-inf"), device=scores.device)
    total = torch.zeros(scores.shape[:-1], device=scores.device)
    acc = torch.zeros(*scores.shape[:-1], v.shape[-1], device=scores.device)
    for start in range(0, seq, block_n):
        block = scores[..., start:start + block_n]
        new_max = torch.maximum(running_max, block.amax(-1))
        p = torch.exp(block - new_max[..., None])
        alpha = torch.exp(running_max - new_max)
        total = total * alpha + p.sum(-1)
        p8 = (p * P_SCALE).to(torch.float8_e4m3fn).float()
        acc = acc * alpha[..., None] + p8 @ v[..., start:start + block_n, :]
        running_max = new_max
    return (acc / (total[..., None] * P_SCALE)).transpose(1, 2)
